"""Divergence attention softmax_j(-J_ij / tau) @ V in one pass (online softmax, O(N) memory).

For training (WRITE_LSE) the kernel also writes each row's log-sum-exp in the base-2 domain of
its logits, lse_i = log2 sum_j 2^(-J_ij log2(e) / tau) (fp32, [B, N]): the FlashAttention-2
backward (kernels/jsd_backward.py) rebuilds the softmax weights from it instead of running a
pass of its own over the key tiles. Without WRITE_LSE the kernel is the inference kernel as before.
"""
import torch
import triton
import triton.language as tl

from .common import blocks, fast_log, flat_grid, jsd_tile, log2, logit_scale, poly_logs, product, tile_ids, value_tiles
from .jsd import operands


NUM_WARPS = 8  # spill-free on sm_90 with the fp32 (3xTF32) product; 4 warps spill


@triton.jit
def jsd_attention_kernel(pT, qT, rp, rq, wc, v, out, lse, N, M, C, D, neg_log2e_over_tau,
                         SELF: tl.constexpr, V_IS_FP32: tl.constexpr, FAST_LOG: tl.constexpr, POLY_LOGS: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, WRITE_LSE: tl.constexpr):
    pid_m, pid_d, b = tile_ids(tl.cdiv(N, BM), tl.cdiv(D, BD))
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_m = offs_m < N
    mask_d = offs_d < D
    row_max = tl.full((BM,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for n0 in range(0, M, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < M
        j = jsd_tile(pT + b * C * N, qT + b * C * M, rp + b * N, rq + b * M, wc + b * C, offs_m, offs_n, N, M, C,
                     SELF, FAST_LOG, BM, BN, POLY_LOGS)
        logits = tl.where(mask_n[None, :], j * neg_log2e_over_tau, float("-inf"))  # base-2 logits
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        rescale = tl.exp2(row_max - new_max)
        w = tl.exp2(logits - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(w, axis=1)
        acc = product(w, v + b * M * D, M, D, n0, pid_d * BD, acc * rescale[:, None], V_IS_FP32, BN, BD)
        row_max = new_max
    acc = acc / row_sum[:, None]
    o_ptrs = out + b * N * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    if WRITE_LSE:  # every D tile has the same statistics: the first one writes them
        tl.store(lse + b * N + offs_m, row_max + log2(row_sum, FAST_LOG), mask=mask_m & (pid_d == 0))


def jsd_attention(p: torch.Tensor, v: torch.Tensor, tau: float, q: torch.Tensor | None, with_lse: bool = False):
    """out [B, N, D] in v's dtype; with_lse: (out, lse) with the row log-sum-exp lse [B, N] fp32 (base 2)."""
    B, N, C = p.shape
    pT, qT, rp, rq, w = operands(p, q)
    M, D = v.shape[1], v.shape[2]
    out = torch.empty(B, N, D, device=v.device, dtype=v.dtype)
    lse = torch.empty(B, N, device=v.device, dtype=torch.float32) if with_lse else rp  # rp: an unused placeholder
    bm, bn, bd = value_tiles(D, v.dtype == torch.float32, reads_j=False, poly=poly_logs() > 0)
    BM, BN, BD = blocks(N, bm), blocks(M, bn), blocks(D, bd)
    grid = flat_grid(triton.cdiv(N, BM), triton.cdiv(D, BD), B)
    jsd_attention_kernel[grid](pT, qT, rp, rq, w, v, out, lse, N, M, C, D, logit_scale(tau), SELF=q is None,
                               V_IS_FP32=v.dtype == torch.float32, FAST_LOG=fast_log(), POLY_LOGS=poly_logs(), BM=BM, BN=BN, BD=BD,
                               WRITE_LSE=with_lse, num_warps=NUM_WARPS)
    return (out, lse) if with_lse else out
