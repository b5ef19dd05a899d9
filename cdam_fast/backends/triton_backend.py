"""Triton backend: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests only).

pairwise_jsd and jsd_attention are the kernel launchers themselves; the CDAM ops describe
their scales as a ScaleSet for the two-pass kernels.

Host-side work here is O(N (C + D)) preparation: class-major copies, row entropy terms,
bilinear tap tables and the small-grid divergences of the multi-scale op.
"""
from __future__ import annotations

import torch

from ..kernels import common
from ..kernels.cdam import ScaleSet, cdam_apply
from ..kernels.jsd import operands
from ..kernels.jsd import pairwise_jsd
from ..kernels.jsd_attention import jsd_attention  # noqa: F401  (this backend's op, as is)
from .shared import dtype_reason, materialized_bytes, multiscale_inputs, use_materialize


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if why := dtype_reason(dtype):
        return why
    if device.type == "cuda":
        if common.INTERPRETED:
            return "TRITON_INTERPRET=1 is set, so Triton runs CPU tensors only"
        return None
    if device.type == "cpu" and common.INTERPRETED:
        return None
    return f"Triton needs CUDA tensors (got {device.type}; CPU tensors run only under TRITON_INTERPRET=1)"


def _full_scale(p: torch.Tensor, materialize: bool):
    if materialize:
        return ("materialized", pairwise_jsd(p, None))
    pT, _, rp, _, w = operands(p, None)
    return ("recompute", pT, rp, w)


def cdam_map(p, alpha):
    B, N, C = p.shape
    sc = ScaleSet(B, N, C, p.device, _full_scale(p, True), [], [1.0])
    return cdam_apply(sc, alpha, None)


def cdam_attention(p, v, alpha, mode, memory_budget):
    B, N, C = p.shape
    sc = ScaleSet(B, N, C, p.device, _full_scale(p, use_materialize(mode, 4 * B * N * N, memory_budget)), [], [1.0])
    return cdam_apply(sc, alpha, v)


def _multiscale(sim, scales, tau, mode, memory_budget):
    B, C, h, w = sim.shape
    ps, idx, wts = multiscale_inputs(sim, scales, tau)
    full = [p for p, i in zip(ps, idx) if i is None]
    # the small grids' divergences are always kept (~1.07 N^2 floats at the default scales);
    # the budget decides only the full grid's
    small = [(pairwise_jsd(p, None), i, wt) for p, i, wt in zip(ps, idx, wts) if i is not None]
    materialize = use_materialize(mode, materialized_bytes(full[:1]), memory_budget)
    weights = ([len(full)] if full else []) + [1.0] * len(small)
    return ScaleSet(B, h * w, C, sim.device, _full_scale(full[0], materialize) if full else None, small,
                    [x / len(scales) for x in weights])


def multiscale_cdam_map(sim, scales, tau, alpha):
    return cdam_apply(_multiscale(sim, scales, tau, "materialize", 0), alpha, None)


def multiscale_cdam_attention(sim, v, scales, tau, alpha, mode, memory_budget):
    return cdam_apply(_multiscale(sim, scales, tau, mode, memory_budget), alpha, v)
