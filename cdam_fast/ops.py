"""The public ops. Shapes take any number of leading batch dimensions.

Every op accepts ``backend`` ("auto", "triton", "cuda", "cpu", "reference"; the environment
variable CDAM_FAST_BACKEND overrides "auto") and ``validate`` (value checks on the inputs:
finite, probabilities summing to 1; structural checks always run). With ``validate=False`` every
backend follows one rule: a row of p or q with a negative entry is a NaN row, and a -inf
similarity is a class probability of 0 (docs/autograd.md, section 1).

Dtypes (cdam_fast.opspec states the rule once): the divergences are computed in float64 if any
tensor input is float64 (only the reference does that), else in float32; maps come back in that
dtype, attention outputs in v's dtype.
"""
from __future__ import annotations

import math

import torch

from . import _library as lib
from . import memory
from . import validation as val
from .dispatch import check_backend_name
from .grids import CDAM_SCALES
from .memory import DEFAULT_MEMORY_BUDGET, MODES  # noqa: F401  (public names)


_NO_MODE = object()  # the op takes no mode


def _common(backend: str, mode=_NO_MODE, memory_budget: int | None = None, validate: bool = True):
    check_backend_name(backend)
    if not isinstance(validate, bool):  # "no" or "false" would be truthy: checks silently on
        raise val.CdamInputError(f"validate must be True or False, got {validate!r}")
    if mode is _NO_MODE:
        return None
    memory.check_mode(mode)
    if mode == "materialize" and memory_budget is None:
        return DEFAULT_MEMORY_BUDGET  # unused by materialize: CDAM_FAST_MEMORY_BUDGET is not read
    return memory.resolve_budget(memory_budget)


def _needs_grad(*ts) -> bool:
    """A gradient will be asked of this call: the wrappers then take the op's training variant
    (cdam_fast._library.TRAINING), whose forward also saves statistics for the backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N, K] -> [B, N, K] (a view where possible)."""
    return t.reshape(math.prod(t.shape[:-2]), t.shape[-2], t.shape[-1])


def _check_keys(p: torch.Tensor, q: torch.Tensor | None) -> None:
    """q, when given, holds distributions over p's classes with p's batch dimensions."""
    if q is None:
        return
    val.check_tensor("q", q, 2)
    val.check_same_device(p=p, q=q)
    val.check_batch("q", q, "p", p.shape[:-2], 2)
    val.check_dim("q", q.shape[-1], "class count (last dim)", p.shape[-1], "p")


def _check_classes(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] == 0:
        raise val.CdamInputError(f"{name} has no classes (last dimension is 0)")


def pairwise_jsd(p: torch.Tensor, q: torch.Tensor | None = None, *, backend: str = "auto",
                 validate: bool = True) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between every row of p [..., N, C] and of q [..., M, C].

    q defaults to p (then the diagonal is exactly 0). Returns [..., N, M].
    """
    _common(backend, validate=validate)
    val.check_tensor("p", p, 2)
    _check_classes("p", p)
    batch = p.shape[:-2]
    _check_keys(p, q)
    out = lib.pairwise_jsd(_rows(p), None if q is None else _rows(q), backend, validate)
    return out.reshape(*batch, out.shape[-2], out.shape[-1])


def cdam_map(p: torch.Tensor, alpha: float = 10.0, *, backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """The single-scale CDAM map A [..., N, N] of class distributions p [..., N, C] (spec 2.3-2.6)."""
    _common(backend, validate=validate)
    val.check_tensor("p", p, 2)
    _check_classes("p", p)
    alpha = val.check_alpha(alpha)
    out = lib.cdam_map(_rows(p), alpha, backend, validate)
    return out.reshape(*p.shape[:-1], p.shape[-2])


def _check_values(p_name: str, p: torch.Tensor, v: torch.Tensor, n: int) -> None:
    val.check_tensor("v", v, 2)
    val.check_same_device(**{p_name: p, "v": v})
    val.check_batch("v", v, p_name, p.shape[:-3] if p_name == "sim" else p.shape[:-2], 2)
    val.check_dim("v", v.shape[-2], "token count (dim -2)", n, p_name)


def cdam_attention(p: torch.Tensor, v: torch.Tensor, alpha: float = 10.0, *, mode: str = "auto",
                   memory_budget: int | None = None, backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """cdam_map(p, alpha) @ v for p [..., N, C], v [..., N, D], without writing the N x N map.

    mode "materialize" keeps the N x N float32 divergences between the two passes, "recompute"
    evaluates them twice in O(N (C + D)) extra memory; "auto" materialises while the buffer fits
    in memory_budget bytes (default: CDAM_FAST_MEMORY_BUDGET, else DEFAULT_MEMORY_BUDGET = 1 GiB;
    the rule is cdam_fast.memory's).
    """
    budget = _common(backend, mode, memory_budget, validate)
    val.check_tensor("p", p, 2)
    _check_classes("p", p)
    _check_values("p", p, v, p.shape[-2])
    alpha = val.check_alpha(alpha)
    args = (_rows(p), _rows(v), alpha, mode, budget, backend, validate)
    if _needs_grad(p, v):
        out, _ = lib.cdam_attention_train(*args)  # also saves the row statistics for the backward
    else:
        out = lib.cdam_attention(*args)
    return out.reshape(v.shape)


def _check_sim(sim: torch.Tensor, scales, tau, alpha):
    val.check_tensor("sim", sim, 3)
    if sim.shape[-3] == 0:
        raise val.CdamInputError("sim has no classes (dim -3 is 0)")
    return val.check_scales(scales), val.check_tau(tau), val.check_alpha(alpha)


def multiscale_cdam_map(sim: torch.Tensor, scales=CDAM_SCALES, tau: float = 0.1, alpha: float = 10.0, *,
                        backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """The multi-scale CDAM map [..., N, N] (N = h*w) of raw similarity grids sim [..., C, h, w]:
    the mean over scales of the single-scale maps (spec section 2)."""
    _common(backend, validate=validate)
    scales, tau, alpha = _check_sim(sim, scales, tau, alpha)
    C, h, w = sim.shape[-3:]
    out = lib.multiscale_cdam_map(sim.reshape(math.prod(sim.shape[:-3]), C, h, w), scales, tau, alpha, backend, validate)
    return out.reshape(*sim.shape[:-3], h * w, h * w)


def multiscale_cdam_attention(sim: torch.Tensor, v: torch.Tensor, scales=CDAM_SCALES, tau: float = 0.1,
                              alpha: float = 10.0, *, mode: str = "auto", memory_budget: int | None = None,
                              backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """multiscale_cdam_map(sim) @ v for sim [..., C, h, w] and v [..., h*w, D], fused: the seven
    N x N maps are never written (mode and memory_budget as in cdam_attention)."""
    budget = _common(backend, mode, memory_budget, validate)
    scales, tau, alpha = _check_sim(sim, scales, tau, alpha)
    C, h, w = sim.shape[-3:]
    _check_values("sim", sim, v, h * w)
    out = lib.multiscale_cdam_attention(sim.reshape(math.prod(sim.shape[:-3]), C, h, w), _rows(v), scales, tau, alpha, mode,
                                        budget, backend, validate)
    return out.reshape(v.shape)


def jsd_attention(p: torch.Tensor, v: torch.Tensor, tau: float = 0.1, *, q: torch.Tensor | None = None,
                  backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """softmax_j(-J(p_i, q_j) / tau) @ v in one pass with an online softmax, O(N) extra memory.

    p [..., N, C] are the queries' distributions, q [..., M, C] the keys' (default p) and
    v [..., M, D] the values. Returns [..., N, D].
    """
    _common(backend, validate=validate)
    val.check_tensor("p", p, 2)
    _check_classes("p", p)
    tau = val.check_tau(tau)
    _check_keys(p, q)
    keys = p if q is None else q
    val.check_tensor("v", v, 2)
    val.check_same_device(p=p, v=v)
    val.check_batch("v", v, "p", p.shape[:-2], 2)
    val.check_dim("v", v.shape[-2], "token count (dim -2)", keys.shape[-2], "q" if q is not None else "p")
    args = (_rows(p), _rows(v), tau, None if q is None else _rows(q), backend, validate)
    if _needs_grad(p, v, q):
        out, _ = lib.jsd_attention_train(*args)  # also saves the row log-sum-exp for the backward
    else:
        out = lib.jsd_attention(*args)
    return out.reshape(*p.shape[:-1], v.shape[-1])
