"""register_autograd(): attach the backward ops (ops.py) to the forward custom ops.

setup_context saves the differentiable inputs and, for the training variants, the forward's
per-row statistics (never the output: docs/autograd.md, section 5); nothing of size N x N is saved. Gradients for
non-tensor arguments (alpha, tau, scales, mode, backend, ...) are None.
"""
from __future__ import annotations

import torch

from . import ops as bwd  # noqa: F401  (defines the cdam_fast::*_backward ops)

_ops = torch.ops.cdam_fast


# pairwise_jsd(p, q, backend, validate)
def _setup_pairwise(ctx, inputs, output):
    p, q, backend, _ = inputs
    ctx.save_for_backward(p, q)
    ctx.backend = backend


def _bwd_pairwise(ctx, grad):
    p, q = ctx.saved_tensors
    gp, gq = _ops.pairwise_jsd_backward(grad, p, q, ctx.backend)
    return gp, (None if q is None else gq), None, None


# cdam_map(p, alpha, backend, validate)
def _setup_map(ctx, inputs, output):
    p, alpha, backend, _ = inputs
    ctx.save_for_backward(p)
    ctx.alpha, ctx.backend = alpha, backend


def _bwd_map(ctx, grad):
    (p,) = ctx.saved_tensors
    return _ops.cdam_map_backward(grad, p, ctx.alpha, ctx.backend), None, None, None


# The training variants (_<op>_train, cdam_fast._library.TRAINING; same inputs) return
# (out, stats): per-row statistics of the forward (jsd_attention: the row log-sum-exp, as
# FlashAttention-2 saves; cdam_attention: the row max / min of J and their tie counts) that the
# backward reuses instead of a pass of its own. The public wrappers call them when a gradient is
# needed; the statistics are not differentiable. The public ops save none (stats None).
def _split(ctx, output):
    if isinstance(output, (tuple, list)):
        ctx.mark_non_differentiable(output[1])
        return output
    return output, None


# cdam_attention(p, v, alpha, mode, memory_budget, backend, validate) -> out (or (out, stats))
def _setup_attention(ctx, inputs, output):
    p, v, alpha, mode, budget, backend, _ = inputs
    ctx.save_for_backward(p, v, _split(ctx, output)[1])
    ctx.args = (alpha, mode, budget, backend)


def _bwd_attention(ctx, grad, *_grad_stats):
    p, v, stats = ctx.saved_tensors
    gp, gv = _ops.cdam_attention_backward(grad, p, v, *ctx.args, stats)
    return gp, gv, None, None, None, None, None


# multiscale_cdam_map(sim, scales, tau, alpha, backend, validate)
def _setup_ms_map(ctx, inputs, output):
    sim, scales, tau, alpha, backend, _ = inputs
    ctx.save_for_backward(sim)
    ctx.args = (list(scales), tau, alpha, backend)


def _bwd_ms_map(ctx, grad):
    (sim,) = ctx.saved_tensors
    return _ops.multiscale_cdam_map_backward(grad, sim, *ctx.args), None, None, None, None, None


# multiscale_cdam_attention(sim, v, scales, tau, alpha, mode, memory_budget, backend, validate)
def _setup_ms_attention(ctx, inputs, output):
    sim, v, scales, tau, alpha, mode, budget, backend, _ = inputs
    ctx.save_for_backward(sim, v)
    ctx.args = (list(scales), tau, alpha, mode, budget, backend)  # mode, budget: the forward's Call


def _bwd_ms_attention(ctx, grad):
    sim, v = ctx.saved_tensors
    gs, gv = _ops.multiscale_cdam_attention_backward(grad, sim, v, *ctx.args)
    return gs, gv, None, None, None, None, None, None, None


# jsd_attention(p, v, tau, q, backend, validate) -> out (or (out, lse))
def _setup_jsd_attention(ctx, inputs, output):
    p, v, tau, q, backend, _ = inputs
    out, lse = _split(ctx, output)
    ctx.save_for_backward(p, v, q, lse)  # not out: the backward sums Delta_i from its own weights
    ctx.tau, ctx.backend = tau, backend


def _bwd_jsd_attention(ctx, grad, *_grad_lse):
    p, v, q, lse = ctx.saved_tensors
    gp, gv, gq = _ops.jsd_attention_backward(grad, p, v, q, ctx.tau, ctx.backend, lse)
    return gp, gv, None, (None if q is None else gq), None, None


_FORMULAS = {
    "pairwise_jsd": (_bwd_pairwise, _setup_pairwise),
    "cdam_map": (_bwd_map, _setup_map),
    "cdam_attention": (_bwd_attention, _setup_attention),
    "_cdam_attention_train": (_bwd_attention, _setup_attention),
    "multiscale_cdam_map": (_bwd_ms_map, _setup_ms_map),
    "multiscale_cdam_attention": (_bwd_ms_attention, _setup_ms_attention),
    "jsd_attention": (_bwd_jsd_attention, _setup_jsd_attention),
    "_jsd_attention_train": (_bwd_jsd_attention, _setup_jsd_attention),
}


def register_autograd() -> None:
    """Register the backward of every cdam_fast op (idempotent: torch replaces the formula)."""
    for op, (backward, setup) in _FORMULAS.items():
        torch.library.register_autograd(f"cdam_fast::{op}", backward, setup_context=setup)
