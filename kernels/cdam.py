"""CDAM maps and their product with V, single- and multi-scale, in two passes.

Each scale contributes a divergence surface U_s over the full N x N grid:
  * the full-resolution scale: J itself, either recomputed from the distributions
    (FULL_SRC = 1, O(N (C + D)) memory) or read from a materialised J buffer (FULL_SRC = 2);
  * every smaller scale: its [n_s, n_s] divergences (computed once, tiny) gathered through
    the 4 x 4 bilinear taps of query and key, so the upsampled N x N maps never exist.
Pass 1 (`row_stats_kernel`) finds each row's max/min of U_s per scale (the training forward
also counts the keys attaining them and returns all four for the backward); pass 2
(`cdam_product_kernel`) rebuilds each tile, applies the expm1 transform, averages the scales
and multiplies with V on tensor cores (or writes the map when WRITE_MAP).
"""
import torch
import triton
import triton.language as tl

from .. import constants
from .common import NARROW_TILES, blocks, cdam_transform, fast_log, flat_grid, jsd_tile, merge_row_extremes, poly_logs, \
    product, tile_ids, value_tiles


@triton.jit
def _small_scale_tile(js, taps_idx, taps_w, offs_m, offs_n, n_s, N, BM: tl.constexpr, BN: tl.constexpr):
    """U_s[i, k] = sum_a sum_b w[i, a] w[k, b] J_s[idx[i, a], idx[k, b]] for one tile."""
    mask_m = offs_m < N
    mask_n = offs_n < N
    u = tl.zeros((BM, BN), dtype=tl.float32)
    for a in range(4):  # a rolled loop keeps one gather in flight: unrolled, 16 spill
        ia = tl.load(taps_idx + offs_m * 4 + a, mask=mask_m, other=0)
        wa = tl.load(taps_w + offs_m * 4 + a, mask=mask_m, other=0.0)
        # row pointers in 64 bits: ia * n_s passes 2^31 once n_s >= 46341 (N = 65536 at scale 0.87)
        rows = js + ia.to(tl.int64) * n_s
        row = tl.zeros((BM, BN), dtype=tl.float32)
        for b in range(4):
            ib = tl.load(taps_idx + offs_n * 4 + b, mask=mask_n, other=0)
            wb = tl.load(taps_w + offs_n * 4 + b, mask=mask_n, other=0.0)
            row += wb[None, :] * tl.load(rows[:, None] + ib[None, :])
        u += wa[:, None] * row
    return u


@triton.jit
def _scale_tile(slot, b, pT, rp, wc, jfull, js_flat, js_off, js_n, taps_idx, taps_w, m0, n0, offs_m, offs_n, N, C,
                FULL_SRC: tl.constexpr, MULTI: tl.constexpr, FAST_LOG: tl.constexpr, POLY_LOGS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
    """The [BM, BN] tile of U for scale `slot` (slot 0 is the full scale when FULL_SRC > 0).

    MULTI (any small scale present) is a constexpr so the single-scale kernels carry no gather
    code: it would cost them registers they need for the product.
    """
    if MULTI:
        k = slot
        if FULL_SRC > 0:
            k = slot - 1
        if k < 0:
            u = _full_tile(b, pT, rp, wc, jfull, m0, n0, offs_m, offs_n, N, C, FULL_SRC, FAST_LOG, POLY_LOGS, BM, BN)
        else:
            n_s = tl.load(js_n + k)
            base = js_flat + tl.load(js_off + k) + b * n_s * n_s
            tap = tl.cast(k, tl.int64) * N * 4
            u = _small_scale_tile(base, taps_idx + tap, taps_w + tap, offs_m, offs_n, n_s, N, BM, BN)
    else:
        u = _full_tile(b, pT, rp, wc, jfull, m0, n0, offs_m, offs_n, N, C, FULL_SRC, FAST_LOG, POLY_LOGS, BM, BN)
    return u


@triton.jit
def _full_tile(b, pT, rp, wc, jfull, m0, n0, offs_m, offs_n, N, C, FULL_SRC: tl.constexpr, FAST_LOG: tl.constexpr,
               POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    if FULL_SRC == 1:
        u = jsd_tile(pT + b * C * N, pT + b * C * N, rp + b * N, rp + b * N, wc + b * C, offs_m, offs_n, N, N, C,
                     True, FAST_LOG, BM, BN, POLY_LOGS)
    else:
        # a block pointer keeps the 2-D address math scalar (a pointer tensor costs 2 regs/element)
        jp = tl.make_block_ptr(jfull + b * N * N, shape=(N, N), strides=(N, 1), offsets=(m0, n0),
                               block_shape=(BM, BN), order=(1, 0))
        u = tl.load(jp, boundary_check=(0, 1), padding_option="zero")
    return u


@triton.jit
def row_stats_kernel(pT, rp, wc, jfull, js_flat, js_off, js_n, taps_idx, taps_w, hi_out, lo_out, nhi_out, nlo_out,
                     N, C, S, FULL_SRC: tl.constexpr, MULTI: tl.constexpr, FAST_LOG: tl.constexpr,
                     POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, COUNT_TIES: tl.constexpr):
    """hi / lo [B, S, N]: each row's max / min of U_s; COUNT_TIES (the training forward) also
    writes how many keys attain them (nhi / nlo), for the backward's tie rule."""
    pid_m, slot, b = tile_ids(tl.cdiv(N, BM), S)
    offs_m = pid_m * BM + tl.arange(0, BM)
    hi = tl.full((BM,), float("-inf"), tl.float32)
    lo = tl.full((BM,), float("inf"), tl.float32)
    nhi = tl.zeros((BM,), dtype=tl.float32)
    nlo = tl.zeros((BM,), dtype=tl.float32)
    total = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        u = _scale_tile(slot, b, pT, rp, wc, jfull, js_flat, js_off, js_n, taps_idx, taps_w, pid_m * BM, n0, offs_m,
                        offs_n, N, C, FULL_SRC, MULTI, FAST_LOG, POLY_LOGS, BM, BN)
        valid = offs_n[None, :] < N
        if COUNT_TIES:
            hi, lo, nhi, nlo = merge_row_extremes(u, valid, hi, lo, nhi, nlo)
        else:
            hi = tl.maximum(hi, tl.max(tl.where(valid, u, float("-inf")), axis=1))
            lo = tl.minimum(lo, tl.min(tl.where(valid, u, float("inf")), axis=1))
        # the GPU's max / min drop NaN, a sum keeps it (u <= ln 2 cannot overflow it)
        total += tl.sum(tl.where(valid, u, 0.0), axis=1)
    hi = tl.where(total != total, float("nan"), hi)  # a NaN row maps to NaN, not to ones
    dst = (b * S + slot) * N + offs_m
    tl.store(hi_out + dst, hi, mask=offs_m < N)
    tl.store(lo_out + dst, lo, mask=offs_m < N)
    if COUNT_TIES:
        tl.store(nhi_out + dst, nhi, mask=offs_m < N)
        tl.store(nlo_out + dst, nlo, mask=offs_m < N)


@triton.jit
def cdam_product_kernel(pT, rp, wc, jfull, js_flat, js_off, js_n, taps_idx, taps_w, hi_in, lo_in, weights, v, out,
                        N, C, D, S, alpha_log2e, exp_neg_alpha, factor,
                        FULL_SRC: tl.constexpr, MULTI: tl.constexpr, WRITE_MAP: tl.constexpr, V_IS_FP32: tl.constexpr,
                        FAST_LOG: tl.constexpr, POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BD: tl.constexpr, SMALL_ALPHA: tl.constexpr):
    pid_m, pid_d, b = tile_ids(tl.cdiv(N, BM), tl.cdiv(D, BD))
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_m = offs_m < N
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < N
        a = tl.zeros((BM, BN), dtype=tl.float32)
        for slot in range(0, S):
            u = _scale_tile(slot, b, pT, rp, wc, jfull, js_flat, js_off, js_n, taps_idx, taps_w, pid_m * BM, n0, offs_m,
                            offs_n, N, C, FULL_SRC, MULTI, FAST_LOG, POLY_LOGS, BM, BN)
            hi = tl.load(hi_in + (b * S + slot) * N + offs_m, mask=mask_m, other=0.0)
            lo = tl.load(lo_in + (b * S + slot) * N + offs_m, mask=mask_m, other=0.0)
            a += tl.load(weights + slot) * cdam_transform(u, hi, lo, alpha_log2e, exp_neg_alpha, factor, SMALL_ALPHA)
        a = tl.where(mask_n[None, :], a, 0.0)
        if WRITE_MAP:
            mask = mask_m[:, None] & mask_n[None, :]
            tl.store(out + b * N * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], a, mask=mask)
        else:
            acc = product(a, v + b * N * D, N, D, n0, pid_d * BD, acc, V_IS_FP32, BN, BD)
    if not WRITE_MAP:
        o_ptrs = out + b * N * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
        tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=mask_m[:, None] & (offs_d[None, :] < D))


# 8 warps halve the per-thread share of the [BM, BN] tiles and [BM, BD] accumulator; at 4 the
# product kernels spill on sm_90 (checked by tests/test_kernels_compile.py).
NUM_WARPS = 8
# The multi-scale row statistics (gather code + a full-grid divergence tile in one kernel) spill
# with 64 x 64 tiles on sm_90 (64-bit gather rows, NaN tracking); 64 x 32 tiles do not, except
# on Triton before 3.8 (4 bytes per thread reading stored divergences), where 64 x 16 do not.
ROW_STATS_BN_MULTI = 16 if NARROW_TILES else 32


class ScaleSet:
    """Device-side description of the scales of one CDAM evaluation.

    full:  None (no full-resolution scale), or ("recompute", pT, rp, w) or ("materialized", J).
    small: list of (J_s [B, n_s, n_s] fp32, taps_idx [N, 4] int32, taps_w [N, 4] fp32).
    weights: per slot (full first), already divided by the number of scales.
    """

    def __init__(self, B, N, C, device, full, small, weights):
        self.B, self.N, self.C = B, N, C
        self.full_src = 0 if full is None else (1 if full[0] == "recompute" else 2)
        dummy_f = torch.zeros(1, device=device, dtype=torch.float32)
        self.pT, self.rp, self.w = (full[1], full[2], full[3]) if self.full_src == 1 else (dummy_f,) * 3
        self.jfull = full[1] if self.full_src == 2 else dummy_f
        if small:
            self.js_flat = torch.cat([j.reshape(-1) for j, _, _ in small])
            sizes = [j[0].numel() for j, _, _ in small]
            offs = [0] + [B * s for s in sizes[:-1]]
            self.js_off = torch.tensor(offs, device=device, dtype=torch.int64).cumsum(0)
            self.js_n = torch.tensor([j.shape[-1] for j, _, _ in small], device=device, dtype=torch.int32)
            self.taps_idx = torch.stack([t for _, t, _ in small]).contiguous()
            self.taps_w = torch.stack([w for _, _, w in small]).contiguous()
        else:
            self.js_flat = self.taps_w = dummy_f
            self.js_off = torch.zeros(1, device=device, dtype=torch.int64)
            self.js_n = self.taps_idx = torch.zeros(1, device=device, dtype=torch.int32)
        self.S = len(weights)
        self.multi = bool(small)
        self.weights = torch.tensor(weights, device=device, dtype=torch.float32)

    def args(self):
        return (self.pT, self.rp, self.w, self.jfull, self.js_flat, self.js_off, self.js_n, self.taps_idx, self.taps_w)


def row_stats(sc: ScaleSet, count_ties: bool = False) -> torch.Tensor:
    """[2, B, S, N] float32: hi, lo per scale; count_ties: [4, B, S, N] with nhi, nlo appended."""
    stats = torch.empty(4 if count_ties else 2, sc.B, sc.S, sc.N, device=sc.weights.device, dtype=torch.float32)
    counts = (stats[2], stats[3]) if count_ties else (stats[0], stats[1])  # placeholders without COUNT_TIES
    BM, BN = blocks(sc.N, 64), blocks(sc.N, ROW_STATS_BN_MULTI if sc.multi else 64)
    grid = flat_grid(triton.cdiv(sc.N, BM), sc.S, sc.B)
    row_stats_kernel[grid](*sc.args(), stats[0], stats[1], *counts, sc.N, sc.C, sc.S, FULL_SRC=sc.full_src,
                           MULTI=sc.multi, FAST_LOG=fast_log(), POLY_LOGS=poly_logs(), BM=BM, BN=BN,
                           COUNT_TIES=count_ties, num_warps=NUM_WARPS)
    return stats


def cdam_apply(sc: ScaleSet, alpha: float, v: torch.Tensor | None, save_stats: bool = False):
    """The averaged CDAM map (v None) or its product with v [B, N, D]. save_stats (one scale, the
    training forward): (out, [4, B, N] = hi, lo, nhi, nlo of J) for the backward to reuse."""
    stats = row_stats(sc, count_ties=save_stats)
    hi, lo = stats[0], stats[1]
    B, N = sc.B, sc.N
    if v is None:
        out = torch.empty(B, N, N, device=hi.device, dtype=torch.float32)
        D, dummy_v = 1, hi
    else:
        D = v.shape[2]
        out = torch.empty(B, N, D, device=v.device, dtype=v.dtype)
        dummy_v = v
    v_is_fp32 = v is not None and v.dtype == torch.float32
    bm, bn, bd = value_tiles(D, v_is_fp32, sc.full_src == 2, multi=sc.multi, poly=poly_logs() > 0)
    BM, BN, BD = blocks(N, bm), blocks(N, bn), blocks(D, bd)
    grid = flat_grid(triton.cdiv(N, BM), triton.cdiv(D, BD), B)
    alpha_log2e, exp_neg_alpha, factor, small = constants.transform_factors(alpha)
    cdam_product_kernel[grid](*sc.args(), hi, lo, sc.weights, dummy_v, out, N, sc.C, D, sc.S, alpha_log2e,
                              exp_neg_alpha, factor,
                              FULL_SRC=sc.full_src, MULTI=sc.multi, WRITE_MAP=v is None,
                              V_IS_FP32=v_is_fp32, FAST_LOG=fast_log(), POLY_LOGS=poly_logs(), BM=BM, BN=BN,
                              BD=BD, SMALL_ALPHA=small, num_warps=NUM_WARPS)
    if save_stats:
        assert sc.S == 1, "saved statistics are those of a single-scale map"
        return out, stats.reshape(4, B, N)
    return out
