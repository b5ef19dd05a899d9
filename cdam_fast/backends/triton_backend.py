"""Triton backend: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests only).

The CDAM ops describe their scales as a ScaleSet for the two-pass kernels; pairwise_jsd and
jsd_attention call their launchers. The *_train methods are the training forwards, which also
return the per-row statistics its backward reads (saved_stats). The launchers
(cdam_fast.kernels.*) assume contiguous tensors and are not part of this backend's interface:
the methods below make their inputs contiguous first. Its backward: the fused kernels of
kernels/jsd_backward.py, kernels/cdam_backward.py and kernels/multiscale_backward.py.

Host-side work here is O(N (C + D)) preparation: class-major copies, row entropy terms,
bilinear tap tables and the small-grid divergences of the multi-scale op.
"""
from __future__ import annotations

import torch

from .. import memory
from ..grids import scale_grid
from ..kernels import cdam as _cdam
from ..kernels import cdam_backward as _cdam_backward
from ..kernels import common as _common
from ..kernels import jsd as _jsd
from ..kernels import jsd_attention as _jsd_attention
from ..kernels import jsd_backward as _jsd_backward
from ..kernels import multiscale_backward as _ms_backward
from ..opdefs.multiscale import resize_vjp
from ..opspec import COMPOSITE_BACKWARD_OPS, OPS
from .base import INT32_MAX, Backend, cdiv, limit_reason
from .shared import materialized_bytes, multiscale_inputs

def _contiguous(t):
    return None if t is None else t.contiguous()


class TritonBackend(Backend):
    """Limits of the current kernels: every launch is one-dimensional (kernels/common.flat_grid),
    so the programs of a launch (counted with the smallest tile, MIN_TILE) must stay below
    2^31 - 1; the bilinear tap indices (slot * 4) are int32. Element offsets are 64-bit."""

    name = "triton"
    devices = ("cuda",)
    ops = ("pairwise_jsd", "cdam_map", "cdam_attention", "multiscale_cdam_map", "multiscale_cdam_attention",
           "jsd_attention")
    backward_ops = ("pairwise_jsd", "cdam_map", "cdam_attention", "multiscale_cdam_map", "multiscale_cdam_attention",
                    "jsd_attention")
    saved_stats = {"cdam_attention": OPS["cdam_attention"].stats_format,
                   "jsd_attention": OPS["jsd_attention"].stats_format}
    max_tap_entries = INT32_MAX

    def device_reason(self, device):
        if device.type == "cuda":
            return "TRITON_INTERPRET=1 is set, so Triton runs CPU tensors only" if _common.INTERPRETED else None
        if device.type == "cpu" and _common.INTERPRETED:
            return None
        return f"Triton needs CUDA tensors (got {device.type}; CPU tensors run only under TRITON_INTERPRET=1)"

    def unavailable_reason(self, device, dtype):
        return self.dtype_reason(dtype) or self.device_reason(device)

    def limit_reasons(self, op, call):
        B, N, M, D = call.batch, call.tokens(), call.keys(), call.width()
        tile = _common.MIN_TILE
        tiles = cdiv(N, tile) * max(cdiv(M, tile), cdiv(D, tile) if D else 1)
        return limit_reason("programs per launch", B * tiles, _common.MAX_GRID_X, "one-dimensional launch grid")

    def backward_limit_reasons(self, op, call):
        """Every backward kernel launches one program per row block of one side (flat
        one-dimensional grids); the composite ops also recompute J with pairwise_jsd (one program
        per tile pair)."""
        B, N, M = call.batch, call.tokens(), call.keys()
        programs = B * cdiv(max(N, M), _common.MIN_TILE)
        if op in COMPOSITE_BACKWARD_OPS:
            programs = max(programs, B * cdiv(N, _common.MIN_TILE) ** 2)
        return limit_reason("programs per backward launch", programs, _common.MAX_GRID_X,
                            "one-dimensional launch grid")

    # -- forward -------------------------------------------------------------------------------

    def pairwise_jsd(self, p, q):
        return _jsd.pairwise_jsd(p.contiguous(), _contiguous(q))

    def jsd_attention(self, p, v, tau, q):
        return _jsd_attention.jsd_attention(p.contiguous(), v.contiguous(), tau, _contiguous(q))

    def jsd_attention_train(self, p, v, tau, q):
        """(out, lse): the forward kernel also writes the row log-sum-exp the backward needs."""
        return _jsd_attention.jsd_attention(p.contiguous(), v.contiguous(), tau, _contiguous(q), with_lse=True)

    def cdam_map(self, p, alpha):
        B, N, C = p.shape
        sc = _cdam.ScaleSet(B, N, C, p.device, _full_scale(p.contiguous(), True), [], [1.0])
        return _cdam.cdam_apply(sc, alpha, None)

    def cdam_attention(self, p, v, alpha, mode, memory_budget, save_stats=False):
        B, N, C = p.shape
        keep = memory.materialize(mode, memory.materialized_bytes(B, [N]), memory_budget)
        sc = _cdam.ScaleSet(B, N, C, p.device, _full_scale(p.contiguous(), keep), [], [1.0])
        return _cdam.cdam_apply(sc, alpha, v.contiguous(), save_stats=save_stats)

    def cdam_attention_train(self, p, v, alpha, mode, memory_budget):
        """(out, [4, B, N] row max, min and their tie counts of J) for the backward."""
        return self.cdam_attention(p, v, alpha, mode, memory_budget, save_stats=True)

    def multiscale_cdam_map(self, sim, scales, tau, alpha):
        return _cdam.cdam_apply(_multiscale(sim, scales, tau, "materialize", 0), alpha, None)

    def multiscale_cdam_attention(self, sim, v, scales, tau, alpha, mode, memory_budget):
        return _cdam.cdam_apply(_multiscale(sim, scales, tau, mode, memory_budget), alpha, v.contiguous())

    # -- backward ------------------------------------------------------------------------------

    def pairwise_jsd_backward(self, grad, p, q, *, needs=None, stats=None):
        return _jsd_backward.pairwise_jsd_backward(grad, p, q, need_q=needs is None or needs[1])

    def cdam_attention_backward(self, grad, p, v, alpha, mode, memory_budget, *, needs=None, stats=None):
        return _cdam_backward.cdam_attention_backward(grad, p, v, alpha, stats=stats,
                                                      need_p=needs is None or needs[0])

    def cdam_map_backward(self, grad, p, alpha, *, needs=None, stats=None):
        """The single-scale map: its J materialised (as the map is), taken as a scale onto itself."""
        return (_ms_backward.cdam_map_backward(grad, p, alpha),)

    def multiscale_cdam_map_backward(self, grad, sim, scales, tau, alpha, *, needs=None, stats=None):
        return (_multiscale_backward(grad, sim, scales, tau, alpha)[0],)

    def multiscale_cdam_attention_backward(self, grad, sim, v, scales, tau, alpha, mode, memory_budget, *, needs=None,
                                           stats=None):
        """mode / memory_budget do not change the backward: it holds the smaller grids'
        divergences and their gradients, and O(N (C + D)) besides."""
        return _multiscale_backward(grad, sim, scales, tau, alpha, v)

    def jsd_attention_backward(self, grad, p, v, tau, q, *, needs=None, stats=None):
        need_pq = needs is None or needs[0] or (q is not None and needs[2])
        return _jsd_backward.jsd_attention_backward(grad, p, v, q, tau, lse=stats, need_p=need_pq)


def _full_scale(p: torch.Tensor, materialize: bool):
    if materialize:
        return ("materialized", _jsd.pairwise_jsd(p, None))
    pT, _, rp, _, w = _jsd.operands(p, None)
    return ("recompute", pT, rp, w)


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


# The fused multi-scale backward's host-side steps on the similarity grid (its kernels:
# kernels/multiscale_backward.py).

def _softmax_vjp(ps: torch.Tensor, gps: torch.Tensor, tau: float) -> torch.Tensor:
    """Adjoint of softmax over classes of (S - max S) / tau at P = ps (float64 here)."""
    return ps * (gps - (ps * gps).sum(-1, keepdim=True)) / tau


def _grid_grad(gp: torch.Tensor, p: torch.Tensor, tau: float, hw, full_hw) -> torch.Tensor:
    """The sim gradient of one scale from its distributions' gradient gp [B, n, C] (float64)."""
    B, _, C = p.shape
    gz = _softmax_vjp(p.double(), gp, tau).transpose(1, 2).reshape(B, C, *hw)
    return gz if tuple(hw) == tuple(full_hw) else resize_vjp(gz, full_hw)


def _multiscale_backward(grad, sim, scales, tau, alpha, v=None):
    """(gradient of sim in float64, gv or None) of multiscale_cdam_attention (v given: the full
    grid through cdam_attention's fused backward) or of multiscale_cdam_map (grad the map's
    gradient: the full grid's J materialised, as the map is, and taken as a scale onto itself)."""
    B, C, h, w = sim.shape
    N, S = h * w, len(scales)
    ps, idx, wts = multiscale_inputs(sim.contiguous(), scales, tau)
    full = [p for p, i in zip(ps, idx) if i is None]
    items = [(p, i, wt, scale_grid(h, w, s)) for p, i, wt, s in zip(ps, idx, wts, scales) if i is not None]
    weights = [1.0 / S] * len(items)
    g32 = grad.float().contiguous()
    gsim = torch.zeros(sim.shape, dtype=torch.float64, device=sim.device)
    gv = None
    if full and v is not None:  # identical full-grid scales: one backward with their summed weight
        gp1, gv = _cdam_backward.cdam_attention_backward(g32 * (len(full) / S), full[0], v.float().contiguous(), alpha)
        gsim += _grid_grad(gp1, full[0], tau, (h, w), (h, w))
    elif full:
        items.insert(0, (full[0], *_ms_backward._identity_taps(N, sim.device), (h, w)))
        weights.insert(0, len(full) / S)
    if not items:
        return gsim, gv
    djs, gv_small = _ms_backward._scales_backward([(_jsd.pairwise_jsd(p, None), i, wt) for p, i, wt, _ in items],
                                                 weights, B, N, C, alpha, g32,
                                                 None if v is None else v.float().contiguous())
    if gv_small is not None:
        gv = gv_small if gv is None else gv + gv_small
    for (p, _, _, hw), dj in zip(items, djs):
        gsim += _grid_grad(_ms_backward._divergence_grad(dj, p, alpha), p, tau, hw, (h, w))
    return gsim, gv
