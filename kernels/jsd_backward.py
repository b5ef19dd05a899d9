"""Fused backward passes of pairwise_jsd and jsd_attention (docs/autograd.md, sections 1 and 4).

The divergence's gradient needs, per (row, class), sum_j G_ij log(p_ic / m_ijc): the same
N M C logarithms as the forward. With s = p_i + q_j, the forward's centring weights w_c
(cdam_fast/centring.py) and lp_ic = log2(2 p_ic w_c), log(p_ic / m_ijc) = ln 2 (lp_ic - log2(s_ijc w_c)):
the logarithm is the forward's own (of s w, small for flat distributions), and a tile adds
G_ij (lp_ic - log2(s_ijc w_c)) per class to a class-major accumulator T [C, n] of the side being differentiated (query side: sum over the
tile's keys; key side: sum over its queries; the attention query side keeps two such sums,
see jsd_attention_grad_query_kernel). Each program owns its rows of T, so the
read-modify-write needs no atomics and the result is deterministic. Nothing of size N x M
(attention) or N x M x C is stored: the attention backward recomputes J tiles from the row
log-sum-exp, FlashAttention-2 style, in O(N (C + D)) extra memory.
"""
import torch
import triton
import triton.language as tl

from .. import constants
from ..centring import centring_weights
from .backward_common import ATTN_WARPS, KEY_TILES, NUM_WARPS, QUERY_TILES, accumulate_class_terms, class_major_log_terms, \
    finish, row_dots
from .common import blocks, fast_log, flat_grid, jsd_tile, log2, log2_sum, logit_scale, poly_logs, tile_ids
from .jsd import class_major, operands



@triton.jit
def pairwise_jsd_grad_kernel(aT, bT, wc, laT, lbT, g, stride_gm, stride_gn, acc, N, M, C,
                             QUERY_SIDE: tl.constexpr, FAST_LOG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """One program per block of the differentiated side's rows (flat_grid(blocks, 1, B));
    G = the incoming gradient."""
    if QUERY_SIDE:
        pid, _unused, b = tile_ids(tl.cdiv(N, BM), 1)
    else:
        pid, _unused, b = tile_ids(tl.cdiv(M, BN), 1)
    aT += b * C * N
    bT += b * C * M
    wc += b * C
    laT += b * C * N
    lbT += b * C * M
    acc += b * C * (N if QUERY_SIDE else M)
    g += b * N * M
    stride_gm = stride_gm.to(tl.int64)
    stride_gn = stride_gn.to(tl.int64)
    if QUERY_SIDE:
        offs_m = pid * BM + tl.arange(0, BM)
        mask_m = offs_m < N
        for n0 in range(0, M, BN):
            offs_n = n0 + tl.arange(0, BN)
            mask_n = offs_n < M
            G = tl.load(g + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            accumulate_class_terms(aT, bT, wc, laT, lbT, G, offs_m, offs_n, mask_m, mask_n, N, M, C, acc, True,
                                    FAST_LOG)
    else:
        offs_n = pid * BN + tl.arange(0, BN)
        mask_n = offs_n < M
        for m0 in range(0, N, BM):
            offs_m = m0 + tl.arange(0, BM)
            mask_m = offs_m < N
            G = tl.load(g + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            accumulate_class_terms(aT, bT, wc, laT, lbT, G, offs_m, offs_n, mask_m, mask_n, N, M, C, acc, False,
                                    FAST_LOG)


@triton.jit
def jsd_attention_lse_kernel(pT, qT, rp, rq, wc, lse, N, M, C, neg_log2e_over_tau, SELF: tl.constexpr,
                             FAST_LOG: tl.constexpr, POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """lse_i = log2 sum_j 2^(-J_ij log2(e) / tau): the forward's softmax normaliser, base 2."""
    pid, _unused, b = tile_ids(tl.cdiv(N, BM), 1)
    offs_m = pid * BM + tl.arange(0, BM)
    row_max = tl.full((BM,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, M, BN):
        offs_n = n0 + tl.arange(0, BN)
        j = jsd_tile(pT + b * C * N, qT + b * C * M, rp + b * N, rq + b * M, wc + b * C, offs_m, offs_n, N, M, C,
                     SELF, FAST_LOG, BM, BN, POLY_LOGS)
        logits = tl.where((offs_n < M)[None, :], j * neg_log2e_over_tau, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(logits - new_max[:, None]), axis=1)
        row_max = new_max
    tl.store(lse + b * N + offs_m, row_max + log2(row_sum, FAST_LOG), mask=offs_m < N)


@triton.jit
def _weights(pT, qT, rp, rq, wc, lse, offs_m, offs_n, mask_m, mask_n, N, M, C, neg_log2e_over_tau,
             SELF: tl.constexpr, FAST_LOG: tl.constexpr, POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """w on a [BM, BN] tile: softmax weights from the saved normaliser, zero outside the masks.
    J is recomputed exactly as the forward (jsd_tile, same centring weights and row terms)."""
    j = jsd_tile(pT, qT, rp, rq, wc, offs_m, offs_n, N, M, C, SELF, FAST_LOG, BM, BN, POLY_LOGS)
    l2 = tl.load(lse + offs_m, mask=mask_m, other=0.0)
    valid = mask_m[:, None] & mask_n[None, :]
    return tl.where(valid, tl.exp2(j * neg_log2e_over_tau - l2[:, None]), 0.0)


@triton.jit
def _weight_tile(pT, qT, rp, rq, wc, lse, g, v, offs_m, offs_n, mask_m, mask_n, N, M, C, D, neg_log2e_over_tau,
                 SELF: tl.constexpr, FAST_LOG: tl.constexpr, POLY_LOGS: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BD: tl.constexpr):
    """(w, g_i . v_j) on a [BM, BN] tile (_weights)."""
    w = _weights(pT, qT, rp, rq, wc, lse, offs_m, offs_n, mask_m, mask_n, N, M, C, neg_log2e_over_tau, SELF, FAST_LOG,
                 POLY_LOGS, BM, BN)
    return w, row_dots(g, v, offs_m, offs_n, mask_m, mask_n, D, BM, BN, BD)


@triton.jit
def _accumulate_query_moments(pT, qT, wc, lpT, w, wgk, shift, offs_m, offs_n, mask_m, mask_n, n_p, n_q, C, acc_x,
                              acc_y, FAST_LOG: tl.constexpr):
    """For every class c, with l_ijc = lp_ic - log2(s_ijc w_c) = log2(p_ic / m_ijc):
    acc_y[c, i] += sum_j w_ij l_ijc and acc_x[c, i] = acc_x - shift_i acc_y (old) + sum_j wgk_ij l_ijc
    over the tile's keys (w, wgk = w * (g . v - K): [BM, BN], zero outside the masks; shift: the
    change of the row's K since the previous tile)."""
    for c in range(C):
        c64 = tl.cast(c, tl.int64)  # c * n can pass 2^31
        a = tl.load(pT + c64 * n_p + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        b = tl.load(qT + c64 * n_q + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        la = tl.load(lpT + c64 * n_p + offs_m, mask=mask_m, other=0.0)
        lg = log2_sum(a[:, None] + b[None, :], tl.load(wc + c64), FAST_LOG)
        lt = la[:, None] - lg
        px = acc_x + c64 * n_p + offs_m
        py = acc_y + c64 * n_p + offs_m
        y = tl.load(py, mask=mask_m, other=0.0)
        tl.store(px, tl.load(px, mask=mask_m, other=0.0) - shift * y + tl.sum(wgk * lt, axis=1), mask=mask_m)
        tl.store(py, y + tl.sum(w * lt, axis=1), mask=mask_m)


@triton.jit
def jsd_attention_grad_query_kernel(pT, qT, rp, rq, wc, lpT, lse, delta, rnorm, g, v, acc, acc_y, N, M, C, D,
                                    neg_log2e_over_tau, neg_inv_tau, SELF: tl.constexpr, FAST_LOG: tl.constexpr,
                                    POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Query side, one program per query block, one pass over the key tiles:
    acc[c, i] = sum_j G_ij l_ijc = -(1/tau) sum_j w_ij (g_i . v_j - Delta_i) l_ijc, and, for the
    key side, Delta_i and rnorm_i = 1 / sum_j w_ij.

    The weights are renormalised by their own sum (w = 2^(logit - LSE) carries a per-row factor
    error of about |LSE| 2^-24, LSE being up to ~1.44 / tau), and Delta_i = sum_j w_ij g_i . v_j
    is summed from those weights, not taken as g_i . out_i (out is rounded to the values' dtype,
    2^-11 relative in fp16): either inconsistency leaves sum_j G_ij != 0, which the lp_ic part of
    l multiplies by log2 p_ic, unbounded for small p. Delta is complete only after the last tile,
    so the pass keeps X = sum_j w (g . v - K) l and Y = sum_j w l with K_i the running estimate
    of Delta (when K moves, X is rebased by -(K_new - K_old) Y, as an online softmax rebases its
    running max); at the end K = Delta and the sum is X: no term of size |Delta| |l| / tau
    cancels when g . v hardly varies over the keys."""
    pid, _unused, b = tile_ids(tl.cdiv(N, BM), 1)
    pT += b * C * N
    qT += b * C * M
    wc += b * C
    lpT += b * C * N
    acc += b * C * N
    acc_y += b * C * N
    offs_m = pid * BM + tl.arange(0, BM)
    mask_m = offs_m < N
    dl = tl.zeros((BM,), dtype=tl.float32)  # sum_j w g . v so far
    sw = tl.zeros((BM,), dtype=tl.float32)  # sum_j w so far
    k = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, M, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < M
        w, gv = _weight_tile(pT, qT, rp + b * N, rq + b * M, wc, lse + b * N, g + b * N * D, v + b * M * D, offs_m,
                             offs_n, mask_m, mask_n, N, M, C, D, neg_log2e_over_tau, SELF, FAST_LOG, POLY_LOGS,
                             BM, BN, BD)
        dl += tl.sum(w * gv, axis=1)
        sw += tl.sum(w, axis=1)
        k_new = tl.where(sw > 0.0, dl / tl.where(sw > 0.0, sw, 1.0), 0.0)
        _accumulate_query_moments(pT, qT, wc, lpT, w, w * (gv - k_new[:, None]), k_new - k, offs_m, offs_n, mask_m,
                                  mask_n, N, M, C, acc, acc_y, FAST_LOG)
        k = k_new
    rn = tl.where(sw > 0.0, 1.0 / tl.where(sw > 0.0, sw, 1.0), 0.0)
    tl.store(delta + b * N + offs_m, k, mask=mask_m)
    tl.store(rnorm + b * N + offs_m, rn, mask=mask_m)
    scale = rn * neg_inv_tau
    for c in range(C):
        px = acc + tl.cast(c, tl.int64) * N + offs_m
        tl.store(px, tl.load(px, mask=mask_m, other=0.0) * scale, mask=mask_m)


@triton.jit
def jsd_attention_grad_key_kernel(pT, qT, rp, rq, wc, lqT, lse, delta, rnorm, g, v, acc, gv_out, N, M, C, D,
                                  neg_log2e_over_tau, neg_inv_tau, SELF: tl.constexpr, FAST_LOG: tl.constexpr,
                                  POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                                  NEED_P: tl.constexpr):
    """Key side, one program per key block, after the query side (which stores Delta and the
    weights' renormalisation): acc[c, j] = sum_i G_ij (lq_jc - log2(s_ijc w_c)) and the value
    gradient gv_j = sum_i w_ij g_i (fp32, read-modify-write per D chunk). NEED_P False: the value
    gradient alone (no query pass ran: the weights are taken as the LSE gives them, and neither
    g . v nor the class sums are formed)."""
    pid, _unused, b = tile_ids(tl.cdiv(M, BN), 1)
    pT += b * C * N
    qT += b * C * M
    wc += b * C
    lqT += b * C * M
    acc += b * C * M
    gv_out += b * M * D
    offs_n = pid * BN + tl.arange(0, BN)
    mask_n = offs_n < M
    for m0 in range(0, N, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < N
        if NEED_P:
            w, gv = _weight_tile(pT, qT, rp + b * N, rq + b * M, wc, lse + b * N, g + b * N * D, v + b * M * D,
                                 offs_m, offs_n, mask_m, mask_n, N, M, C, D, neg_log2e_over_tau, SELF, FAST_LOG,
                                 POLY_LOGS, BM, BN, BD)
            w = w * tl.load(rnorm + b * N + offs_m, mask=mask_m, other=0.0)[:, None]
        else:
            w = _weights(pT, qT, rp + b * N, rq + b * M, wc, lse + b * N, offs_m, offs_n, mask_m, mask_n, N, M, C,
                         neg_log2e_over_tau, SELF, FAST_LOG, POLY_LOGS, BM, BN)
        wT = tl.trans(w)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask_d = offs_d < D
            gt = tl.load(g + b * N * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
                         mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            ptr = gv_out + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
            mask = mask_n[:, None] & mask_d[None, :]
            tl.store(ptr, tl.dot(wT, gt, tl.load(ptr, mask=mask, other=0.0), input_precision="tf32x3"), mask=mask)
        if NEED_P:
            dl = tl.load(delta + b * N + offs_m, mask=mask_m, other=0.0)
            G = w * (gv - dl[:, None]) * neg_inv_tau  # dL/dJ = -dS / tau
            # (the query-side log terms are not read on the key side: lqT stands in for them)
            accumulate_class_terms(pT, qT, wc, lqT, lqT, G, offs_m, offs_n, mask_m, mask_n, N, M, C, acc, False,
                                   FAST_LOG)


# ---------------------------------------------------------------------------------------------
# Host side.

def _scales(tau: float) -> tuple[float, float]:
    """(the forward's base-2 logit scale, -1 / tau clamped the same way): the saved LSE and the
    recomputed logits must use one scale (J <= ln 2 keeps every logit finite)."""
    return logit_scale(tau), max(-1.0 / tau, -constants.FLOAT32_MAX)


def _class_grad(p, q, w, g, query_side):
    """The per-class sums of one side for an explicit G [B, N, M] (strided views allowed)."""
    B, N, C = p.shape
    M = q.shape[1]
    pT, qT = class_major(p), class_major(q)
    lpT, lqT = class_major_log_terms(p, w), class_major_log_terms(q, w)
    acc = torch.zeros(B, C, N if query_side else M, device=p.device, dtype=torch.float32)
    BM, BN = blocks(N, 64), blocks(M, 64)
    grid = flat_grid(triton.cdiv(N, BM) if query_side else triton.cdiv(M, BN), 1, B)
    pairwise_jsd_grad_kernel[grid](pT, qT, w, lpT, lqT, g, g.stride(1), g.stride(2), acc, N, M, C,
                                   QUERY_SIDE=query_side, FAST_LOG=fast_log(), BM=BM, BN=BN, num_warps=NUM_WARPS)
    return acc


def pairwise_jsd_backward(grad: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None, need_q: bool = True):
    """(gp, gq); gq None when q is None or not needed (no key-side pass then)."""
    g = grad.float()
    w = centring_weights(p, q)
    if q is None:
        # p is on both sides: one query-side pass over G + G^T (the diagonal is constant 0)
        g = g + g.transpose(1, 2)
        g.diagonal(dim1=-2, dim2=-1).zero_()
        return finish(_class_grad(p, p, w, g, True), p), None
    g = g.contiguous()
    gp = finish(_class_grad(p, q, w, g, True), p)
    return gp, (finish(_class_grad(p, q, w, g, False), q) if need_q else None)


def jsd_attention_backward(grad: torch.Tensor, p: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None, tau: float,
                           lse: torch.Tensor | None = None, need_p: bool = True):
    """(gp, gv, gq). Two passes over the key tiles (query side, key side) when lse holds the
    training forward's row log-sum-exp [B, N] (base 2); three when it is None, the first
    computing it (jsd_attention_lse_kernel). need_p False: the value gradient alone, one key-side
    pass (gp, gq None). The forward's output is not needed: the query pass sums Delta_i from its
    own weights (see jsd_attention_grad_query_kernel for why g . out is not accurate enough)."""
    B, N, C = p.shape
    keys = p if q is None else q
    M, D = v.shape[1], v.shape[2]
    pT, qT, rp, rq, w = operands(p, q)  # the forward's operands: J is recomputed bit for bit
    g32, v32 = grad.float().contiguous(), v.float().contiguous()  # fp32 products (tf32x3 on GPU)
    scale, neg_inv_tau = _scales(tau)
    flags = dict(SELF=q is None, FAST_LOG=fast_log(), POLY_LOGS=poly_logs())
    qm, qn, qd = QUERY_TILES
    BM, BN, BD = blocks(N, qm), blocks(M, qn), blocks(D, qd)
    f32 = dict(device=p.device, dtype=torch.float32)
    grid = flat_grid(triton.cdiv(N, BM), 1, B)
    if lse is None:
        lse = torch.empty(B, N, **f32)
        jsd_attention_lse_kernel[grid](pT, qT, rp, rq, w, lse, N, M, C, scale, **flags, BM=BM, BN=BN,
                                       num_warps=NUM_WARPS)
    else:
        lse = lse.to(torch.float32).contiguous()
    gv = torch.zeros(B, M, D, **f32)
    km, kn, kd = KEY_TILES
    key_grid = flat_grid(triton.cdiv(M, blocks(M, kn)), 1, B)
    key_tiles = dict(BM=blocks(N, km), BN=blocks(M, kn), BD=blocks(D, kd), num_warps=ATTN_WARPS)
    if not need_p:
        unused = lse  # the key pass reads no log terms, Delta, normalisers or class sums then
        jsd_attention_grad_key_kernel[key_grid](pT, qT, rp, rq, w, unused, lse, unused, unused, g32, v32, unused, gv, N,
                                                M, C, D, scale, neg_inv_tau, **flags, **key_tiles, NEED_P=False)
        return None, gv, None
    lpT = class_major_log_terms(p, w)
    lkT = lpT if q is None else class_major_log_terms(q, w)
    # Delta_i and 1 / sum_j w_ij, written by the query pass, read by the key pass
    delta, rnorm = torch.empty(B, N, **f32), torch.empty(B, N, **f32)
    acc_p, acc_y = torch.zeros(B, C, N, **f32), torch.zeros(B, C, N, **f32)
    jsd_attention_grad_query_kernel[grid](pT, qT, rp, rq, w, lpT, lse, delta, rnorm, g32, v32, acc_p, acc_y, N, M, C,
                                          D, scale, neg_inv_tau, **flags, BM=BM, BN=BN, BD=BD, num_warps=ATTN_WARPS)
    del acc_y
    acc_q = torch.zeros(B, C, M, **f32)
    jsd_attention_grad_key_kernel[key_grid](pT, qT, rp, rq, w, lkT, lse, delta, rnorm, g32, v32, acc_q, gv, N, M, C, D,
                                            scale, neg_inv_tau, **flags, **key_tiles, NEED_P=True)
    gp, gk = finish(acc_p, p), finish(acc_q, keys)
    if q is None:
        return gp + gk, gv, None
    return gp, gv, gk


def offline_cases() -> dict:
    """name -> (kernel, signature, constexprs, num_warps) at the GPU tile sizes, for
    cdam_fast.kernels.offline_compile.inspect_kernel (tests/test_autograd_compile.py)."""
    f32, i32 = "*fp32", "i32"
    tiles = {"FAST_LOG": True, "BM": 64, "BN": 64}
    common = {"pT": f32, "qT": f32, "rp": f32, "rq": f32, "wc": f32}
    tail = {"N": i32, "M": i32, "C": i32, "D": i32, "neg_log2e_over_tau": "fp32"}
    rows = {"lse": f32, "delta": f32, "rnorm": f32, "g": f32, "v": f32, "acc": f32}
    query_sig = {**common, "lpT": f32, **rows, "acc_y": f32, **tail, "neg_inv_tau": "fp32"}
    key_sig = {**common, "lqT": f32, **rows, "gv_out": f32, **tail, "neg_inv_tau": "fp32"}
    cases = {}
    for side in (True, False):
        cases[f"pairwise_jsd_grad[{'query' if side else 'key'}]"] = (
            pairwise_jsd_grad_kernel,
            {"aT": f32, "bT": f32, "wc": f32, "laT": f32, "lbT": f32, "g": f32, "stride_gm": i32, "stride_gn": i32,
             "acc": f32, "N": i32, "M": i32, "C": i32}, {"QUERY_SIDE": side, **tiles}, NUM_WARPS)
    for self_ in (True, False):
        tag = "self" if self_ else "q"
        cases[f"jsd_attention_lse[{tag}]"] = (
            jsd_attention_lse_kernel,
            {"pT": f32, "qT": f32, "rp": f32, "rq": f32, "wc": f32, "lse": f32, "N": i32, "M": i32, "C": i32,
             "neg_log2e_over_tau": "fp32"},
            {"SELF": self_, "POLY_LOGS": 0, "FAST_LOG": True, "BM": QUERY_TILES[0], "BN": QUERY_TILES[1]}, NUM_WARPS)
        for name, kernel, sig, t, need in (("query", jsd_attention_grad_query_kernel, query_sig, QUERY_TILES, None),
                                           ("key", jsd_attention_grad_key_kernel, key_sig, KEY_TILES, True),
                                           ("key_v_only", jsd_attention_grad_key_kernel, key_sig, KEY_TILES, False)):
            flags = {"SELF": self_, "FAST_LOG": True, "POLY_LOGS": 0, **dict(zip(("BM", "BN", "BD"), t))}
            cases[f"jsd_attention_grad_{name}[{tag}]"] = (
                kernel, sig, flags if need is None else {**flags, "NEED_P": need}, ATTN_WARPS)
    return cases
