"""The backward passes as torch.library custom ops (namespace ``cdam_fast``, ``*_backward``).

Each forward op's registered backward (register.py) calls one of these, so torch.compile sees
the backward as one opaque node too, and the fast kernels dispatch inside, as in the forward.
Gradients come back in the dtypes of the inputs they belong to (computed in fp32, or fp64 for
float64 inputs) and always contiguous, whatever the inputs' strides (the kernels work on
contiguous copies; the fakes say the same, as torch.compile checks). Backends without a fused backward use the reference formulas (reference.py).
The backward ops register no autograd formula of their own: double backward raises torch's
"no autograd formula" error.
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import validation as val
from ..dispatch import resolve
from . import reference as ref_bwd

# backend name -> module holding fused backward functions (same names and signatures as the
# reference.py functions); ops a module lacks, or a module whose available() is False, fall
# back to the reference formulas.
FUSED_BACKWARD = {"triton": "cdam_fast.autograd.triton_backward", "cpu": "cdam_fast.autograd.cpu_backward"}


def _impl(op: str, backend: str, *ts):
    """The backward function for `op` on the backend the forward would pick for these tensors."""
    dtype = ref_bwd.compute_dtype(*ts)
    mod = resolve(backend, ts[0].device, dtype if dtype == torch.float64 else ts[0].dtype)
    name = mod.__name__.rsplit(".", 1)[-1].removesuffix("_backend")
    if name in FUSED_BACKWARD:
        fused = importlib.import_module(FUSED_BACKWARD[name])
        fn = getattr(fused, op, None)
        if fn is not None and getattr(fused, "available", lambda: True)():
            return fn
    return getattr(ref_bwd, op)


def check_differentiable_distribution(name: str, p: Tensor) -> None:
    """The gradient needs log p: negative or non-finite entries (possible with validate=False)
    have none, so refuse them by name instead of returning NaN."""
    if p.numel() == 0:
        return
    val.check_finite(name, p)
    if bool((p < 0).any()):
        raise val.CdamInputError(f"{name} has negative entries: the divergence and its gradient are undefined there")


# The one stride rule of every backward op, real and fake: gradients are contiguous.
def _like(g: Tensor, t: Tensor) -> Tensor:
    return g.to(t.dtype).contiguous()


def _zeros(t: Tensor) -> Tensor:
    return torch.zeros_like(t, memory_format=torch.contiguous_format)


def _fake(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _none_as_empty(g: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if g is None else g


@torch.library.custom_op("cdam_fast::pairwise_jsd_backward", mutates_args=())
def pairwise_jsd_backward(grad: Tensor, p: Tensor, q: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    check_differentiable_distribution("p", p)
    if q is not None:
        check_differentiable_distribution("q", q)
    if grad.numel() == 0:
        return _zeros(p), _none_as_empty(None if q is None else _zeros(q), p)
    gp, gq = _impl("pairwise_jsd_backward", backend, p, q, grad)(grad.contiguous(), p.contiguous(),
                                                                  None if q is None else q.contiguous())
    return _like(gp, p), _none_as_empty(None if gq is None else _like(gq, q), p)


@pairwise_jsd_backward.register_fake
def _(grad, p, q, backend):
    return _fake(p), p.new_empty(0) if q is None else _fake(q)


@torch.library.custom_op("cdam_fast::cdam_map_backward", mutates_args=())
def cdam_map_backward(grad: Tensor, p: Tensor, alpha: float, backend: str) -> Tensor:
    check_differentiable_distribution("p", p)
    if grad.numel() == 0:
        return _zeros(p)
    return _like(_impl("cdam_map_backward", backend, p, grad)(grad.contiguous(), p.contiguous(), alpha), p)


@cdam_map_backward.register_fake
def _(grad, p, alpha, backend):
    return _fake(p)


@torch.library.custom_op("cdam_fast::cdam_attention_backward", mutates_args=())
def cdam_attention_backward(grad: Tensor, p: Tensor, v: Tensor, alpha: float, mode: str, memory_budget: int,
                            backend: str) -> tuple[Tensor, Tensor]:
    check_differentiable_distribution("p", p)
    if grad.numel() == 0:
        return _zeros(p), _zeros(v)
    fn = _impl("cdam_attention_backward", backend, p, v, grad)
    gp, gv = fn(grad.contiguous(), p.contiguous(), v.contiguous(), alpha, mode, memory_budget)
    return _like(gp, p), _like(gv, v)


@cdam_attention_backward.register_fake
def _(grad, p, v, alpha, mode, memory_budget, backend):
    return _fake(p), _fake(v)


@torch.library.custom_op("cdam_fast::multiscale_cdam_map_backward", mutates_args=())
def multiscale_cdam_map_backward(grad: Tensor, sim: Tensor, scales: Sequence[float], tau: float, alpha: float,
                                 backend: str) -> Tensor:
    val.check_finite("sim", sim)
    if grad.numel() == 0:
        return _zeros(sim)
    fn = _impl("multiscale_cdam_map_backward", backend, sim, grad)
    return _like(fn(grad.contiguous(), sim.contiguous(), tuple(scales), tau, alpha), sim)


@multiscale_cdam_map_backward.register_fake
def _(grad, sim, scales, tau, alpha, backend):
    return _fake(sim)


@torch.library.custom_op("cdam_fast::multiscale_cdam_attention_backward", mutates_args=())
def multiscale_cdam_attention_backward(grad: Tensor, sim: Tensor, v: Tensor, scales: Sequence[float], tau: float,
                                       alpha: float, backend: str) -> tuple[Tensor, Tensor]:
    val.check_finite("sim", sim)
    if grad.numel() == 0:
        return _zeros(sim), _zeros(v)
    fn = _impl("multiscale_cdam_attention_backward", backend, sim, v, grad)
    gs, gv = fn(grad.contiguous(), sim.contiguous(), v.contiguous(), tuple(scales), tau, alpha)
    return _like(gs, sim), _like(gv, v)


@multiscale_cdam_attention_backward.register_fake
def _(grad, sim, v, scales, tau, alpha, backend):
    return _fake(sim), _fake(v)


@torch.library.custom_op("cdam_fast::jsd_attention_backward", mutates_args=())
def jsd_attention_backward(grad: Tensor, p: Tensor, v: Tensor, q: Optional[Tensor], out: Tensor, tau: float,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """out: the forward's output (no fused kernel reads it: rounded to v's dtype it is too coarse
    for Delta_i = grad_i . out_i, which they sum from their own weights; docs/autograd.md, section 5)."""
    check_differentiable_distribution("p", p)
    if q is not None:
        check_differentiable_distribution("q", q)
    if grad.numel() == 0 or p.shape[1] == 0:
        return _zeros(p), _zeros(v), _none_as_empty(None if q is None else _zeros(q), p)
    fn = _impl("jsd_attention_backward", backend, p, q, v, grad)
    gp, gv, gq = fn(grad.contiguous(), p.contiguous(), v.contiguous(), None if q is None else q.contiguous(), tau,
                    out=out.contiguous())
    return _like(gp, p), _like(gv, v), _none_as_empty(None if gq is None else _like(gq, q), p)


@jsd_attention_backward.register_fake
def _(grad, p, v, q, out, tau, backend):
    return _fake(p), _fake(v), p.new_empty(0) if q is None else _fake(q)
