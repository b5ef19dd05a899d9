"""register_autograd(): attach every op's backward op (backward_ops.py) to its forward custom op
and its training variant, from the registry (cdam_fast.opspec.OPS).

setup_context records what the backward needs: the tensor inputs (never the output:
docs/autograd.md, section 5; nothing of size N x N is saved), the backend object the forward ran
on (the forward's rule on the forward's own Call, evaluated once, here), whether the forward
validated the values, and for a training variant the statistics that backend's forward saved
(Backend.saved_stats declares whether it saves any; None otherwise). The backward hands the
backward op that backend's name and ctx.needs_input_grad, so only the wanted gradients are
computed. Gradients for non-tensor arguments (alpha, tau, scales, mode, backend, ...) are None.
"""
from __future__ import annotations

import torch

from .. import dispatch
from ..opspec import OPS, TRAINING_OPS, OpSpec
from .backward_ops import BACKWARD


def _make_setup(spec: OpSpec, train: bool):
    def setup(ctx, inputs, output):
        call, backend, validate = spec.bind(inputs)
        stats = None
        if train:
            output, stats = output
            ctx.mark_non_differentiable(stats)
        # an empty call never reached a backend (its gradients are zeros): any name serves
        chosen = None if spec.is_empty(call) else dispatch.select(backend, call)
        ctx.backend = "reference" if chosen is None else chosen.name
        if chosen is None or spec.name not in chosen.saved_stats:
            stats = None
        ctx.save_for_backward(*[call.tensors[k] for k in spec.tensor_names], stats)
        ctx.options = call.options
        ctx.validated = bool(validate)

    return setup


def _make_backward(spec: OpSpec):
    positions = [spec.params.index(k) for k in spec.tensor_names]
    n_inputs = len(spec.params) + 2  # + backend, validate

    def backward(ctx, grad, *_grad_stats):
        *tensors, stats = ctx.saved_tensors
        needs = [bool(ctx.needs_input_grad[i]) and t is not None for i, t in zip(positions, tensors)]
        values = dict(zip(spec.tensor_names, tensors), **ctx.options)
        args = [values[k] for k in spec.params]
        grads = BACKWARD[spec.name](grad, *args, ctx.backend, ctx.validated, needs, stats)
        out = [None] * n_inputs
        for i, g, n in zip(positions, grads, needs):
            out[i] = g if n else None
        return tuple(out)

    return backward


def register_autograd() -> None:
    """Register the backward of every cdam_fast op (idempotent: torch replaces the formula)."""
    for name, spec in OPS.items():
        backward = _make_backward(spec)
        torch.library.register_autograd(f"cdam_fast::{name}", backward, setup_context=_make_setup(spec, False))
        if name in TRAINING_OPS:
            torch.library.register_autograd(f"cdam_fast::{spec.train_name}", backward,
                                            setup_context=_make_setup(spec, True))
