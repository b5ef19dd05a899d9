"""The pure-torch reference as a backend: any device, any float dtype, any size.

The attention ops follow the shared memory policy with bounded blocks of query rows: every
CDAM transform is row-local (each row's min-max over all keys), so a block of query rows can be
evaluated against all keys, transformed and multiplied with v on its own. ``mode="materialize"``
evaluates the whole map at once (cdam_fast.reference's definition, several N x N temporaries);
``"recompute"`` and ``"auto"`` size the blocks so their temporaries stay within
``memory_budget`` (at least one row per block), and use the whole-map definition when it fits.
The multi-scale op keeps the small grids' divergences in every mode, as the fast backends do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import grids
from .. import reference as ref


def unavailable_reason(device, dtype):
    return None


def not_supported_reasons(call) -> list[str]:
    return []


pairwise_jsd = ref.pairwise_jsd
cdam_map = ref.cdam_map
multiscale_cdam_map = ref.multiscale_cdam_map
jsd_attention = ref.jsd_attention
jsd_attention_train = ref.jsd_attention_train

# Values of (query row, key) size a block holds at once: J, X, the map and the transform's
# temporaries, plus the four gathered tap rows of a small grid.
TEMPS_PER_PAIR = 12


def block_rows(N: int, itemsize: int, mode: str, memory_budget: int) -> int:
    """Query rows per block for one batch element (N: all of them)."""
    if mode == "materialize":
        return N
    return max(1, min(N, memory_budget // max(1, TEMPS_PER_PAIR * N * itemsize)))


def _self_rows(p: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """Rows i0:i1 of J(p, p) for one batch element p [N, C], diagonal exactly 0 as in the reference."""
    j = ref.pairwise_jsd(p[None, i0:i1], p[None])[0]
    rows = torch.arange(i0, i1, device=p.device)
    j[rows - i0, rows] = 0.0
    return j


def cdam_attention(p, v, alpha, mode, memory_budget):
    B, N, _ = p.shape
    dt = ref.compute_dtype(p)
    rows = block_rows(N, dt.itemsize, mode, memory_budget)
    if rows >= N:
        return ref.cdam_attention(p, v, alpha)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    for b in range(B):
        vb = v[b].to(dt)
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            a = ref.minmax_expm1(_self_rows(p[b], i0, i1), alpha)
            out[b, i0:i1] = (a @ vb).to(v.dtype)
    return out


def _upsampled_rows(js: torch.Tensor, hs: int, ws: int, h: int, w: int, idx, wts, i0: int, i1: int):
    """Rows i0:i1 (full-grid queries) of a small grid's upsampled divergences, from js [n_s, n_s]:
    bilinear along the keys (as reference._upsample_pairs), then the queries' four bilinear taps."""
    src = idx[i0:i1].long()  # [r, 4] small-grid query rows
    keys = F.interpolate(js[src.reshape(-1)].reshape(-1, 1, hs, ws), size=(h, w), mode="bilinear",
                         align_corners=False).reshape(i1 - i0, 4, h * w)
    return (wts[i0:i1, :, None].to(keys.dtype) * keys).sum(1)


def _taps(h: int, w: int, hs: int, ws: int, device):
    """grids.bilinear_taps_2d with float64 weights (the float64 reference must not round them)."""
    y0, y1, wy0, wy1 = grids.bilinear_taps_1d(h, hs, device)
    x0, x1, wx0, wx1 = grids.bilinear_taps_1d(w, ws, device)
    ys, wys = torch.stack([y0, y0, y1, y1], -1), torch.stack([wy0, wy0, wy1, wy1], -1)
    xs, wxs = torch.stack([x0, x1, x0, x1], -1), torch.stack([wx0, wx1, wx0, wx1], -1)
    return (ys[:, None, :] * ws + xs[None, :, :]).reshape(h * w, 4), (wys[:, None, :] * wxs[None, :, :]).reshape(h * w, 4)


def multiscale_cdam_attention(sim, v, scales, tau, alpha, mode, memory_budget):
    B, C, h, w = sim.shape
    N = h * w
    dt = ref.compute_dtype(sim)
    rows = block_rows(N, dt.itemsize, mode, memory_budget)
    if rows >= N:
        return ref.multiscale_cdam_attention(sim, v, scales, tau, alpha)
    # per scale: full grid -> its distributions; smaller grid -> its (kept) divergences and taps
    levels = []
    for s in scales:
        hs, ws = grids.scale_grid(h, w, s)
        ps = grids.class_distributions(sim, hs, ws, tau)
        if (hs, ws) == (h, w):
            levels.append(("full", ps))
        else:
            idx, wts = _taps(h, w, hs, ws, sim.device)
            levels.append(("small", ref.pairwise_jsd(ps), hs, ws, idx, wts))
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    for b in range(B):
        vb = v[b].to(dt)
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            total = None
            for lv in levels:
                if lv[0] == "full":
                    u = _self_rows(lv[1][b], i0, i1)
                else:
                    _, js, hs, ws, idx, wts = lv
                    u = _upsampled_rows(js[b], hs, ws, h, w, idx, wts, i0, i1)
                a = ref.minmax_expm1(u, alpha)
                total = a if total is None else total + a
            out[b, i0:i1] = ((total / len(scales)) @ vb).to(v.dtype)
    return out
