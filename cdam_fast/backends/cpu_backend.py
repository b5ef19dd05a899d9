"""The C++ CPU backend (csrc/cdam_cpu.cpp), compiled just in time on first use.

The kernels use the entropy form of the divergence, one log2 per (row, key, class):
r_i = sum_c p_ic (log2 p_ic + 1), J_ij = (ln 2 / 2)(r_i + r'_j - sum_c s log2 s) with
s = p_ic + q_jc, accumulated in float32 (the reference uses the literal mixture-entropy
formula instead, so the two are independent). Inputs are converted to float32 here;
maps come back float32, attention outputs in v's dtype.
"""
from __future__ import annotations

import torch

from .. import grids
from .extension_build import cpu_extension

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"it runs CPU tensors only (got a {device.type} tensor)"
    if dtype == torch.float64:
        return "float64 inputs are computed by the reference backend"
    if dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {dtype}"
    return cpu_extension.failure()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def use_materialize(mode: str, nbytes: int, memory_budget: int) -> bool:
    """Mode "auto" keeps the divergences between passes while they fit in memory_budget bytes."""
    if mode == "materialize":
        return True
    if mode == "recompute":
        return False
    return nbytes <= memory_budget


def multiscale_inputs(sim: torch.Tensor, scales, tau: float):
    """Per scale: the distributions P_s [B, n_s, C] (float32) and, for grids smaller than h x w,
    the bilinear taps (idx [N, 4] int32, weights [N, 4] float32) onto the full grid, else None."""
    _, _, h, w = sim.shape
    ps, idx, wts = [], [], []
    for s in scales:
        hs, ws = grids.scale_grid(h, w, s)
        ps.append(grids.class_distributions(sim, hs, ws, tau).to(torch.float32).contiguous())
        if (hs, ws) == (h, w):
            idx.append(None)
            wts.append(None)
        else:
            i, wt = grids.bilinear_taps_2d(h, w, hs, ws, device=sim.device)
            idx.append(i.contiguous())
            wts.append(wt.contiguous())
    return ps, idx, wts


def materialized_bytes(ps) -> int:
    """float32 bytes of every scale's divergences [B, n_s, n_s] (what "materialize" keeps)."""
    return sum(4 * p.shape[0] * p.shape[1] ** 2 for p in ps)


def _ext():
    return cpu_extension.module()


def pairwise_jsd(p, q):
    return _ext().pairwise_jsd(_f32(p), _f32(q))


def cdam_map(p, alpha):
    return _ext().cdam_map(_f32(p), float(alpha))


def cdam_attention(p, v, alpha, mode, memory_budget):
    B, N, _ = p.shape
    materialize = use_materialize(mode, 4 * B * N * N, memory_budget)
    return _ext().cdam_attention(_f32(p), _f32(v), float(alpha), materialize).to(v.dtype)


def multiscale_cdam_map(sim, scales, tau, alpha):
    ps, idx, wts = multiscale_inputs(sim, scales, tau)
    return _ext().multiscale_cdam_map(ps, idx, wts, sim.shape[2] * sim.shape[3], float(alpha))


def multiscale_cdam_attention(sim, v, scales, tau, alpha, mode, memory_budget):
    ps, idx, wts = multiscale_inputs(sim, scales, tau)
    materialize = use_materialize(mode, materialized_bytes(ps), memory_budget)
    return _ext().multiscale_cdam_attention(ps, idx, wts, _f32(v), float(alpha), materialize).to(v.dtype)


def jsd_attention(p, v, tau, q):
    return _ext().jsd_attention(_f32(p), _f32(v), float(tau), _f32(q)).to(v.dtype)
