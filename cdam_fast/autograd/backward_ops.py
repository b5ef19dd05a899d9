"""The backward passes as torch.library custom ops (``cdam_fast::<op>_backward``), one per op,
generated from its spec (OpSpec.backward_schema), so torch.compile sees the backward as one
opaque node too.

A backward op is handed the name of the backend object its forward ran on (register.py) and
runs that object's backward (Backend.backward) without choosing again. Where that backend
declares its backward cannot take the call (a failed build, a launch limit) the op's pure-torch
formulas run after one RuntimeWarning; where it has no backward for the op by design (cuda,
reference) they run quietly. Only the gradients asked for (needs) are computed. Gradients come
back in the dtypes of the inputs they belong to (computed in fp32, or fp64 for float64 inputs)
and always contiguous, whatever the inputs' strides; an entry not needed (or of an absent input)
is an empty tensor. The backward ops register no autograd formula of their own: double backward
raises torch's "no autograd formula" error.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

from .. import dispatch
from .._library import autocast_off
from ..opspec import OPS, Call, OpSpec


def _warn_formulas(name: str, op: str, why: list) -> None:
    dispatch.warn_once(("backward", name, op, tuple(why)),
                       f"cdam_fast: the fused {name!r} backward cannot take this {op} call ({'; '.join(why)}); "
                       f"using the reference formulas", stacklevel=4)


def run_own(chosen, spec: OpSpec, grad, call, needs, stats):
    """The backend's own backward (Backend.backward)."""
    return chosen.backward(spec.name, grad, call, needs, stats)


def run_formulas(spec: OpSpec, grad, call, needs, stats):
    """The op's pure-torch backward formulas (its home module), which read no saved statistics."""
    return spec.backward(grad, *call.args(spec.params), needs=needs, stats=None)


def backward_fn(spec: OpSpec, backend_name: str, call):
    """fn(grad, call, needs, stats) -> gradients: the backward of the backend the forward ran on,
    or the formulas where it has none for this call (with one warning where it has one)."""
    # the forward's choice, recorded by register.py; a direct call naming "auto" gets the forward's rule
    chosen = dispatch.select(backend_name, call) if backend_name == "auto" else dispatch.backend(backend_name)
    why = chosen.backward_not_supported_reasons(spec.name, call)
    if not why:
        return functools.partial(run_own, chosen, spec)
    if spec.name in chosen.backward_ops:  # it has one, but not for this call
        _warn_formulas(chosen.name, spec.name, why)
    return functools.partial(run_formulas, spec)


def _checked_names(spec: OpSpec) -> tuple:
    """The inputs whose bad values (possible with validate=False) cost their batch element its
    gradients: the distributions (the gradient needs log p) and the similarity grid."""
    return spec.distributions + (("sim",) if spec.multiscale else ())


def _without_gradient(name: str, t: Tensor) -> Tensor:
    """[B] bool: batch elements of t with no gradient (possible with validate=False):
    distributions with non-finite or negative entries (the forward's NaN rows; the gradient
    needs log p); similarities with NaN or +inf. A -inf similarity (a masked class) is a class
    probability of exactly 0, which the forward and the gradient formulas handle: those elements
    are computed, so wherever their forward output is finite, so are their gradients."""
    if name == "sim":
        return (torch.isnan(t) | torch.isposinf(t)).flatten(1).any(1)
    return ~torch.isfinite(t).flatten(1).all(1) | (t < 0).flatten(1).any(1)


def _bad_elements(spec: OpSpec, call):
    """[B] bool of the batch elements whose checked inputs have no gradient, or None when there
    are none: one host sync for all inputs together."""
    named = {k: _without_gradient(k, call.tensors[k]) for k in _checked_names(spec)
             if call.tensors.get(k) is not None and call.tensors[k].numel() > 0}
    if not named:
        return None
    bad = torch.stack(list(named.values())).any(0)
    if not bool(bad.any()):
        return None
    for name, b in named.items():  # the failing path only: one warning per argument
        which = b.nonzero().flatten().tolist()
        if which:
            what = "NaN or +inf" if name == "sim" else "non-finite or negative"
            warnings.warn(f"cdam_fast: {name} has {what} entries in batch element(s) {which[:8]}"
                          f"{' ...' if len(which) > 8 else ''} (accepted by validate=False): their gradients are NaN; "
                          f"the other elements' are computed", RuntimeWarning, stacklevel=4)
    return bad


def _per_element(spec: OpSpec, compute, call, validated: bool):
    """compute(call) -> gradients ([B, ...] each, or None), run so that one bad batch element never
    costs the others. validated: the forward checked the values, nothing to look for (no host
    sync). Else elements whose distributions or sim have no gradient get NaN gradients (NaN in,
    NaN out, as the forward with validate=False) and one warning naming the argument; the rest
    are computed on their own values (the bad ones replaced by a harmless placeholder first:
    every op treats batch elements independently)."""
    compute = autocast_off(compute)  # the forward's precision, inside torch.autocast or not
    bad = None if validated else _bad_elements(spec, call)
    if bad is None:
        return compute(call)
    mask = lambda t: bad.view(-1, *[1] * (t.dim() - 1))  # noqa: E731
    tensors = dict(call.tensors)
    for k in _checked_names(spec):
        if tensors.get(k) is not None:
            tensors[k] = tensors[k].masked_fill(mask(tensors[k]), 0.0 if k == "sim" else 1.0 / max(1, tensors[k].shape[-1]))
    return tuple(g if g is None or g.numel() == 0 else g.masked_fill(mask(g), math.nan)
                 for g in compute(Call(call.op, tensors, call.options)))


def _make_backward(spec: OpSpec):
    def impl(grad, *args):
        *forward, backend_name, validated, needs, stats = args
        call = spec.bind((*forward, backend_name, validated))[0]
        inputs = [call.tensors[k] for k in spec.tensor_names]
        wanted = [bool(n) and t is not None for n, t in zip(needs, inputs)]
        if grad.numel() == 0 or spec.is_empty(call):
            grads = [torch.zeros_like(t, memory_format=torch.contiguous_format) if w else None
                     for t, w in zip(inputs, wanted)]
        else:
            for k, t in call.tensors.items():
                if t is not None:
                    call.tensors[k] = t.contiguous()
            fn = backward_fn(spec, backend_name, call)
            grads = _per_element(spec, lambda c: fn(grad.contiguous(), c, tuple(wanted), stats), call, validated)
        return [g.to(t.dtype).contiguous() if w and g is not None else grad.new_empty(0)
                for g, t, w in zip(grads, inputs, wanted)]

    def fake(grad, *args):
        *forward, backend_name, validated, needs, stats = args
        call = spec.bind((*forward, backend_name, validated))[0]
        inputs = [call.tensors[k] for k in spec.tensor_names]
        return [torch.empty_like(t, memory_format=torch.contiguous_format) if n and t is not None else grad.new_empty(0)
                for n, t in zip(needs, inputs)]

    impl.__name__ = spec.backward_name
    op = torch.library.custom_op(f"cdam_fast::{spec.backward_name}", impl, mutates_args=(),
                                 schema=spec.backward_schema)
    op.register_fake(fake)
    return op


#: op name -> its backward custom op
BACKWARD = {name: _make_backward(spec) for name, spec in OPS.items()}
