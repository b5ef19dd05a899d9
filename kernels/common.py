"""Pieces every divergence kernel shares: the log, the pairwise tile, the CDAM row transform.

Notation: with s = p_i + q_j, the Jensen-Shannon divergence in nats is
    J_ij = (ln 2 / 2) * (r_i + r'_j - sum_c s_c log2 s_c),   r_i = sum_c p_ic (log2 p_ic + 1),
so once the per-row terms r are known the pairwise work is one add, one lg2 and one FMA per
(i, j, c). Distributions are passed class-major (pT [C, N]) so each class step is a
contiguous vector load.
"""
import os

import triton
import triton.language as tl

from .. import reference

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
HALF_LN2 = tl.constexpr(0.34657359027997264)
LOG2E = 1.4426950408889634
# Rows whose divergences span less than this many nats are constant (spec 2.6): A = 1.
CONSTANT_ROW_EPS = tl.constexpr(reference.CONSTANT_ROW_EPS)
# s below this contributes s * log2(TINY) ~ 0 instead of 0 * log2(0) = NaN.
TINY = tl.constexpr(1e-30)


@triton.jit
def log2(x, FAST_LOG: tl.constexpr):
    # Triton's fp32 log2 lowers to libdevice's accurate polynomial on the FMA pipe; the
    # divergence is bound by logs, so on CUDA use the special-function unit's lg2.approx
    # (rel. error ~2^-22, far below what J's fp32 accumulation resolves anyway).
    if FAST_LOG:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def log2_poly(x):
    """log2 of a positive normal float on the FMA pipe instead of the special-function unit.

    The exponent comes from the bits, chosen so the mantissa m = x / 2^e lies in [0.75, 1.5);
    log2(m) = f q(f), f = m - 1, with a degree-6 least-squares fit on [-0.25, 0.5)
    (max error 2.7e-6, i.e. < 2e-6 nats on J even if every log took this path).
    """
    bits = x.to(tl.int32, bitcast=True)
    e = (bits - 0x3F400000) >> 23
    f = (bits - (e << 23)).to(tl.float32, bitcast=True) - 1.0
    q = -0.13873089849948883 * f + 0.2881627082824707
    q = q * f - 0.37115728855133057
    q = q * f + 0.4821029603481293
    q = q * f - 0.7211095094680786
    q = q * f + 1.4426705837249756
    return e.to(tl.float32) + q * f


@triton.jit
def _class_term(pT, qT, c, offs_m, offs_n, mask_m, mask_n, n_p, n_q, POLY: tl.constexpr, FAST_LOG: tl.constexpr):
    """s log2 s for class c, s = p_ic + q_jc, as a [BM, BN] tile."""
    a = tl.load(pT + c * n_p + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    b = tl.load(qT + c * n_q + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    s = a[:, None] + b[None, :]
    if POLY:
        lg = log2_poly(tl.maximum(s, TINY))
    else:
        lg = log2(tl.maximum(s, TINY), FAST_LOG)
    return s * lg


@triton.jit
def jsd_tile(pT, qT, rp, rq, offs_m, offs_n, n_p, n_q, C, SELF: tl.constexpr, FAST_LOG: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, POLY_LOGS: tl.constexpr):
    """J for rows offs_m of p against rows offs_n of q, [BM, BN] fp32, clamped at 0.

    pT/qT point at this batch's [C, n] class-major distributions, rp/rq at its row terms.
    Out-of-range rows/columns read zeros (finite; callers mask them). POLY_LOGS of every 4
    classes take their log from log2_poly, so the FMA pipe shares the work of the
    special-function unit, which alone bounds the kernel (as FlashAttention-4 does for exp2).
    """
    mask_m = offs_m < n_p
    mask_n = offs_n < n_q
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    c_tail = 0
    if POLY_LOGS > 0:
        c_tail = C - C % 4
        for c0 in range(0, c_tail, 4):
            for g in tl.static_range(4):
                acc += _class_term(pT, qT, c0 + g, offs_m, offs_n, mask_m, mask_n, n_p, n_q, g < POLY_LOGS,
                                   FAST_LOG)
    for c in range(c_tail, C):
        acc += _class_term(pT, qT, c, offs_m, offs_n, mask_m, mask_n, n_p, n_q, False, FAST_LOG)
    ri = tl.load(rp + offs_m, mask=mask_m, other=0.0)
    rj = tl.load(rq + offs_n, mask=mask_n, other=0.0)
    j = tl.maximum((ri[:, None] + rj[None, :] - acc) * HALF_LN2, 0.0)
    if SELF:
        j = tl.where(offs_m[:, None] == offs_n[None, :], 0.0, j)
    return j


# Below this alpha the bounded form's difference E - exp(-alpha) cancels (it is ~alpha X): with
# ex2.approx's 2^-22 relative error the map would be off by ~2.4e-7 / alpha, so those alphas
# take a Taylor 1 - exp(-alpha X) instead (relative error < 1e-9 for alpha X <= 1/8).
SMALL_ALPHA_LIMIT = 0.125
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def expm1_transform(u, hi, lo, alpha_log2e, exp_neg_alpha, inv_denominator, SMALL_ALPHA: tl.constexpr):
    """Spec 2.5-2.6 on a tile: X = (hi - u) / (hi - lo) per row (1 on constant rows),
    A = expm1(alpha X) / expm1(alpha), evaluated as (exp(alpha (X - 1)) - exp(-alpha)) /
    (1 - exp(-alpha)): the same value with every factor <= 1, so no overflow for alpha > 88
    where exp(alpha X) is inf in fp32. With SMALL_ALPHA (alpha < 0.125) as
    exp(alpha (X - 1)) (1 - exp(-alpha X)) / (1 - exp(-alpha)), free of cancellation.
    hi/lo are [BM] row statistics of u."""
    span = hi - lo
    flat = span < CONSTANT_ROW_EPS
    inv = tl.where(flat, 0.0, 1.0 / tl.where(flat, 1.0, span))
    x = tl.where(flat[:, None], 1.0, (hi[:, None] - u) * inv[:, None])
    e = tl.exp2(alpha_log2e * (x - 1.0))
    if SMALL_ALPHA:
        y = alpha_log2e * LN2 * x  # alpha X in [0, 1/8]
        one_minus_exp = y * (1.0 - y * (0.5 - y * (1.0 / 6.0 - y * (1.0 / 24.0 - y * (1.0 / 120.0 - y * (
            1.0 / 720.0 - y * (1.0 / 5040.0)))))))
        return e * one_minus_exp * inv_denominator
    return (e - exp_neg_alpha) * inv_denominator


@triton.jit
def product(a, v_base, rows, D, n0, d0, acc, V_IS_FP32: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """acc += a @ v[n0:n0+BN, d0:d0+BD] on tensor cores (v_base: this batch's [rows, D] values);
    fp32 values use 3xTF32 so the product stays fp32-accurate."""
    vp = tl.make_block_ptr(v_base, shape=(rows, D), strides=(D, 1), offsets=(n0, d0), block_shape=(BN, BD),
                           order=(1, 0))
    v = tl.load(vp, boundary_check=(0, 1), padding_option="zero")
    if V_IS_FP32:
        acc = tl.dot(a, v, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a.to(v.dtype), v, acc)
    return acc


def value_tiles(D: int, v_is_fp32: bool, reads_j: bool, multi: bool = False, poly: bool = False) -> tuple[int, int, int]:
    """(BM, BN, BD) of a kernel that multiplies weights with V, on GPU: the largest tiles that
    compile spill-free on sm_90 with both Triton 3.6 (ptxas 12.8) and 3.8 (tests/test_kernels_compile.py;
    the register allocation differs between the two, so every choice was checked on both).

    A kernel that recomputes J does so once per BD columns of V, so wide 16-bit V gets BD = 256
    (half the logs of BD = 128 at D = 768). Kernels reading a stored J, splitting fp32 V into
    3xTF32, gathering bilinear taps (multi-scale) or evaluating polynomial logs hold more live
    values and take narrower tiles to stay out of local memory.
    """
    if reads_j:
        return (32, 64, 128) if v_is_fp32 else (64, 32, 128)
    wide = not v_is_fp32 and D > 128
    if multi:
        return 32, 64, 256 if wide else 128
    if wide:
        return 64, 32, 256
    return (64, 32, 128) if poly else (64, 64, 128)


def poly_logs() -> int:
    """How many of every 4 class logs run as FMA polynomials (CDAM_FAST_POLY_LOGS, 0-4; default 0
    until a GPU measurement shows the split pays off, see benchmarks/RESULTS.md)."""
    n = int(os.environ.get("CDAM_FAST_POLY_LOGS", "0"))
    if not 0 <= n <= 4:
        raise ValueError(f"CDAM_FAST_POLY_LOGS must be an integer from 0 to 4, got {n}")
    return n


def fast_log() -> bool:
    """lg2.approx exists on NVIDIA GPUs only; the interpreter (numpy) has no inline asm."""
    import torch

    return not INTERPRETED and torch.version.hip is None


def blocks(n: int, big: int) -> int:
    """A power-of-two tile edge: `big` on GPU; in the interpreter, whose cost is per program and
    per op, CDAM_FAST_INTERPRET_BLOCK (default 32) so small test shapes still span several tiles."""
    edge = int(os.environ.get("CDAM_FAST_INTERPRET_BLOCK", 32)) if INTERPRETED else big
    return max(16, min(edge, triton.next_power_of_2(max(n, 1))))
