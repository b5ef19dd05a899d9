"""Triton backend: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests only).

Host-side work here is O(N (C + D)) preparation: class-major copies, row entropy terms,
bilinear tap tables and the small-grid divergences of the multi-scale op.
"""
from __future__ import annotations

import torch

from ..grids import bilinear_taps_2d, class_distributions, scale_grid
from ..kernels import common
from ..kernels.cdam import ScaleSet, cdam_apply
from ..kernels.jsd import class_major, row_terms
from ..kernels.jsd import pairwise_jsd as _pairwise_jsd
from ..kernels.jsd_attention import jsd_attention as _jsd_attention

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in _DTYPES:
        return f"it computes float16/bfloat16/float32 only ({dtype} goes to the reference)"
    if device.type == "cuda":
        if common.INTERPRETED:
            return "TRITON_INTERPRET=1 is set, so Triton runs CPU tensors only"
        return None
    if device.type == "cpu" and common.INTERPRETED:
        return None
    return f"Triton needs CUDA tensors (got {device.type}; CPU tensors run only under TRITON_INTERPRET=1)"


def pairwise_jsd(p, q):
    return _pairwise_jsd(p, q)


def _materialize(B: int, N: int, mode: str, memory_budget: int) -> bool:
    if mode == "auto":
        return B * N * N * 4 <= memory_budget
    return mode == "materialize"


def _full_scale(p: torch.Tensor, materialize: bool):
    if materialize:
        return ("materialized", _pairwise_jsd(p, None))
    return ("recompute", class_major(p), row_terms(p))


def cdam_map(p, alpha):
    B, N, C = p.shape
    sc = ScaleSet(B, N, C, p.device, _full_scale(p, True), [], [1.0])
    return cdam_apply(sc, alpha, None)


def cdam_attention(p, v, alpha, mode, memory_budget):
    B, N, C = p.shape
    sc = ScaleSet(B, N, C, p.device, _full_scale(p, _materialize(B, N, mode, memory_budget)), [], [1.0])
    return cdam_apply(sc, alpha, v)


def _multiscale(sim, scales, tau, materialize):
    B, C, h, w = sim.shape
    N = h * w
    n_full = 0
    small = []
    for s in scales:
        hs, ws = scale_grid(h, w, s)
        if (hs, ws) == (h, w):
            n_full += 1
            continue
        js = _pairwise_jsd(class_distributions(sim, hs, ws, tau), None)
        idx, wts = bilinear_taps_2d(h, w, hs, ws, device=sim.device)
        small.append((js, idx, wts))
    full = _full_scale(class_distributions(sim, h, w, tau), materialize) if n_full else None
    weights = ([n_full] if n_full else []) + [1.0] * len(small)
    weights = [x / len(scales) for x in weights]
    return ScaleSet(B, N, C, sim.device, full, small, weights)


def multiscale_cdam_map(sim, scales, tau, alpha):
    return cdam_apply(_multiscale(sim, scales, tau, True), alpha, None)


def multiscale_cdam_attention(sim, v, scales, tau, alpha, mode, memory_budget):
    B, _, h, w = sim.shape
    sc = _multiscale(sim, scales, tau, _materialize(B, h * w, mode, memory_budget))
    return cdam_apply(sc, alpha, v)


def jsd_attention(p, v, tau, q):
    return _jsd_attention(p, v, tau, q)
