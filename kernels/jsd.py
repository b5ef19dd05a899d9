"""Pairwise Jensen-Shannon divergence: J [B, N, M] from class distributions."""
import torch
import triton
import triton.language as tl

from .common import blocks, fast_log, jsd_tile, poly_logs

_LN2 = 0.6931471805599453
NUM_WARPS = 8  # with the 4-way unrolled class loop (POLY_LOGS > 0) 4 warps spill


@triton.jit
def pairwise_jsd_kernel(pT, qT, rp, rq, out, N, M, C, SELF: tl.constexpr, FAST_LOG: tl.constexpr,
                        POLY_LOGS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    # J(p, p) is symmetric (and bitwise so: both orders add the same two floats), so with SELF
    # (square tiles) only tiles on or above the diagonal are computed, each stored twice: half
    # the logarithms, which bound this kernel.
    if (not SELF) or (pid_n >= pid_m):
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        j = jsd_tile(pT + b * C * N, qT + b * C * M, rp + b * N, rq + b * M, offs_m, offs_n, N, M, C, SELF,
                     FAST_LOG, BM, BN, POLY_LOGS)
        base = out + b * N * M
        mask = (offs_m[:, None] < N) & (offs_n[None, :] < M)
        tl.store(base + offs_m[:, None].to(tl.int64) * M + offs_n[None, :], j, mask=mask)
        if SELF and pid_n > pid_m:
            mask_t = (offs_n[:, None] < M) & (offs_m[None, :] < N)
            tl.store(base + offs_n[:, None].to(tl.int64) * M + offs_m[None, :], tl.trans(j), mask=mask_t)


def class_major(p: torch.Tensor) -> torch.Tensor:
    """[B, N, C] -> [B, C, N] contiguous, keeping the input dtype (loads widen to fp32)."""
    return p.transpose(1, 2).contiguous()


def row_terms(p: torch.Tensor) -> torch.Tensor:
    """r_i = sum_c p_ic (log2 p_ic + 1) in fp32 (0 log 0 = 0), from the same values the kernel reads."""
    pf = p.float()
    return (torch.xlogy(pf, pf).sum(-1) / _LN2 + pf.sum(-1)).contiguous()


def pairwise_jsd(p: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    B, N, C = p.shape
    pT, rp = class_major(p), row_terms(p)
    qT, rq = (pT, rp) if q is None else (class_major(q), row_terms(q))
    M = qT.shape[2]
    out = torch.empty(B, N, M, device=p.device, dtype=torch.float32)
    BM, BN = blocks(N, 64), blocks(M, 64)  # equal when q is p: the mirrored tiles must be square
    grid = (triton.cdiv(N, BM), triton.cdiv(M, BN), B)
    pairwise_jsd_kernel[grid](pT, qT, rp, rq, out, N, M, C, SELF=q is None, FAST_LOG=fast_log(),
                              POLY_LOGS=poly_logs(), BM=BM, BN=BN,
                              num_warps=NUM_WARPS)
    return out
