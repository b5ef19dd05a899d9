"""multiscale_cdam_map and multiscale_cdam_attention: the mean over scales of the single-scale
CDAM maps of class distributions pooled from raw similarity grids (spec section 2), and that map
@ v. Their specifications, pure-torch references (whole-map, and in bounded blocks of query rows)
and backward formulas (docs/autograd.md, section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import grids
from ..grids import class_distributions, scale_grid
from . import pairwise_jsd as jsd
from .cdam import block_rows, divergence_kernels, divergence_grad, minmax_expm1, self_rows
from .spec import SCHEMA_TAIL, OpSpec, compute_dtype, pair_shape, value_shape
from .vjp import product_vjp, scaled_vjp


def _upsample_pairs(j: torch.Tensor, hs: int, ws: int, h: int, w: int) -> torch.Tensor:
    """[B, n_s, n_s] -> [B, N, N]: bilinear along the key axis, then along the query axis."""
    B, n, _ = j.shape
    up = lambda t: F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)  # noqa: E731
    keys = up(j.reshape(B * n, 1, hs, ws)).reshape(B, n, h * w)
    both = up(keys.transpose(1, 2).reshape(B * h * w, 1, hs, ws)).reshape(B, h * w, h * w)
    return both.transpose(1, 2)  # [query, key] order: row i belongs to full-grid query i


def multiscale_cdam_map(sim: torch.Tensor, scales=None, tau: float = 0.1, alpha: float = 10.0) -> torch.Tensor:
    from ..grids import CDAM_SCALES

    scales = CDAM_SCALES if scales is None else scales
    B, C, h, w = sim.shape
    total = None
    for s in scales:
        hs, ws = scale_grid(h, w, s)
        j = jsd.pairwise_jsd(class_distributions(sim, hs, ws, tau))
        if (hs, ws) != (h, w):
            j = _upsample_pairs(j, hs, ws, h, w)
        a = minmax_expm1(j, alpha)
        total = a if total is None else total + a
    return total / len(scales)


def multiscale_cdam_attention(sim, v, scales=None, tau: float = 0.1, alpha: float = 10.0) -> torch.Tensor:
    a = multiscale_cdam_map(sim, scales, tau, alpha)
    return (a @ v.to(a.dtype)).to(v.dtype)


# The reference under the memory policy (what the reference backend runs).

def _upsampled_rows(js: torch.Tensor, hs: int, ws: int, h: int, w: int, idx, wts, i0: int, i1: int):
    """Rows i0:i1 (full-grid queries) of a small grid's upsampled divergences, from js [n_s, n_s]:
    bilinear along the keys (as _upsample_pairs), then the queries' four bilinear taps."""
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


def multiscale_cdam_attention_bounded(sim, v, scales, tau, alpha, mode, memory_budget):
    """multiscale_cdam_attention under the memory policy: bounded blocks of full-grid query rows
    unless the whole map fits; the small grids' divergences are kept in every mode, as the fast
    backends keep them."""
    B, C, h, w = sim.shape
    N = h * w
    dt = compute_dtype(sim)
    rows = block_rows(N, dt.itemsize, mode, memory_budget)
    if rows >= N:
        return multiscale_cdam_attention(sim, v, scales, tau, alpha)
    # per scale: full grid -> its distributions; smaller grid -> its (kept) divergences and taps
    levels = []
    for s in scales:
        hs, ws = grids.scale_grid(h, w, s)
        ps = grids.class_distributions(sim, hs, ws, tau)
        if (hs, ws) == (h, w):
            levels.append(("full", ps))
        else:
            idx, wts = _taps(h, w, hs, ws, sim.device)
            levels.append(("small", jsd.pairwise_jsd(ps), hs, ws, idx, wts))
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    for b in range(B):
        vb = v[b].to(dt)
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            total = None
            for lv in levels:
                if lv[0] == "full":
                    u = self_rows(lv[1][b], i0, i1)
                else:
                    _, js, hs, ws, idx, wts = lv
                    u = _upsampled_rows(js[b], hs, ws, h, w, idx, wts, i0, i1)
                a = minmax_expm1(u, alpha)
                total = a if total is None else total + a
            out[b, i0:i1] = ((total / len(scales)) @ vb).to(v.dtype)
    return out


# Backward (docs/autograd.md, section 3).

def resize_vjp(g: torch.Tensor, in_hw: tuple[int, int]) -> torch.Tensor:
    """Adjoint of F.interpolate(x, size=g.shape[-2:], mode="bilinear", align_corners=False)."""
    n, c, h, w = g.shape
    return torch.ops.aten.upsample_bilinear2d_backward(g.contiguous(), [h, w], [n, c, *in_hw], False, None, None)


def _multiscale_map_vjp(sim: torch.Tensor, ga: torch.Tensor, scales, tau: float, alpha: float, divergence,
                        divergence_vjp) -> torch.Tensor:
    """Gradient wrt sim of sum ga * multiscale_cdam_map(sim) (float64). Per scale, in reverse:
    min-max / expm1 (in float64), then the divergence (divergence_vjp), the adjoints of the pair
    upsampling (separable bilinear, transposed), of softmax(. / tau) over classes and of the grid
    resize. Everything after min-max / expm1 is linear in its gradient and runs in the compute
    dtype under one power-of-two scale per scale and batch element (scaled_vjp).
    Memory: a few [B, N, N] maps at a time (J upsampled, its gradient, the adjoint's transposes)."""
    B, C, h, w = sim.shape
    n_full = h * w
    dt = ga.dtype
    gsim = torch.zeros(sim.shape, dtype=torch.float64, device=sim.device)
    ga = ga / len(scales)
    x = sim.to(dt)
    for s in scales:
        hs, ws = scale_grid(h, w, s)
        n = hs * ws
        ps = class_distributions(x, hs, ws, tau)  # [B, n, C]
        js = divergence(ps).to(dt)
        same = (hs, ws) == (h, w)
        gju = divergence_grad(js if same else _upsample_pairs(js, hs, ws, h, w), ga, alpha)  # [B, N, N]

        def chain(gju, ps=ps, hs=hs, ws=ws, n=n, same=same):
            if same:
                gjs = gju
            else:
                # forward: keys = up(js rows) [B, n, N]; both = up(keys^T rows) [B, N(key), N(query)]; out = both^T
                g_both = gju.transpose(1, 2).reshape(B * n_full, 1, h, w)
                g_keys = resize_vjp(g_both, (hs, ws)).reshape(B, n_full, n).transpose(1, 2)  # [B, n, N]
                gjs = resize_vjp(g_keys.reshape(B * n, 1, h, w), (hs, ws)).reshape(B, n, n)
            gps = divergence_vjp(gjs, ps).to(gjs.dtype)
            # softmax over classes of the resized grid / tau
            gz = ps * (gps - (ps * gps).sum(-1, keepdim=True)) / tau  # [B, n, C]
            gz = gz.transpose(1, 2).reshape(B, C, hs, ws)
            return gz if same else resize_vjp(gz, (h, w))

        gsim += scaled_vjp(chain, gju, dt)
    return gsim


def multiscale_cdam_map_backward(grad, sim, scales, tau, alpha, *, needs=None, stats=None, kernels=None):
    """(gsim,): a composite over the divergence (kernels: cdam.divergence_kernels)."""
    divergence, divergence_vjp = divergence_kernels(kernels)
    return (_multiscale_map_vjp(sim, grad.to(compute_dtype(sim, grad)), scales, tau, alpha, divergence,
                                divergence_vjp),)


def multiscale_cdam_attention_backward(grad, sim, v, scales, tau, alpha, mode=None, memory_budget=None, *, needs=None,
                                       stats=None, kernels=None):
    """(gsim, gv): A comes from the backend's multi-scale map forward (kernels.multiscale_cdam_map)
    for gv = A^T g, then the map's composite backward (gsim None when only v's is needed)."""
    divergence, divergence_vjp = divergence_kernels(kernels)
    cdam_map = multiscale_cdam_map if kernels is None else kernels.multiscale_cdam_map
    need_sim = needs is None or needs[0]
    dt = compute_dtype(sim, v, grad)
    a = cdam_map(sim.to(dt), tuple(scales), tau, alpha).to(dt)
    ga, gv = product_vjp(a, v, grad, need_sim)
    del a  # one N x N map fewer during the map's backward
    if not need_sim:
        return None, gv
    return _multiscale_map_vjp(sim, ga, scales, tau, alpha, divergence, divergence_vjp), gv


SPECS = (
    OpSpec("multiscale_cdam_map", ("sim", "scales", "tau", "alpha"),
           "(Tensor sim, float[] scales, float tau, float alpha, " + SCHEMA_TAIL, (), ("sim",), pair_shape, True,
           multiscale_cdam_map, multiscale_cdam_map_backward, multiscale=True, tensor_names=("sim",),
           composite_backward=True),
    OpSpec("multiscale_cdam_attention", ("sim", "v", "scales", "tau", "alpha", "mode", "memory_budget"),
           "(Tensor sim, Tensor v, float[] scales, float tau, float alpha, str mode, int memory_budget, "
           + SCHEMA_TAIL, (), ("sim", "v"), value_shape, False, multiscale_cdam_attention,
           multiscale_cdam_attention_backward, has_mode=True, multiscale=True, tensor_names=("sim", "v"),
           bounded=multiscale_cdam_attention_bounded, composite_backward=True),
)
