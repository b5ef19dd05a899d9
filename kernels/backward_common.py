"""Pieces the fused backward kernels share (kernels/jsd_backward.py, kernels/cdam_backward.py):
the per-class gradient accumulator, the g . v tile, the tile sizes and the host-side finish.
Kernel-level: imports only the other kernel modules and the package's leaf modules."""
import torch
import triton
import triton.language as tl

from .. import constants
from ..centring import log_terms
from .common import NARROW_TILES, log2_sum

NUM_WARPS = 4  # the divergence-only kernels (pairwise gradient, LSE)
# (BM, BN, BD) and warps of the attention gradient kernels on GPU: the largest tiles that compile
# spill-free for sm_90 (tests/test_autograd_compile.py); the key side also holds w^T and the
# value-gradient product, so it walks 32 queries at a time with 16-wide D chunks. Triton before
# 3.8 spills four query-side kernels at BM = 64 (76-456 bytes per thread; 3.6 measured,
# docs/compatibility.md) and none at BM = 32, which there uses mma.sync instead of wgmma.
QUERY_TILES = (32, 64, 32) if NARROW_TILES else (64, 64, 32)
KEY_TILES, ATTN_WARPS = (32, 64, 16), 8


@triton.jit
def accumulate_class_terms(aT, bT, wc, laT, lbT, G, offs_m, offs_n, mask_m, mask_n, n_a, n_b, C, acc,
                            QUERY_SIDE: tl.constexpr, FAST_LOG: tl.constexpr):
    """acc[c, own rows] += sum over the other side of G * (l_own - log2(s w_c)) for every class c.

    G is a [BM, BN] tile (rows offs_m of a, columns offs_n of b), zero outside the masks;
    QUERY_SIDE accumulates over columns into a's rows (offs_m), else over rows into b's (offs_n).
    wc: this batch element's [C] centring weights.
    """
    for c in range(C):
        c64 = tl.cast(c, tl.int64)  # c * n can pass 2^31
        a = tl.load(aT + c64 * n_a + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        b = tl.load(bT + c64 * n_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = tl.load(wc + c64)
        lg = log2_sum(a[:, None] + b[None, :], w, FAST_LOG)
        if QUERY_SIDE:
            la = tl.load(laT + c64 * n_a + offs_m, mask=mask_m, other=0.0)
            t = tl.sum(G * (la[:, None] - lg), axis=1)
            ptr = acc + c64 * n_a + offs_m
            tl.store(ptr, tl.load(ptr, mask=mask_m, other=0.0) + t, mask=mask_m)
        else:
            lb = tl.load(lbT + c64 * n_b + offs_n, mask=mask_n, other=0.0)
            t = tl.sum(G * (lb[None, :] - lg), axis=0)
            ptr = acc + c64 * n_b + offs_n
            tl.store(ptr, tl.load(ptr, mask=mask_n, other=0.0) + t, mask=mask_n)


@triton.jit
def row_dots(g, v, offs_m, offs_n, mask_m, mask_n, D, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """[BM, BN] tile of g_i . v_j (rows of g [*, D] and v [*, D]; zero outside the masks), the
    incoming gradient against the values, summed over D in BD chunks (3xTF32)."""
    gv = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        mask_d = offs_d < D
        gt = tl.load(g + offs_m[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                     other=0.0)
        vt = tl.load(v + offs_n[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                     other=0.0)
        gv = tl.dot(gt, tl.trans(vt), gv, input_precision="tf32x3")
    return gv


def class_major_log_terms(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """centring.log_terms class-major: [B, C, N] fp32."""
    return log_terms(p, w).transpose(1, 2).contiguous()


def finish(acc: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[B, C, n] class sums -> the gradient [B, n, C]: (ln 2 / 2) acc, and 0 where p = 0."""
    return torch.where(p > 0, constants.HALF_LN2 * acc.transpose(1, 2), 0.0)
