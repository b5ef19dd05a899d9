"""Fused backward of multiscale_cdam_attention (docs/autograd.md, sections 2 and 3) in Triton.

Every scale's map gets the same gradient, dM / S. The full-grid scale is cdam_attention's fused
backward (kernels/cdam_backward.py) with g scaled by its weight: its p gradient, and its gv
(A_1^T g w). The smaller scales share three passes over the full grid's [N, N] tiles, each tile
of a scale's upsampled divergences rebuilt from its [n_s, n_s] divergences through the 4 x 4
bilinear taps (kernels/cdam._small_scale_tile, as the forward), so no upsampled map exists:
  1. per row and scale: hi / lo and their tie counts (the forward's kernels/cdam.row_stats);
  2. per row and scale: the extremes' mean gX and the rest's sums (ms_small_sums_kernel), with
     gX = (g_i . v_j) dA/dX recomputed per tile (the same 3xTF32 products);
  3. per key block (ms_small_grad_kernel): G = dL/dJ_up (the tie, extremum-cancellation, J = 0
     and 2^-e rules of section 2), scattered through the transposed taps into dJ_s [n_s, n_s]
     (atomic adds), and gv_j += sum_i M_small,ij g_i on tensor cores.
Then each small grid's divergence gradient (the fused pairwise_jsd backward) and the softmax /
resize adjoints on the small grids (float64, after the 2^e unscaling). Extra memory: the smaller
grids' divergences and their gradients, plus O(N (C + D)); the mode does not change this.
The kernels and their launches are here; the host-side steps on the similarity grid (scales'
distributions, softmax and resize adjoints) are the Triton backend's
(cdam_fast/backends/triton_backend.py), so this module imports nothing above the kernels.
"""
import torch
import triton
import triton.language as tl

from .. import constants
from ..constants import gradient_exponent
from .backward_common import row_dots
from .cdam import ScaleSet, _small_scale_tile, row_stats
from .cdam_backward import accumulate_values, cdam_attention_backward, transform_derivative_scale
from .common import CONSTANT_ROW_EPS, blocks, cdam_transform, flat_grid, tile_ids
from .jsd import pairwise_jsd
from .jsd_backward import pairwise_jsd_backward

# Tiles of the small-scale passes: [BM, BN] maps, BD value columns per product step.
TILES = (32, 32, 32)
NUM_WARPS = 8


@triton.jit
def _scale(js_flat, js_off, js_n, taps_idx, taps_w, slot, b, N):
    """(J_s of batch element b, n_s, its taps onto the full grid) of small scale `slot`."""
    n_s = tl.load(js_n + slot)
    base = js_flat + tl.load(js_off + slot) + b * n_s * n_s
    tap = tl.cast(slot, tl.int64) * N * 4
    return base, n_s, taps_idx + tap, taps_w + tap


@triton.jit
def _extremes(hi, lo, slot, b, S, N, offs_m, mask_m):
    """(hi, lo, 1 / span (0 on constant rows)) [BM] of small scale `slot` from [B, S, N] tables."""
    row = (b * S + slot) * N + offs_m
    h = tl.load(hi + row, mask=mask_m, other=0.0)
    lw = tl.load(lo + row, mask=mask_m, other=0.0)
    span = h - lw
    flat = span < CONSTANT_ROW_EPS
    return h, lw, tl.where(flat, 0.0, 1.0 / tl.where(flat, 1.0, span))


@triton.jit
def _gx(u, dm, h, lw, inv, alpha_log2e, dadx_scale):
    """(t = 1 - X, exactly 0 / 1 at the row min / max, and gX = dm dA/dX 2^-e w) on a tile."""
    t = (u - lw[:, None]) * inv[:, None]
    t = tl.where(t < 0.0, 0.0, t)
    t = tl.where(u == h[:, None], 1.0, t)
    return t, dm * dadx_scale * tl.exp2(-alpha_log2e * t)


@triton.jit
def _dm(g, v, b, offs_m, offs_n, mask_m, mask_n, N, D, MAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        BD: tl.constexpr):
    """The tile of the map's gradient: read from g [B, N, N] (MAP), else g_i . v_j."""
    if MAP:
        dm = tl.load(g + b * N * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
    else:
        dm = row_dots(g + b * N * D, v + b * N * D, offs_m, offs_n, mask_m, mask_n, D, BM, BN, BD)
    return dm


@triton.jit
def ms_small_sums_kernel(js_flat, js_off, js_n, taps_idx, taps_w, weights, hi, lo, nhi, nlo, g, v, mean_hi, add_hi,
                         mean_lo, add_lo, N, D, S, alpha_log2e, dadx_scale, MAP: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BD: tl.constexpr):
    """Per row and small scale: the mean gX over the tied maxima / minima and the rest of the
    row's sums through hi (sum gX t) and lo (sum gX X), each divided by the tie count."""
    pid_m, slot, b = tile_ids(tl.cdiv(N, BM), S)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < N
    base, n_s, tidx, tw = _scale(js_flat, js_off, js_n, taps_idx, taps_w, slot, b, N)
    h, lw, inv = _extremes(hi, lo, slot, b, S, N, offs_m, mask_m)
    scale = dadx_scale * tl.load(weights + slot)
    e_hi = tl.zeros((BM,), dtype=tl.float32)
    e_lo = tl.zeros((BM,), dtype=tl.float32)
    r_hi = tl.zeros((BM,), dtype=tl.float32)
    r_lo = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < N
        u = _small_scale_tile(base, tidx, tw, offs_m, offs_n, n_s, N, BM, BN)
        dm = _dm(g, v, b, offs_m, offs_n, mask_m, mask_n, N, D, MAP, BM, BN, BD)
        t, gx = _gx(u, dm, h, lw, inv, alpha_log2e, scale)
        gx = tl.where(mask_n[None, :], gx, 0.0)
        at_hi = u == h[:, None]
        at_lo = u == lw[:, None]
        e_hi += tl.sum(tl.where(at_hi, gx, 0.0), axis=1)
        e_lo += tl.sum(tl.where(at_lo, gx, 0.0), axis=1)
        r_hi += tl.sum(tl.where(at_hi, 0.0, gx * t), axis=1)
        r_lo += tl.sum(tl.where(at_lo, 0.0, gx * (1.0 - t)), axis=1)
    row = (b * S + slot) * N + offs_m
    c_hi = tl.load(nhi + row, mask=mask_m, other=1.0)
    c_lo = tl.load(nlo + row, mask=mask_m, other=1.0)
    tl.store(mean_hi + row, e_hi / c_hi, mask=mask_m)
    tl.store(add_hi + row, r_hi / c_hi, mask=mask_m)
    tl.store(mean_lo + row, e_lo / c_lo, mask=mask_m)
    tl.store(add_lo + row, r_lo / c_lo, mask=mask_m)


@triton.jit
def ms_small_grad_kernel(js_flat, js_off, js_n, taps_idx, taps_w, weights, hi, lo, mean_hi, add_hi, mean_lo, add_lo,
                         g, v, dj_flat, gv_out, N, D, S, alpha_log2e, dadx_scale, exp_neg_alpha, factor,
                         SMALL_ALPHA: tl.constexpr, MAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BD: tl.constexpr):
    """One block of keys, all query blocks: G per scale into dJ_s through the transposed taps
    (atomic adds), and (not MAP) gv of the keys += (sum of the scales' weighted A)^T g."""
    pid_n, _unused, b = tile_ids(tl.cdiv(N, BN), 1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    for m0 in range(0, N, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < N
        valid = mask_m[:, None] & mask_n[None, :]
        dm = _dm(g, v, b, offs_m, offs_n, mask_m, mask_n, N, D, MAP, BM, BN, BD)
        a = tl.zeros((BM, BN), dtype=tl.float32)
        for slot in range(0, S):
            base, n_s, tidx, tw = _scale(js_flat, js_off, js_n, taps_idx, taps_w, slot, b, N)
            u = _small_scale_tile(base, tidx, tw, offs_m, offs_n, n_s, N, BM, BN)
            h, lw, inv = _extremes(hi, lo, slot, b, S, N, offs_m, mask_m)
            row = (b * S + slot) * N + offs_m
            weight = tl.load(weights + slot)
            t, gx = _gx(u, dm, h, lw, inv, alpha_log2e, dadx_scale * weight)
            # the extremes' own terms with their tie share, the mean first (a single extremum: exactly 0 + the rest)
            at_hi = (tl.load(mean_hi + row, mask=mask_m, other=0.0)[:, None] - gx) + tl.load(
                add_hi + row, mask=mask_m, other=0.0)[:, None]
            at_lo = (tl.load(mean_lo + row, mask=mask_m, other=0.0)[:, None] - gx) + tl.load(
                add_lo + row, mask=mask_m, other=0.0)[:, None]
            G = tl.where(u == lw[:, None], at_lo, tl.where(u == h[:, None], at_hi, -gx)) * inv[:, None]
            # J = 0 passes no gradient; constant rows none; nothing outside the grid
            G = tl.where(valid & (inv[:, None] > 0.0) & (u != 0.0), G, 0.0)
            if not MAP:
                a += weight * cdam_transform(u, h, lw, alpha_log2e, exp_neg_alpha, factor, SMALL_ALPHA)
            dj = dj_flat + tl.load(js_off + slot) + b * n_s * n_s
            for ta in range(4):
                ia = tl.load(tidx + offs_m * 4 + ta, mask=mask_m, other=0).to(tl.int64)
                wa = tl.load(tw + offs_m * 4 + ta, mask=mask_m, other=0.0)
                for tb in range(4):
                    ib = tl.load(tidx + offs_n * 4 + tb, mask=mask_n, other=0)
                    wb = tl.load(tw + offs_n * 4 + tb, mask=mask_n, other=0.0)
                    tw_ab = wa[:, None] * wb[None, :]
                    tl.atomic_add(dj + ia[:, None] * n_s + ib[None, :], tw_ab * G, mask=valid & (tw_ab != 0.0))
        if not MAP:
            aT = tl.trans(tl.where(valid, a, 0.0))
            accumulate_values(aT, g + b * N * D, gv_out + b * N * D, offs_m, offs_n, mask_m, mask_n, D, BD)


def _identity_taps(N: int, device):
    """Taps of a grid onto itself (the full grid as a materialised scale): u = J exactly."""
    idx = torch.arange(N, device=device, dtype=torch.int32)[:, None].expand(N, 4).contiguous()
    wts = torch.zeros(N, 4, device=device, dtype=torch.float32)
    wts[:, 0] = 1.0
    return idx, wts


def _scales_backward(items, weights, B, N, C, alpha, g, v=None):
    """The passes of the module docstring over scales given as (J [B, n, n], taps idx / wts onto
    the full grid): the gradients of their J (the 2^-e scaled G, in their J's layout) and, with
    v, gv of those scales' maps. g: [B, N, D] with v, else the map's gradient [B, N, N]."""
    device = g.device
    sc = ScaleSet(B, N, C, device, None, items, weights)
    K = len(items)
    hi, lo, nhi, nlo = row_stats(sc, count_ties=True).unbind(0)  # [B, K, N] each, the forward's pass 1
    sums = torch.empty(4, B, K, N, dtype=torch.float32, device=device)
    alpha_log2e, exp_neg_alpha, factor, small_alpha = constants.transform_factors(alpha)
    dadx = transform_derivative_scale(alpha)
    D = 1 if v is None else v.shape[2]
    bm, bn, bd = TILES
    BM, BN, BD = blocks(N, bm), blocks(N, bn), blocks(D, bd)
    common = (sc.js_flat, sc.js_off, sc.js_n, sc.taps_idx, sc.taps_w, sc.weights)
    vv = g if v is None else v
    ms_small_sums_kernel[flat_grid(triton.cdiv(N, BM), K, B)](*common, hi, lo, nhi, nlo, g, vv, *sums.unbind(0), N,
                                                              D, K, alpha_log2e, dadx, MAP=v is None, BM=BM, BN=BN,
                                                              BD=BD, num_warps=NUM_WARPS)
    dj_flat = torch.zeros_like(sc.js_flat)
    gv = torch.zeros(B, N, D, dtype=torch.float32, device=device) if v is not None else dj_flat
    ms_small_grad_kernel[flat_grid(triton.cdiv(N, BN), 1, B)](*common, hi, lo, *sums.unbind(0), g, vv, dj_flat, gv, N,
                                                              D, K, alpha_log2e, dadx, exp_neg_alpha, factor,
                                                              SMALL_ALPHA=small_alpha, MAP=v is None, BM=BM, BN=BN,
                                                              BD=BD, num_warps=NUM_WARPS)
    djs, offset = [], 0
    for j, _, _ in items:
        n = j.shape[1]
        djs.append(dj_flat[offset:offset + B * n * n].view(B, n, n))
        offset += B * n * n
    return djs, (gv if v is not None else None)


def _divergence_grad(dj, p, alpha) -> torch.Tensor:
    """p's gradient (float64) from dJ carrying the kernels' 2^-e."""
    return pairwise_jsd_backward(dj, p, None)[0].double() * 2.0 ** gradient_exponent(alpha)


def cdam_map_backward(grad, p, alpha):
    """The single-scale map: its J materialised (as the map is), taken as a scale onto itself."""
    B, N, C = p.shape
    pf = p.float().contiguous()
    djs, _ = _scales_backward([(pairwise_jsd(pf, None), *_identity_taps(N, p.device))], [1.0], B, N, C, alpha,
                              grad.float().contiguous())
    return _divergence_grad(djs[0], pf, alpha)


def offline_cases() -> dict:
    """name -> (kernel, signature, constexprs, num_warps) at the GPU tile sizes."""
    f32, i32, i64, s = "*fp32", "i32", "*i64", "fp32"
    taps = {"js_flat": f32, "js_off": i64, "js_n": "*i32", "taps_idx": "*i32", "taps_w": f32, "weights": f32}
    tiles = dict(zip(("BM", "BN", "BD"), TILES))
    sums = {k: f32 for k in ("mean_hi", "add_hi", "mean_lo", "add_lo")}
    cases = {}
    for mapped in (False, True):
        kind = "map" if mapped else "attention"
        cases[f"ms_small_sums[{kind}]"] = (
            ms_small_sums_kernel, {**taps, "hi": f32, "lo": f32, "nhi": f32, "nlo": f32, "g": f32, "v": f32, **sums,
                                   "N": i32, "D": i32, "S": i32, "alpha_log2e": s, "dadx_scale": s},
            {"MAP": mapped, **tiles}, NUM_WARPS)
        for small in (False, True):
            cases[f"ms_small_grad[{kind}, {'small_alpha' if small else 'default'}]"] = (
                ms_small_grad_kernel, {**taps, "hi": f32, "lo": f32, **sums, "g": f32, "v": f32, "dj_flat": f32,
                                       "gv_out": f32, "N": i32, "D": i32, "S": i32, "alpha_log2e": s,
                                       "dadx_scale": s, "exp_neg_alpha": s, "factor": s},
                {"SMALL_ALPHA": small, "MAP": mapped, **tiles}, NUM_WARPS)
    return cases
