"""The backward passes as torch.library custom ops (namespace ``cdam_fast``, ``*_backward``).

Each forward op's registered backward (register.py) calls one of these, so torch.compile sees
the backward as one opaque node too, and the fast kernels dispatch inside, as in the forward.
Gradients come back in the dtypes of the inputs they belong to (computed in fp32, or fp64 for
float64 inputs) and always contiguous, whatever the inputs' strides (the kernels work on
contiguous copies; the fakes say the same, as torch.compile checks).

The backward runs on the backend the forward ran on, chosen by the forward's own rule
(dispatch.select_name on the forward op's Call, built by its OpSpec from the saved inputs), so
a call the forward sent away for a size limit never reaches a backend that cannot take it.
That backend's fused backward (FUSED_BACKWARD) runs unless it declares it cannot take the call
(then one RuntimeWarning, and the reference formulas); backends without one by design use the
reference formulas quietly. The backward ops register no autograd formula of their own: double
backward raises torch's "no autograd formula" error.
"""
from __future__ import annotations

import importlib
import math
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import dispatch
from .._library import autocast_off
from ..opspec import OPS
from . import reference as ref_bwd

# backend name -> module of its fused backward: functions named `<op>_backward` with the
# reference.py signatures, and not_supported_reasons(op, call) -> list of reasons it cannot take
# a call. None: no fused backward by design (cuda: the reference formulas on its device, as
# docs/autograd.md's backward table says; reference: they are its formulas).
FUSED_BACKWARD = {"triton": "cdam_fast.autograd.triton_backward", "cpu": "cdam_fast.autograd.cpu_backward",
                  "cuda": None, "reference": None}



def backward_backend(op: str, backend: str, *forward_args):
    """(name of the backend the forward op `op` ran `forward_args` on, the forward's Call):
    forward_args are the op's arguments in OpSpec.params order; the forward's Call and selection
    rule, nothing else."""
    spec = OPS[op]
    call, backend, _ = spec.bind((*forward_args, backend, False))
    return dispatch.select_name(backend, spec.promote(call)), call


def _impl(op: str, backend: str, *forward_args):
    """The backward function of forward op `op` for this call (see the module docstring)."""
    name, call = backward_backend(op, backend, *forward_args)
    reference = getattr(ref_bwd, f"{op}_backward")
    if FUSED_BACKWARD[name] is None:
        return reference
    fused = importlib.import_module(FUSED_BACKWARD[name])
    why = fused.not_supported_reasons(op, call)
    if why:
        _warn_reference(name, op, why)
        return reference
    return getattr(fused, f"{op}_backward")


def _warn_reference(name: str, op: str, why: list) -> None:
    dispatch.warn_once(("backward", name, op, tuple(why)),
                       f"cdam_fast: the fused {name!r} backward cannot take this {op} call ({'; '.join(why)}); "
                       f"using the reference formulas", stacklevel=3)


def _without_gradient(t: Optional[Tensor], distribution: bool) -> Optional[Tensor]:
    """[B] bool: batch elements of t with no gradient (possible with validate=False):
    distributions with non-finite or negative entries (the forward's NaN rows; the gradient
    needs log p); similarities with NaN or +inf. A -inf similarity (a masked class) is a class
    probability of exactly 0, which the forward and the gradient formulas handle: those elements
    are computed, so wherever their forward output is finite, so are their gradients."""
    if t is None or t.numel() == 0:
        return None
    if not distribution:
        return (torch.isnan(t) | torch.isposinf(t)).flatten(1).any(1)
    return ~torch.isfinite(t).flatten(1).all(1) | (t < 0).flatten(1).any(1)


def _per_element(compute, **inputs):
    """compute(**inputs) -> gradients ([B, ...] each, or empty), run so that one bad batch element
    never costs the others: elements whose p / q (distributions) or sim have no gradient get NaN
    gradients (NaN in, NaN out, as the forward with validate=False), with one warning naming the
    argument; the rest are computed on their own values (the bad ones are replaced by a harmless
    placeholder first: every op treats batch elements independently)."""
    compute = autocast_off(compute)  # the forward's precision, inside torch.autocast or not
    named = {k: _without_gradient(t, distribution=k != "sim") for k, t in inputs.items()}
    bad = None
    for name, b in named.items():
        if b is not None and bool(b.any()):
            _warn_nan(name, b)
            bad = b if bad is None else bad | b
    if bad is None:
        return compute(**inputs)
    fill = {k: (None if t is None else t.masked_fill(bad.view(-1, *[1] * (t.dim() - 1)),
                                                     0.0 if k == "sim" else 1.0 / max(1, t.shape[-1])))
            for k, t in inputs.items()}
    return tuple(g if g.numel() == 0 else g.masked_fill(bad.view(-1, *[1] * (g.dim() - 1)), math.nan)
                 for g in compute(**fill))


def _warn_nan(name: str, bad: Tensor) -> None:
    which = bad.nonzero().flatten().tolist()
    what = "NaN or +inf" if name == "sim" else "non-finite or negative"
    warnings.warn(f"cdam_fast: {name} has {what} entries in batch element(s) {which[:8]}{' ...' if len(which) > 8 else ''} "
                  f"(accepted by validate=False): their gradients are NaN; the other elements' are computed",
                  RuntimeWarning, stacklevel=3)


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
    if grad.numel() == 0:
        return _zeros(p), _none_as_empty(None if q is None else _zeros(q), p)

    def compute(p, q):
        gp, gq = _impl("pairwise_jsd", backend, p, q)(grad.contiguous(), p.contiguous(),
                                                      None if q is None else q.contiguous())
        return _like(gp, p), _none_as_empty(None if gq is None else _like(gq, q), p)
    return _per_element(compute, p=p, q=q)


@pairwise_jsd_backward.register_fake
def _(grad, p, q, backend):
    return _fake(p), p.new_empty(0) if q is None else _fake(q)


@torch.library.custom_op("cdam_fast::cdam_map_backward", mutates_args=())
def cdam_map_backward(grad: Tensor, p: Tensor, alpha: float, backend: str) -> Tensor:
    if grad.numel() == 0:
        return _zeros(p)

    def compute(p):
        return (_like(_impl("cdam_map", backend, p, alpha)(grad.contiguous(), p.contiguous(), alpha), p),)
    return _per_element(compute, p=p)[0]


@cdam_map_backward.register_fake
def _(grad, p, alpha, backend):
    return _fake(p)


@torch.library.custom_op("cdam_fast::cdam_attention_backward", mutates_args=())
def cdam_attention_backward(grad: Tensor, p: Tensor, v: Tensor, alpha: float, mode: str, memory_budget: int,
                            backend: str, stats: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """stats: the training forward's [4, B, N] row max, min and tie counts of J
    (opspec.STATS_NOT_SAVED where that forward did not compute them), which spare the Triton
    backward its first pass; None (the public op): recomputed."""
    if grad.numel() == 0:
        return _zeros(p), _zeros(v)

    def compute(p):
        fn = _impl("cdam_attention", backend, p, v, alpha, mode, memory_budget)
        gp, gv = fn(grad.contiguous(), p.contiguous(), v.contiguous(), alpha, mode, memory_budget, stats=stats)
        return _like(gp, p), _like(gv, v)
    return _per_element(compute, p=p)


@cdam_attention_backward.register_fake
def _(grad, p, v, alpha, mode, memory_budget, backend, stats=None):
    return _fake(p), _fake(v)


@torch.library.custom_op("cdam_fast::multiscale_cdam_map_backward", mutates_args=())
def multiscale_cdam_map_backward(grad: Tensor, sim: Tensor, scales: Sequence[float], tau: float, alpha: float,
                                 backend: str) -> Tensor:
    if grad.numel() == 0:
        return _zeros(sim)

    def compute(sim):
        fn = _impl("multiscale_cdam_map", backend, sim, list(scales), tau, alpha)
        return (_like(fn(grad.contiguous(), sim.contiguous(), tuple(scales), tau, alpha), sim),)
    return _per_element(compute, sim=sim)[0]


@multiscale_cdam_map_backward.register_fake
def _(grad, sim, scales, tau, alpha, backend):
    return _fake(sim)


@torch.library.custom_op("cdam_fast::multiscale_cdam_attention_backward", mutates_args=())
def multiscale_cdam_attention_backward(grad: Tensor, sim: Tensor, v: Tensor, scales: Sequence[float], tau: float,
                                       alpha: float, mode: str, memory_budget: int,
                                       backend: str) -> tuple[Tensor, Tensor]:
    if grad.numel() == 0:
        return _zeros(sim), _zeros(v)

    def compute(sim):
        fn = _impl("multiscale_cdam_attention", backend, sim, v, list(scales), tau, alpha, mode, memory_budget)
        gs, gv = fn(grad.contiguous(), sim.contiguous(), v.contiguous(), tuple(scales), tau, alpha)
        return _like(gs, sim), _like(gv, v)
    return _per_element(compute, sim=sim)


@multiscale_cdam_attention_backward.register_fake
def _(grad, sim, v, scales, tau, alpha, mode, memory_budget, backend):
    return _fake(sim), _fake(v)


@torch.library.custom_op("cdam_fast::jsd_attention_backward", mutates_args=())
def jsd_attention_backward(grad: Tensor, p: Tensor, v: Tensor, q: Optional[Tensor], tau: float, backend: str,
                           lse: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward's output is not an input (unlike FlashAttention): rounded to v's dtype it is too
    coarse for Delta_i = grad_i . out_i, which the kernels sum from their own weights
    (docs/autograd.md, section 5). lse: the training forward's row log-sum-exp [B, N] (base 2; opspec.STATS_NOT_SAVED where that
    forward did not compute it), which spares the Triton backward a pass; None (the public op): recomputed."""
    if grad.numel() == 0 or p.shape[1] == 0 or v.shape[1] == 0:  # no queries, no keys or no value columns
        return _zeros(p), _zeros(v), _none_as_empty(None if q is None else _zeros(q), p)

    def compute(p, q):
        fn = _impl("jsd_attention", backend, p, v, tau, q)
        gp, gv, gq = fn(grad.contiguous(), p.contiguous(), v.contiguous(), None if q is None else q.contiguous(), tau,
                        lse=lse)
        return _like(gp, p), _like(gv, v), _none_as_empty(None if gq is None else _like(gq, q), p)
    return _per_element(compute, p=p, q=q)


@jsd_attention_backward.register_fake
def _(grad, p, v, q, tau, backend, lse=None):
    return _fake(p), _fake(v), p.new_empty(0) if q is None else _fake(q)
