"""torch.library registration of the ops (namespace ``cdam_fast``).

Each op takes batch-flattened tensors plus the backend name and runs the value checks, the
empty-input shortcut and the dispatch inside the op, so torch.compile sees one opaque node
per call; the fake implementations give it the output shapes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import validation as val
from .dispatch import resolve


def _map_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _backend(backend: str, *ts):
    """Float64 anywhere sends the call to the float64-capable backends; else p's dtype decides."""
    dtype = _map_dtype(*ts)
    return resolve(backend, ts[0].device, dtype if dtype == torch.float64 else ts[0].dtype)


def _contig(t):
    return None if t is None else t.contiguous()


@torch.library.custom_op("cdam_fast::pairwise_jsd", mutates_args=())
def pairwise_jsd(p: Tensor, q: Optional[Tensor], backend: str, validate: bool) -> Tensor:
    M = p.shape[1] if q is None else q.shape[1]
    if validate:
        val.check_distribution("p", p)
        if q is not None:
            val.check_distribution("q", q)
    if p.shape[0] * p.shape[1] * M == 0:
        return p.new_zeros((p.shape[0], p.shape[1], M), dtype=_map_dtype(p, q))
    return _backend(backend, p, q).pairwise_jsd(p.contiguous(), _contig(q))


@pairwise_jsd.register_fake
def _(p, q, backend, validate):
    M = p.shape[1] if q is None else q.shape[1]
    return p.new_empty((p.shape[0], p.shape[1], M), dtype=_map_dtype(p, q))


@torch.library.custom_op("cdam_fast::cdam_map", mutates_args=())
def cdam_map(p: Tensor, alpha: float, backend: str, validate: bool) -> Tensor:
    if validate:
        val.check_distribution("p", p)
    if p.shape[0] * p.shape[1] == 0:
        return p.new_zeros((p.shape[0], p.shape[1], p.shape[1]), dtype=_map_dtype(p))
    return _backend(backend, p).cdam_map(p.contiguous(), alpha)


@cdam_map.register_fake
def _(p, alpha, backend, validate):
    return p.new_empty((p.shape[0], p.shape[1], p.shape[1]), dtype=_map_dtype(p))


@torch.library.custom_op("cdam_fast::cdam_attention", mutates_args=())
def cdam_attention(p: Tensor, v: Tensor, alpha: float, mode: str, memory_budget: int, backend: str,
                   validate: bool) -> Tensor:
    if validate:
        val.check_distribution("p", p)
        val.check_finite("v", v)
    if v.numel() == 0:
        return torch.zeros_like(v)
    return _backend(backend, p, v).cdam_attention(p.contiguous(), v.contiguous(), alpha, mode, memory_budget)


@cdam_attention.register_fake
def _(p, v, alpha, mode, memory_budget, backend, validate):
    return torch.empty_like(v)


@torch.library.custom_op("cdam_fast::multiscale_cdam_map", mutates_args=())
def multiscale_cdam_map(sim: Tensor, scales: Sequence[float], tau: float, alpha: float, backend: str,
                        validate: bool) -> Tensor:
    B, _, h, w = sim.shape
    if validate:
        val.check_finite("sim", sim)
    if B * h * w == 0:
        return sim.new_zeros((B, h * w, h * w), dtype=_map_dtype(sim))
    return _backend(backend, sim).multiscale_cdam_map(sim.contiguous(), tuple(scales), tau, alpha)


@multiscale_cdam_map.register_fake
def _(sim, scales, tau, alpha, backend, validate):
    n = sim.shape[2] * sim.shape[3]
    return sim.new_empty((sim.shape[0], n, n), dtype=_map_dtype(sim))


@torch.library.custom_op("cdam_fast::multiscale_cdam_attention", mutates_args=())
def multiscale_cdam_attention(sim: Tensor, v: Tensor, scales: Sequence[float], tau: float, alpha: float,
                              mode: str, memory_budget: int, backend: str, validate: bool) -> Tensor:
    if validate:
        val.check_finite("sim", sim)
        val.check_finite("v", v)
    if v.numel() == 0:
        return torch.zeros_like(v)
    return _backend(backend, sim, v).multiscale_cdam_attention(
        sim.contiguous(), v.contiguous(), tuple(scales), tau, alpha, mode, memory_budget)


@multiscale_cdam_attention.register_fake
def _(sim, v, scales, tau, alpha, mode, memory_budget, backend, validate):
    return torch.empty_like(v)


@torch.library.custom_op("cdam_fast::jsd_attention", mutates_args=())
def jsd_attention(p: Tensor, v: Tensor, tau: float, q: Optional[Tensor], backend: str, validate: bool) -> Tensor:
    if validate:
        val.check_distribution("p", p)
        if q is not None:
            val.check_distribution("q", q)
        val.check_finite("v", v)
    if v.numel() == 0 or p.shape[1] == 0:
        return v.new_zeros((p.shape[0], p.shape[1], v.shape[2]))
    return _backend(backend, p, q, v).jsd_attention(p.contiguous(), v.contiguous(), tau, _contig(q))


@jsd_attention.register_fake
def _(p, v, tau, q, backend, validate):
    return v.new_empty((p.shape[0], p.shape[1], v.shape[2]))
