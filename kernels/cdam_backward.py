"""Fused backward of cdam_attention, out = A @ v with A = cdam_map(p) (docs/autograd.md, section 2).

J is recomputed exactly as the forward computes it (the centred form of kernels/jsd.operands,
jsd_tile), and A by the forward's cdam_transform. The row statistics play the part of attention's LSE. Four passes over the divergence tiles,
each recomputing J from p (O(N (C + D)) extra memory, nothing N x N); three when the training
forward saved the statistics of pass 1 (kernels/cdam.row_stats with count_ties):
  1. per row: hi / lo (max / min of J) and how many keys attain them (ties share the gradient);
  2. per row: s_hi = sum_j gX_ij t_ij with gX = (g_i . v_j) dA/dX, t = 1 - X = (J - lo) / span
     as the forward's transform takes it (kernels/common.cdam_transform); the share through the
     row minimum is never needed (J = 0 there passes no gradient: see _grad_tile), so neither
     is its sum or tie count;
  3. query side: G = dL/dJ per tile, class sums over keys (backward_common's accumulator);
  4. key side: the same G, class sums over queries, and gv_j = sum_i A_ij g_i.
Only v's gradient wanted: pass 1 (unless saved), then pass 4 forming A and gv alone.
"""
import math

import torch
import triton
import triton.language as tl

from .. import constants
from ..constants import gradient_exponent, unscale
from .backward_common import ATTN_WARPS, KEY_TILES, NUM_WARPS, QUERY_TILES, accumulate_class_terms, class_major_log_terms, \
    finish, row_dots
from .common import CONSTANT_ROW_EPS, blocks, cdam_transform, fast_log, flat_grid, jsd_tile, merge_row_extremes, \
    poly_logs, tile_ids
from .jsd import operands


@triton.jit
def cdam_row_stats_kernel(pT, rp, wc, hi_out, lo_out, nhi_out, nlo_out, N, C, FAST_LOG: tl.constexpr,
                          POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid, _unused, b = tile_ids(tl.cdiv(N, BM), 1)
    offs_m = pid * BM + tl.arange(0, BM)
    hi = tl.full((BM,), float("-inf"), tl.float32)
    lo = tl.full((BM,), float("inf"), tl.float32)
    nhi = tl.zeros((BM,), dtype=tl.float32)
    nlo = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        valid = (offs_n < N)[None, :]
        j = jsd_tile(pT + b * C * N, pT + b * C * N, rp + b * N, rp + b * N, wc + b * C, offs_m, offs_n, N, N, C, True,
                     FAST_LOG, BM, BN, POLY_LOGS)
        hi, lo, nhi, nlo = merge_row_extremes(j, valid, hi, lo, nhi, nlo)
    mask = offs_m < N
    tl.store(hi_out + b * N + offs_m, hi, mask=mask)
    tl.store(lo_out + b * N + offs_m, lo, mask=mask)
    tl.store(nhi_out + b * N + offs_m, nhi, mask=mask)
    tl.store(nlo_out + b * N + offs_m, nlo, mask=mask)


@triton.jit
def _tile(pT, rp, wc, hi, lo, g, v, offs_m, offs_n, mask_m, mask_n, N, C, D, FAST_LOG: tl.constexpr,
          POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """(J, t, X, inv_span, g_i . v_j) on a tile, J recomputed as the forward does (jsd_tile):
    t = (J - lo) / span as kernels/common.cdam_transform takes it, X = 1 - t;
    inv_span = 0 on constant rows (span < CONSTANT_ROW_EPS), whose gradient is zero."""
    j = jsd_tile(pT, pT, rp, rp, wc, offs_m, offs_n, N, N, C, True, FAST_LOG, BM, BN, POLY_LOGS)
    h = tl.load(hi + offs_m, mask=mask_m, other=0.0)
    lw = tl.load(lo + offs_m, mask=mask_m, other=0.0)
    span = h - lw
    flat = span < CONSTANT_ROW_EPS
    inv = tl.where(flat, 0.0, 1.0 / tl.where(flat, 1.0, span))
    t = (j - lw[:, None]) * inv[:, None]
    t = tl.where(t < 0.0, 0.0, t)
    # X = 1 - t, not (hi - J) / span: X is then exactly 1 where t = 0, so at a single row minimum
    # the direct term and the one through lo cancel exactly (for huge alpha both are ~alpha / span)
    x = 1.0 - t
    gv = row_dots(g, v, offs_m, offs_n, mask_m, mask_n, D, BM, BN, BD)
    return j, t, x, inv, gv


@triton.jit
def cdam_grad_sums_kernel(pT, rp, wc, hi, lo, g, v, add_hi, N, C, D, alpha_log2e, dadx_scale,
                          FAST_LOG: tl.constexpr, POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BD: tl.constexpr):
    """add_hi_i = s_hi / span (before the tie split), s_hi = sum_j gX_ij t_ij, gX = (g_i . v_j) dA/dX."""
    pid, _unused, b = tile_ids(tl.cdiv(N, BM), 1)
    offs_m = pid * BM + tl.arange(0, BM)
    mask_m = offs_m < N
    s_hi = tl.zeros((BM,), dtype=tl.float32)
    inv = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < N
        _, t, _x, inv, gv = _tile(pT + b * C * N, rp + b * N, wc + b * C, hi + b * N, lo + b * N, g + b * N * D,
                                 v + b * N * D, offs_m, offs_n, mask_m, mask_n, N, C, D, FAST_LOG, POLY_LOGS, BM, BN,
                                 BD)
        # dA/dX = -dA/dt = alpha exp(-alpha t) factor (small alpha: exp(-alpha t) factor)
        gx = tl.where(mask_n[None, :], gv * dadx_scale * tl.exp2(-alpha_log2e * t), 0.0)
        s_hi += tl.sum(gx * t, axis=1)
    tl.store(add_hi + b * N + offs_m, s_hi * inv, mask=mask_m)


@triton.jit
def _grad_tile(pT, rp, wc, hi, lo, nhi, add_hi, g, v, offs_m, offs_n, mask_m, mask_n, N, C, D,
               alpha_log2e, dadx_scale, exp_neg_alpha, factor, SMALL_ALPHA: tl.constexpr, FAST_LOG: tl.constexpr,
               POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """(A, G) on a tile, both zero outside the masks: A by the forward's cdam_transform,
    G = dL/dJ (docs/autograd.md, section 2)."""
    j, t, x, inv, gv = _tile(pT, rp, wc, hi, lo, g, v, offs_m, offs_n, mask_m, mask_n, N, C, D, FAST_LOG, POLY_LOGS,
                             BM, BN, BD)
    h = tl.load(hi + offs_m, mask=mask_m, other=0.0)
    lw = tl.load(lo + offs_m, mask=mask_m, other=0.0)
    a_hi = tl.load(add_hi + offs_m, mask=mask_m, other=0.0) / tl.load(nhi + offs_m, mask=mask_m, other=1.0)
    valid = mask_m[:, None] & mask_n[None, :]
    gx = gv * dadx_scale * tl.exp2(-alpha_log2e * t)
    # J = 0 (the diagonal, which jsd_tile sets to 0, and identical rows) passes no gradient
    # (opdefs/cdam.divergence_grad). With J >= 0 those are exactly the row-minimum
    # positions, so the share through lo is never needed; constant rows get none.
    G = -gx * inv[:, None] + tl.where(j == h[:, None], a_hi[:, None], 0.0)
    G = tl.where(valid & (inv[:, None] > 0.0) & (j != lw[:, None]), G, 0.0)
    A = tl.where(valid, cdam_transform(j, h, lw, alpha_log2e, exp_neg_alpha, factor, SMALL_ALPHA), 0.0)
    return A, G


@triton.jit
def cdam_grad_query_kernel(pT, rp, wc, lpT, hi, lo, nhi, add_hi, g, v, acc, N, C, D, alpha_log2e,
                           dadx_scale, exp_neg_alpha, factor, SMALL_ALPHA: tl.constexpr, FAST_LOG: tl.constexpr,
                           POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    pid, _unused, b = tile_ids(tl.cdiv(N, BM), 1)
    offs_m = pid * BM + tl.arange(0, BM)
    mask_m = offs_m < N
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < N
        _, G = _grad_tile(pT + b * C * N, rp + b * N, wc + b * C, hi + b * N, lo + b * N, nhi + b * N,
                          add_hi + b * N, g + b * N * D, v + b * N * D, offs_m, offs_n, mask_m, mask_n,
                          N, C, D, alpha_log2e, dadx_scale, exp_neg_alpha, factor, SMALL_ALPHA, FAST_LOG, POLY_LOGS,
                          BM, BN, BD)
        accumulate_class_terms(pT + b * C * N, pT + b * C * N, wc + b * C, lpT + b * C * N, lpT + b * C * N, G,
                                offs_m, offs_n, mask_m, mask_n, N, N, C, acc + b * C * N, True, FAST_LOG)


@triton.jit
def _map_tile(pT, rp, wc, hi, lo, offs_m, offs_n, mask_m, mask_n, N, C, alpha_log2e, exp_neg_alpha, factor,
              SMALL_ALPHA: tl.constexpr, FAST_LOG: tl.constexpr, POLY_LOGS: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr):
    """A on a tile (zero outside the masks), J recomputed and transformed as the forward does."""
    j = jsd_tile(pT, pT, rp, rp, wc, offs_m, offs_n, N, N, C, True, FAST_LOG, BM, BN, POLY_LOGS)
    h = tl.load(hi + offs_m, mask=mask_m, other=0.0)
    lw = tl.load(lo + offs_m, mask=mask_m, other=0.0)
    valid = mask_m[:, None] & mask_n[None, :]
    return tl.where(valid, cdam_transform(j, h, lw, alpha_log2e, exp_neg_alpha, factor, SMALL_ALPHA), 0.0)


@triton.jit
def accumulate_values(aT, g, gv_out, offs_m, offs_n, mask_m, mask_n, D, BD: tl.constexpr):
    """gv_out[keys] += aT @ g[queries] ([BN, BM] map tile, transposed, against the queries' rows
    of g [*, D]; BD columns at a time, 3xTF32 on tensor cores)."""
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        mask_d = offs_d < D
        gt = tl.load(g + offs_m[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                     other=0.0)
        ptr = gv_out + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
        mask = mask_n[:, None] & mask_d[None, :]
        tl.store(ptr, tl.dot(aT, gt, tl.load(ptr, mask=mask, other=0.0), input_precision="tf32x3"), mask=mask)


@triton.jit
def cdam_grad_key_kernel(pT, rp, wc, lpT, hi, lo, nhi, add_hi, g, v, acc, gv_out, N, C, D, alpha_log2e,
                         dadx_scale, exp_neg_alpha, factor, SMALL_ALPHA: tl.constexpr, FAST_LOG: tl.constexpr,
                         POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                         NEED_P: tl.constexpr):
    """gv_j = sum_i A_ij g_i and (NEED_P) the key side's class sums of G. NEED_P False: the value
    gradient alone, which needs only the row statistics (lpT, nhi, add_hi and acc are not read)."""
    pid, _unused, b = tile_ids(tl.cdiv(N, BN), 1)
    offs_n = pid * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    for m0 in range(0, N, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < N
        if NEED_P:
            A, G = _grad_tile(pT + b * C * N, rp + b * N, wc + b * C, hi + b * N, lo + b * N, nhi + b * N,
                              add_hi + b * N, g + b * N * D, v + b * N * D, offs_m, offs_n, mask_m, mask_n,
                              N, C, D, alpha_log2e, dadx_scale, exp_neg_alpha, factor, SMALL_ALPHA, FAST_LOG,
                              POLY_LOGS, BM, BN, BD)
        else:
            A = _map_tile(pT + b * C * N, rp + b * N, wc + b * C, hi + b * N, lo + b * N, offs_m, offs_n, mask_m,
                          mask_n, N, C, alpha_log2e, exp_neg_alpha, factor, SMALL_ALPHA, FAST_LOG, POLY_LOGS, BM, BN)
        aT = tl.trans(A)
        accumulate_values(aT, g + b * N * D, gv_out + b * N * D, offs_m, offs_n, mask_m, mask_n, D, BD)
        if NEED_P:
            accumulate_class_terms(pT + b * C * N, pT + b * C * N, wc + b * C, lpT + b * C * N, lpT + b * C * N, G,
                                   offs_m, offs_n, mask_m, mask_n, N, N, C, acc + b * C * N, False, FAST_LOG)


def transform_derivative_scale(alpha: float) -> float:
    """dA/dX = -dA/dt = exp(-alpha t) 2^e times this, for the transform of constants.transform_factors:
    alpha * factor (factor = 1 / (1 - exp(-alpha))), or factor itself in the small-alpha variant
    (factor = alpha / (1 - exp(-alpha)) there), scaled by 2^-e (e = gradient_exponent(alpha)) so
    that the score gradients stay in the float32 range for every alpha; the caller unscales."""
    _, _, factor, small = constants.transform_factors(alpha)
    return math.ldexp(factor if small else alpha * factor, -gradient_exponent(alpha))


def _row_statistics(pT, rp, w, B, N, C) -> torch.Tensor:
    """Pass 1: [4, B, N] = hi, lo, nhi, nlo from the forward's operands (kernels/jsd.operands)."""
    stats = torch.empty(4, B, N, device=pT.device, dtype=torch.float32)
    BM, BN = blocks(N, 64), blocks(N, 64)
    cdam_row_stats_kernel[flat_grid(triton.cdiv(N, BM), 1, B)](pT, rp, w, *stats.unbind(0), N, C, FAST_LOG=fast_log(),
                                                               POLY_LOGS=poly_logs(), BM=BM, BN=BN,
                                                               num_warps=NUM_WARPS)
    return stats


def row_statistics(p: torch.Tensor) -> torch.Tensor:
    """The backward's own pass 1 for p [B, N, C] (what a training forward's saved stats must equal)."""
    pT, _, rp, _, w = operands(p.contiguous(), None)
    return _row_statistics(pT, rp, w, *p.shape)


def cdam_attention_backward(grad: torch.Tensor, p: torch.Tensor, v: torch.Tensor, alpha: float, stats=None,
                            need_p: bool = True):
    """(gp, gv); always recomputes J (the forward's mode and memory budget do not change the
    backward). stats: the training forward's [4, B, N] hi, lo, nhi, nlo (pass 1 is skipped),
    else None. need_p False: the value gradient alone, one pass after the statistics (gp None).
    The forward's J is bitwise the one recomputed here in both of its modes: the same jsd_tile
    on the same operands (kernels/jsd.operands), whether recomputed or materialised by
    pairwise_jsd_kernel (symmetric bit for bit)."""
    B, N, C = p.shape
    D = v.shape[2]
    pT, _, rp, _, w = operands(p, None)  # the forward's operands: J is recomputed bit for bit
    g32, v32 = grad.float().contiguous(), v.float().contiguous()
    f32 = dict(device=p.device, dtype=torch.float32)
    logs = dict(FAST_LOG=fast_log(), POLY_LOGS=poly_logs())
    extremes = stats.to(torch.float32).contiguous() if stats is not None else _row_statistics(pT, rp, w, B, N, C)
    hi, lo, nhi, _ = extremes.unbind(0)  # (the tie count at lo is not needed)
    alpha_log2e, exp_neg_alpha, factor, small = constants.transform_factors(alpha)
    dadx_scale = transform_derivative_scale(alpha)
    scalars = (alpha_log2e, dadx_scale, exp_neg_alpha, factor)
    km, kn, kd = KEY_TILES
    key_grid = flat_grid(triton.cdiv(N, blocks(N, kn)), 1, B)
    key_tiles = dict(BM=blocks(N, km), BN=blocks(N, kn), BD=blocks(D, kd), num_warps=ATTN_WARPS)
    gv = torch.zeros(B, N, D, **f32)
    if not need_p:
        unused = hi  # not read without the p gradient
        cdam_grad_key_kernel[key_grid](pT, rp, w, unused, hi, lo, unused, unused, g32, v32, unused, gv, N, C, D,
                                       *scalars, SMALL_ALPHA=small, **logs, **key_tiles, NEED_P=False)
        return None, gv
    lpT = class_major_log_terms(p, w)
    add_hi = torch.empty(B, N, **f32)
    qm, qn, qd = QUERY_TILES
    BM, BN, BD = blocks(N, qm), blocks(N, qn), blocks(D, qd)
    grid = flat_grid(triton.cdiv(N, BM), 1, B)
    cdam_grad_sums_kernel[grid](pT, rp, w, hi, lo, g32, v32, add_hi, N, C, D, alpha_log2e, dadx_scale, **logs,
                                BM=BM, BN=BN, BD=BD, num_warps=ATTN_WARPS)
    tiles = (pT, rp, w, lpT, hi, lo, nhi, add_hi, g32, v32)
    acc_q = torch.zeros(B, C, N, **f32)
    cdam_grad_query_kernel[grid](*tiles, acc_q, N, C, D, *scalars, SMALL_ALPHA=small, **logs, BM=BM, BN=BN, BD=BD,
                                 num_warps=ATTN_WARPS)
    acc_k = torch.zeros(B, C, N, **f32)
    cdam_grad_key_kernel[key_grid](*tiles, acc_k, gv, N, C, D, *scalars, SMALL_ALPHA=small, **logs, **key_tiles,
                                   NEED_P=True)
    return unscale(finish(acc_q, p) + finish(acc_k, p), gradient_exponent(alpha)), gv


def offline_cases() -> dict:
    """name -> (kernel, signature, constexprs, num_warps) at the GPU tile sizes (see jsd_backward)."""
    f32, i32, s = "*fp32", "i32", "fp32"
    stats = {"pT": f32, "rp": f32, "wc": f32, "lpT": f32, "hi": f32, "lo": f32, "nhi": f32, "add_hi": f32, "g": f32,
             "v": f32, "acc": f32}
    scal = {"N": i32, "C": i32, "D": i32, "alpha_log2e": s, "dadx_scale": s, "exp_neg_alpha": s, "factor": s}
    q = dict(zip(("BM", "BN", "BD"), QUERY_TILES))
    k = dict(zip(("BM", "BN", "BD"), KEY_TILES))
    cases = {
        "cdam_row_stats": (cdam_row_stats_kernel, {"pT": f32, "rp": f32, "wc": f32, "hi_out": f32, "lo_out": f32,
                                                   "nhi_out": f32, "nlo_out": f32, "N": i32, "C": i32},
                           {"FAST_LOG": True, "POLY_LOGS": 0, "BM": 64, "BN": 64}, NUM_WARPS),
        "cdam_grad_sums": (cdam_grad_sums_kernel, {"pT": f32, "rp": f32, "wc": f32, "hi": f32, "lo": f32, "g": f32,
                                                   "v": f32, "add_hi": f32, "N": i32, "C": i32, "D": i32,
                                                   "alpha_log2e": s, "dadx_scale": s},
                           {"FAST_LOG": True, "POLY_LOGS": 0, **q}, ATTN_WARPS),
    }
    for small in (False, True):
        tag = "small_alpha" if small else "default"
        flags = {"SMALL_ALPHA": small, "FAST_LOG": True, "POLY_LOGS": 0}
        cases[f"cdam_grad_query[{tag}]"] = (cdam_grad_query_kernel, {**stats, **scal}, {**flags, **q}, ATTN_WARPS)
        cases[f"cdam_grad_key[{tag}]"] = (cdam_grad_key_kernel, {**stats, "gv_out": f32, **scal},
                                          {**flags, **k, "NEED_P": True}, ATTN_WARPS)
    cases["cdam_grad_key_v_only"] = (cdam_grad_key_kernel, {**stats, "gv_out": f32, **scal},
                                     {"SMALL_ALPHA": False, "FAST_LOG": True, "POLY_LOGS": 0, **k, "NEED_P": False},
                                     ATTN_WARPS)
    return cases
