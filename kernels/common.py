"""Pieces every divergence kernel shares: the log, the pairwise tile, the CDAM row transform.

Notation (cdam_fast/centring.py): with s = p_i + q_j and per-class weights w_c = 1 / (2 u_c),
u the batch element's mean class distribution, the Jensen-Shannon divergence in nats is
    J_ij = (ln 2 / 2) * (r_i + r'_j - sum_c s_c log2(s_c w_c)),   r_i = sum_c p_ic log2(2 p_ic w_c),
so once the per-row terms r are known the pairwise work is one add, one multiply, one lg2 and
one FMA per (i, j, c); centring makes the summed terms small, so fp32 keeps J accurate on flat
distributions. Distributions are passed class-major (pT [C, N]) so each class step is a
contiguous vector load. Launch grids are one-dimensional (tile_ids), so no batch or tile count
meets the 65535 limit of grid axes y and z.
"""
import os
import re

import triton
import triton.language as tl

from .. import constants

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton before 3.8 (3.6 measured: its ptxas 12.8) allocates registers differently: a few tiles
# that compile spill-free on sm_90 with 3.8 spill there, so the tile choices below and in
# backward_common.py / cdam.py take narrower tiles for it (tests/test_kernels_compile.py and
# tests/test_autograd_compile.py check both; docs/compatibility.md). CDAM_FAST_TILES=narrow|wide
# picks a set whatever the version (read at import: A/B timing on one GPU, tests of both sets).
TILE_SETS = ("auto", "narrow", "wide")


def _narrow_tiles() -> bool:
    setting = os.environ.get("CDAM_FAST_TILES", "auto")
    if setting not in TILE_SETS:
        raise ValueError(f"CDAM_FAST_TILES must be one of {TILE_SETS}, got {setting!r}")
    if setting != "auto":
        return setting == "narrow"
    return tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2]) < (3, 8)


NARROW_TILES = _narrow_tiles()
HALF_LN2 = tl.constexpr(constants.HALF_LN2)
LN2 = tl.constexpr(constants.LN2)
# Rows whose divergences span less than this many nats are constant (spec 2.6): A = 1.
CONSTANT_ROW_EPS = tl.constexpr(constants.CONSTANT_ROW_EPS)
# s w below this contributes s * log2(TINY) ~ 0 instead of 0 * log2(0) = NaN.
TINY = tl.constexpr(constants.TINY_MASS)
# The backward's logs of tiny sums (constants.TINY_SUM): scaled into the normal range first.
TINY_SUM = tl.constexpr(constants.TINY_SUM)
TINY_SUM_SCALE = tl.constexpr(2.0 ** constants.TINY_SUM_EXPONENT)
TINY_SUM_EXPONENT = tl.constexpr(constants.TINY_SUM_EXPONENT)
# Largest program count of a one-dimensional grid.
MAX_GRID_X = 2**31 - 1


def flat_grid(*counts: int) -> tuple[int]:
    """The one-dimensional launch grid of a kernel whose programs tile_ids() decomposes into
    `counts` (fastest first); only grid axis x, which allows 2^31 - 1 programs, is used."""
    total = 1
    for c in counts:
        total *= c
    if total > MAX_GRID_X:
        raise ValueError(f"{total} programs exceed the {MAX_GRID_X} of a CUDA grid")
    return (total,)


@triton.jit
def tile_ids(n0, n1):
    """(i0, i1, b) of this program in a flat_grid(n0, n1, B) launch; b as int64 for offsets."""
    pid = tl.program_id(0)
    i0 = pid % n0
    rest = pid // n0
    return i0, rest % n1, (rest // n1).to(tl.int64)


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
def log2_sum(s, w, FAST_LOG: tl.constexpr):
    """log2(s w) for sums s = p + q >= 0 in the backward's gradient terms, exact for every s > 0:
    a sum below TINY_SUM (float32 subnormals included) is scaled by 2^TINY_SUM_EXPONENT before the
    product and the log (exact: a power of two), the exponent taken off after; other sums give
    log2(s w) bit for bit as before; s = 0 reads TINY (its terms are discarded)."""
    small = s < TINY_SUM
    x = tl.where(small, s * TINY_SUM_SCALE, s) * w
    return log2(tl.maximum(x, TINY), FAST_LOG) - tl.where(small, TINY_SUM_EXPONENT, 0.0)


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
def _class_term(pT, qT, wc, c, offs_m, offs_n, mask_m, mask_n, n_p, n_q, POLY: tl.constexpr, FAST_LOG: tl.constexpr):
    """s log2(s w_c) for class c, s = p_ic + q_jc, as a [BM, BN] tile."""
    c64 = tl.cast(c, tl.int64)  # c * n can pass 2^31 (C = 32768 classes at N = 65536)
    a = tl.load(pT + c64 * n_p + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    b = tl.load(qT + c64 * n_q + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    w = tl.load(wc + c64)
    s = a[:, None] + b[None, :]
    if POLY:
        lg = log2_poly(tl.maximum(s * w, TINY))
    else:
        lg = log2(tl.maximum(s * w, TINY), FAST_LOG)
    return s * lg


@triton.jit
def jsd_tile(pT, qT, rp, rq, wc, offs_m, offs_n, n_p, n_q, C, SELF: tl.constexpr, FAST_LOG: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, POLY_LOGS: tl.constexpr):
    """J for rows offs_m of p against rows offs_n of q, [BM, BN] fp32, clamped at 0 (NaN stays NaN).

    pT/qT point at this batch's [C, n] class-major distributions, rp/rq at its row terms, wc at
    its [C] centring weights.
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
                acc += _class_term(pT, qT, wc, c0 + g, offs_m, offs_n, mask_m, mask_n, n_p, n_q, g < POLY_LOGS,
                                   FAST_LOG)
    for c in range(c_tail, C):
        acc += _class_term(pT, qT, wc, c, offs_m, offs_n, mask_m, mask_n, n_p, n_q, False, FAST_LOG)
    ri = tl.load(rp + offs_m, mask=mask_m, other=0.0)
    rj = tl.load(rq + offs_n, mask=mask_n, other=0.0)
    j = (ri[:, None] + rj[None, :] - acc) * HALF_LN2
    j = tl.where(j < 0.0, 0.0, j)  # not tl.maximum: the GPU's max turns NaN into 0
    if SELF:
        j = tl.where(offs_m[:, None] == offs_n[None, :], 0.0, j)
    return j


@triton.jit
def merge_row_extremes(u, valid, hi, lo, nhi, nlo):
    """The running row max / min (hi, lo [BM]) after one more [BM, BN] tile u (entries outside
    `valid` ignored), and how many entries attain each (nhi, nlo, as floats). Exact comparisons:
    the backward finds the tie positions where its recomputed J equals hi / lo, so whoever
    computes these statistics must see J bit for bit as the backward does."""
    t_hi = tl.max(tl.where(valid, u, float("-inf")), axis=1)
    t_lo = tl.min(tl.where(valid, u, float("inf")), axis=1)
    c_hi = tl.sum(tl.where(valid & (u == t_hi[:, None]), 1.0, 0.0), axis=1)
    c_lo = tl.sum(tl.where(valid & (u == t_lo[:, None]), 1.0, 0.0), axis=1)
    nhi = tl.where(t_hi > hi, c_hi, tl.where(t_hi == hi, nhi + c_hi, nhi))
    nlo = tl.where(t_lo < lo, c_lo, tl.where(t_lo == lo, nlo + c_lo, nlo))
    return tl.maximum(hi, t_hi), tl.minimum(lo, t_lo), nhi, nlo


@triton.jit
def cdam_transform(u, hi, lo, alpha_log2e, exp_neg_alpha, factor, SMALL_ALPHA: tl.constexpr):
    """Spec 2.5-2.6 on a tile: A = expm1(alpha X) / expm1(alpha), X = (hi - u) / (hi - lo) per row
    (1 on constant rows), hi/lo [BM] the row statistics of u.

    Evaluated as A = (exp(-alpha t) - exp(-alpha)) * factor, factor = 1 / (1 - exp(-alpha)), with
    t = 1 - X = (u - lo) / span taken directly (1 - X would round): every term is <= 1, the
    exponent is <= 0 (alpha log2e arrives clamped to the float32 range), so nothing overflows for
    any alpha, and small A keep their relative accuracy. t = 0 (the row minimum of J, and every
    entry of a constant row) gives exactly 1: constants.transform_factors rounds factor so that
    (1 - exp(-alpha)) * factor is 1 in float32. With SMALL_ALPHA (alpha < constants.SMALL_ALPHA_LIMIT),
    where that difference cancels, A = exp(-alpha t) X g(alpha X) * factor, g(y) = (1 - e^-y) / y
    by its Taylor series, factor = 1 / g(alpha). NaN in a row (hi NaN) gives NaN, never a
    plausible map.
    """
    span = hi - lo
    flat = span < CONSTANT_ROW_EPS  # False for NaN
    inv = tl.where(flat, 0.0, 1.0 / tl.where(flat, 1.0, span))
    t = (u - lo[:, None]) * inv[:, None]
    t = tl.where(t < 0.0, 0.0, t)  # a recomputed J may round below the row minimum; NaN stays
    e = tl.exp2(-alpha_log2e * t)  # exactly 1 at t = 0
    if SMALL_ALPHA:
        x = (hi[:, None] - u) * inv[:, None]
        y = alpha_log2e * LN2 * x  # alpha X in [0, 1/8]
        g = 1.0 - y * (0.5 - y * (1.0 / 6.0 - y * (1.0 / 24.0 - y * (1.0 / 120.0 - y * (1.0 / 720.0 - y * (
            1.0 / 5040.0))))))
        a = tl.where(t == 0.0, 1.0, e * x * g * factor)
    else:
        a = (e - exp_neg_alpha) * factor  # factor makes (1 - exp_neg_alpha) * factor exactly 1 in fp32
    return tl.where(a < 0.0, 0.0, a)  # t may round to 1 + ulp; a NaN-keeping clamp


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
    compile spill-free on sm_90 with the installed Triton (tests/test_kernels_compile.py; the
    register allocation differs between 3.6 and 3.8, see NARROW_TILES, and both are checked).

    A kernel that recomputes J does so once per BD columns of V, so wide 16-bit V gets BD = 256
    (half the logs of BD = 128 at D = 768). Kernels reading a stored J, splitting fp32 V into
    3xTF32, gathering bilinear taps (multi-scale) or evaluating polynomial logs hold more live
    values and take narrower tiles to stay out of local memory; so does every kernel recomputing
    J on Triton before 3.8, where 64 x 64 spilled in fp16 jsd_attention and in cdam_product's
    small-alpha transform (32 / 44 bytes per thread).
    """
    if reads_j:
        return (32, 64, 128) if v_is_fp32 else (64, 32, 128)
    wide = not v_is_fp32 and D > 128
    if multi:
        return 32, 64, 256 if wide else 128
    if wide:
        return 64, 32, 256
    return (64, 32, 128) if poly or NARROW_TILES else (64, 64, 128)


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


def logit_scale(tau: float) -> float:
    """-log2(e) / tau, the base-2 logit scale of J, one for the forward and the backward (which
    recomputes the forward's weights from its saved LSE). J <= ln 2, so clamping it to the
    float32 range keeps every logit finite for any tau > 0 (a tau below ~3e-39 would otherwise
    make it -inf and 0 * inf = NaN on the diagonal)."""
    return max(-constants.LOG2E / tau, -constants.FLOAT32_MAX)


MIN_TILE = 16  # the smallest tile edge blocks() returns (tl.dot needs 16)


def blocks(n: int, big: int) -> int:
    """A power-of-two tile edge: `big` on GPU; in the interpreter, whose cost is per program and
    per op, CDAM_FAST_INTERPRET_BLOCK (default 32) so small test shapes still span several tiles,
    or `big` itself when it is "production" (the GPU's tiles, for tests of that code path)."""
    edge = big
    if INTERPRETED:
        setting = os.environ.get("CDAM_FAST_INTERPRET_BLOCK", "32")
        edge = big if setting == "production" else int(setting)
    return max(MIN_TILE, min(edge, triton.next_power_of_2(max(n, 1))))
