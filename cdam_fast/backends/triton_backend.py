"""Triton backend: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests only).

The CDAM ops describe their scales as a ScaleSet for the two-pass kernels; pairwise_jsd and
jsd_attention call their launchers. The *_train functions are the training forwards, which also
return the per-row statistics the backward reuses (cdam_fast.opspec.OpSpec.saved_stats). The
launchers (cdam_fast.kernels.*) assume contiguous tensors and are not part of this backend's
interface: the functions below make their inputs contiguous first.

Host-side work here is O(N (C + D)) preparation: class-major copies, row entropy terms,
bilinear tap tables and the small-grid divergences of the multi-scale op.
"""
from __future__ import annotations

import torch

from .. import memory
from ..kernels import cdam as _cdam
from ..kernels import common as _common
from ..kernels import jsd as _jsd
from ..kernels import jsd_attention as _jsd_attention
from .shared import INT32_MAX, cdiv, dtype_reason, limit_reason, materialized_bytes, multiscale_inputs


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if why := dtype_reason(dtype):
        return why
    if device.type == "cuda":
        if _common.INTERPRETED:
            return "TRITON_INTERPRET=1 is set, so Triton runs CPU tensors only"
        return None
    if device.type == "cpu" and _common.INTERPRETED:
        return None
    return f"Triton needs CUDA tensors (got {device.type}; CPU tensors run only under TRITON_INTERPRET=1)"


def not_supported_reasons(call) -> list[str]:
    """Limits of the current kernels: every launch is one-dimensional (kernels/common.flat_grid),
    so the programs of a launch (counted here with the smallest tile, 16) must stay below
    2^31 - 1; the bilinear tap indices (slot * 4) are int32. Element offsets are 64-bit."""
    why = unavailable_reason(call.device, call.compute_dtype)
    if why:
        return [why]
    B, N, M, D = call.batch, call.tokens(), call.keys(), call.width()
    tiles = cdiv(N, 16) * max(cdiv(M, 16), cdiv(D, 16) if D else 1)
    reasons = limit_reason("programs per launch", B * tiles, _common.MAX_GRID_X, "one-dimensional launch grid")
    if call.tensors.get("sim") is not None:
        reasons += limit_reason("tap-table entries", 4 * N, INT32_MAX, "int32 tap indices")
    return reasons


def _full_scale(p: torch.Tensor, materialize: bool):
    if materialize:
        return ("materialized", _jsd.pairwise_jsd(p, None))
    pT, _, rp, _, w = _jsd.operands(p, None)
    return ("recompute", pT, rp, w)


def pairwise_jsd(p, q):
    return _jsd.pairwise_jsd(p.contiguous(), None if q is None else q.contiguous())


def jsd_attention(p, v, tau, q):
    return _jsd_attention.jsd_attention(p.contiguous(), v.contiguous(), tau, None if q is None else q.contiguous())


def jsd_attention_train(p, v, tau, q):
    """(out, lse): the forward kernel also writes the row log-sum-exp the backward needs."""
    return _jsd_attention.jsd_attention(p.contiguous(), v.contiguous(), tau, None if q is None else q.contiguous(),
                                        with_lse=True)


def cdam_map(p, alpha):
    B, N, C = p.shape
    sc = _cdam.ScaleSet(B, N, C, p.device, _full_scale(p.contiguous(), True), [], [1.0])
    return _cdam.cdam_apply(sc, alpha, None)


def cdam_attention(p, v, alpha, mode, memory_budget, save_stats=False):
    B, N, C = p.shape
    keep = memory.materialize(mode, memory.materialized_bytes(B, [N]), memory_budget)
    sc = _cdam.ScaleSet(B, N, C, p.device, _full_scale(p.contiguous(), keep), [], [1.0])
    return _cdam.cdam_apply(sc, alpha, v.contiguous(), save_stats=save_stats)


def cdam_attention_train(p, v, alpha, mode, memory_budget):
    """(out, [4, B, N] row max, min and their tie counts of J) for the backward."""
    return cdam_attention(p, v, alpha, mode, memory_budget, save_stats=True)


def _multiscale(sim, scales, tau, mode, memory_budget):
    B, C, h, w = sim.shape
    ps, idx, wts = multiscale_inputs(sim.contiguous(), scales, tau)
    full = [p for p, i in zip(ps, idx) if i is None]
    # the small grids' divergences are kept in either mode (the kernels gather from them);
    # the mode decides only the full grid's, and "auto" decides by what materialize keeps
    small = [(_jsd.pairwise_jsd(p, None), i, wt) for p, i, wt in zip(ps, idx, wts) if i is not None]
    keep = memory.materialize(mode, materialized_bytes(ps), memory_budget)
    weights = ([len(full)] if full else []) + [1.0] * len(small)
    return _cdam.ScaleSet(B, h * w, C, sim.device, _full_scale(full[0], keep) if full else None, small,
                          [x / len(scales) for x in weights])


def multiscale_cdam_map(sim, scales, tau, alpha):
    return _cdam.cdam_apply(_multiscale(sim, scales, tau, "materialize", 0), alpha, None)


def multiscale_cdam_attention(sim, v, scales, tau, alpha, mode, memory_budget):
    return _cdam.cdam_apply(_multiscale(sim, scales, tau, mode, memory_budget), alpha, v.contiguous())
