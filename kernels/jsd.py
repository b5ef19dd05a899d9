"""Pairwise Jensen-Shannon divergence: J [B, N, M] from class distributions."""
import torch
import triton
import triton.language as tl

from ..centring import centring_weights, row_terms
from .common import blocks, fast_log, flat_grid, jsd_tile, poly_logs, tile_ids

NUM_WARPS = 8  # with the 4-way unrolled class loop (POLY_LOGS > 0) 4 warps spill


@triton.jit
def pairwise_jsd_kernel(pT, qT, rp, rq, w, out, N, M, C, SELF: tl.constexpr, FAST_LOG: tl.constexpr,
                        POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m, pid_n, b = tile_ids(tl.cdiv(N, BM), tl.cdiv(M, BN))
    # J(p, p) is symmetric (and bitwise so: both orders add the same two floats), so with SELF
    # (square tiles) only tiles on or above the diagonal are computed, each stored twice: half
    # the logarithms, which bound this kernel.
    if (not SELF) or (pid_n >= pid_m):
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        j = jsd_tile(pT + b * C * N, qT + b * C * M, rp + b * N, rq + b * M, w + b * C, offs_m, offs_n, N, M, C,
                     SELF, FAST_LOG, BM, BN, POLY_LOGS)
        base = out + b * N * M
        mask = (offs_m[:, None] < N) & (offs_n[None, :] < M)
        tl.store(base + offs_m[:, None].to(tl.int64) * M + offs_n[None, :], j, mask=mask)
        if SELF and pid_n > pid_m:
            mask_t = (offs_n[:, None] < M) & (offs_m[None, :] < N)
            tl.store(base + offs_n[:, None].to(tl.int64) * M + offs_m[None, :], tl.trans(j), mask=mask_t)


def class_major(p: torch.Tensor) -> torch.Tensor:
    """[B, N, C] -> [B, C, N] contiguous, keeping the input dtype (loads widen to fp32)."""
    return p.transpose(1, 2).contiguous()


def operands(p: torch.Tensor, q: torch.Tensor | None):
    """(pT, qT, rp, rq, w): class-major distributions, their row terms and the centring weights
    [B, C] shared by p and q (cdam_fast/centring.py); qT, rq are pT, rp when q is None."""
    w = centring_weights(p, q)
    pT, rp = class_major(p), row_terms(p, w)
    if q is None:
        return pT, pT, rp, rp, w
    return pT, class_major(q), rp, row_terms(q, w), w


def pairwise_jsd(p: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    B, N, C = p.shape
    pT, qT, rp, rq, w = operands(p, q)
    M = qT.shape[2]
    out = torch.empty(B, N, M, device=p.device, dtype=torch.float32)
    BM, BN = blocks(N, 64), blocks(M, 64)  # equal when q is p: the mirrored tiles must be square
    grid = flat_grid(triton.cdiv(N, BM), triton.cdiv(M, BN), B)
    pairwise_jsd_kernel[grid](pT, qT, rp, rq, w, out, N, M, C, SELF=q is None, FAST_LOG=fast_log(),
                              POLY_LOGS=poly_logs(), BM=BM, BN=BN,
                              num_warps=NUM_WARPS)
    return out
