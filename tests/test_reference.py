"""The pure-torch reference (cdam_fast.reference) against formulations written independently here.

Everything runs in float64, so the tolerances are near machine precision: these tests pin down
the definition every backend is later compared with (spec section 2).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from cdam_fast import reference as ref
from cdam_fast.grids import CDAM_SCALES, bilinear_taps_2d
from conftest import random_distributions, random_similarities

LN2 = math.log(2.0)
F64 = torch.float64


# ------------------------------------------------------------------ independent formulations

def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) in nats over the last dim, with 0 log 0 = 0 (terms where a = 0 dropped)."""
    safe_b = torch.where(a > 0, b, torch.ones_like(b))
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    return torch.where(a > 0, a * torch.log(safe_a / safe_b), torch.zeros_like(a)).sum(-1)


def jsd_loop(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[N, C], [M, C] -> [N, M]: 0.5 KL(p || m) + 0.5 KL(q || m), one pair at a time."""
    out = torch.empty(p.shape[0], q.shape[0], dtype=F64)
    for i in range(p.shape[0]):
        for j in range(q.shape[0]):
            m = 0.5 * (p[i] + q[j])
            out[i, j] = 0.5 * kl(p[i], m) + 0.5 * kl(q[j], m)
    return out


def jsd_broadcast(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The same KL form as jsd_loop, vectorised over all pairs (for the larger multi-scale grids)."""
    a, b = p[:, None, :], q[None, :, :]
    m = 0.5 * (a + b)
    return 0.5 * kl(a.expand_as(m), m) + 0.5 * kl(b.expand_as(m), m)


def resize_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """Dense [out, in] matrix of 1-D linear interpolation, align_corners=False, no antialias:
    output k samples the input at x = (k + 1/2) * in/out - 1/2, clamped to [0, in - 1]."""
    mat = torch.zeros(out_size, in_size, dtype=F64)
    for k in range(out_size):
        x = min(max((k + 0.5) * in_size / out_size - 0.5, 0.0), in_size - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, in_size - 1)
        mat[k, lo] += 1.0 - (x - lo)
        mat[k, hi] += x - lo
    return mat


def grid_matrix(h: int, w: int, hs: int, ws: int) -> torch.Tensor:
    """[h*w, hs*ws]: bilinear resampling of a row-major hs x ws grid onto h x w (separable)."""
    return torch.kron(resize_matrix(h, hs), resize_matrix(w, ws))


def minmax_softmax_minmax(j: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The published pipeline of spec 2.5-2.6 taken literally: X = row min-max of (1 - J), then
    softmax(X / temperature) over the row, then a row min-max again. Constant rows give 1."""
    x = 1.0 - j
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    flat = (hi - lo) < ref.CONSTANT_ROW_EPS
    x = (x - lo) / torch.where(flat, torch.ones_like(hi), hi - lo)
    s = torch.softmax(x / temperature, -1)
    s_lo, s_hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    a = (s - s_lo) / torch.where(flat, torch.ones_like(s_hi), s_hi - s_lo)
    return torch.where(flat, torch.ones_like(a), a)


def multiscale_independent(sim: torch.Tensor, scales, tau: float, alpha: float) -> torch.Tensor:
    """Spec section 2 for one image, sim [C, h, w], with dense resampling matrices, the KL form of
    the divergence and the literal softmax-then-min-max transform (alpha = 1 / temperature)."""
    C, h, w = sim.shape
    maps = []
    for s in scales:
        hs, ws = (h, w) if s == 1.0 else (max(1, int(h * s)), max(1, int(w * s)))
        down = grid_matrix(hs, ws, h, w)                                  # [n_s, N]
        logits = down @ sim.reshape(C, h * w).T                           # [n_s, C]
        j = jsd_broadcast(*(2 * [torch.softmax(logits / tau, -1)]))
        up = grid_matrix(h, w, hs, ws)                                    # [N, n_s]
        maps.append(minmax_softmax_minmax(up @ j @ up.T, 1.0 / alpha))
    return torch.stack(maps).mean(0)


# ------------------------------------------------------------------ the divergence

@pytest.mark.parametrize("n,m,c", [(1, 1, 1), (6, 6, 2), (9, 5, 7), (4, 11, 33)])
def test_pairwise_jsd_matches_kl_form(gen, n, m, c):
    p = random_distributions(gen, n, c, dtype=F64)
    q = random_distributions(gen, m, c, dtype=F64)
    torch.testing.assert_close(ref.pairwise_jsd(p[None], q[None])[0], jsd_loop(p, q), rtol=0, atol=1e-13)
    torch.testing.assert_close(ref.pairwise_jsd(p[None])[0], jsd_loop(p, p), rtol=0, atol=1e-13)


def test_pairwise_jsd_properties(gen):
    p = random_distributions(gen, 3, 17, 9, dtype=F64)
    j = ref.pairwise_jsd(p)
    torch.testing.assert_close(j, j.transpose(1, 2), rtol=0, atol=1e-15)
    assert torch.equal(j.diagonal(dim1=1, dim2=2), torch.zeros(3, 17, dtype=F64))
    assert j.min() >= 0.0 and j.max() <= LN2 + 1e-15
    off = j[:, ~torch.eye(17, dtype=torch.bool)]
    assert off.min() > 0.0  # distinct random rows are at positive divergence
    # Explicit q = p: the diagonal is zero up to rounding (only q=None makes it exactly 0).
    assert ref.pairwise_jsd(p, p).diagonal(dim1=1, dim2=2).abs().max() < 1e-14


def test_pairwise_jsd_disjoint_supports_is_ln2(gen):
    c = 12
    a = torch.zeros(5, c, dtype=F64)
    b = torch.zeros(4, c, dtype=F64)
    a[:, :6] = torch.rand(5, 6, generator=gen, dtype=F64) + 0.1
    b[:, 6:] = torch.rand(4, 6, generator=gen, dtype=F64) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    torch.testing.assert_close(ref.pairwise_jsd(a[None], b[None])[0], torch.full((5, 4), LN2, dtype=F64),
                               rtol=0, atol=1e-14)
    one_hot = torch.eye(c, dtype=F64)[None]
    expected = LN2 * (1.0 - torch.eye(c, dtype=F64))
    torch.testing.assert_close(ref.pairwise_jsd(one_hot)[0], expected, rtol=0, atol=1e-15)


def test_pairwise_jsd_float32_input_is_computed_in_float32(gen):
    p = random_distributions(gen, 2, 8, 5)
    assert ref.pairwise_jsd(p).dtype == torch.float32
    torch.testing.assert_close(ref.pairwise_jsd(p).double(), ref.pairwise_jsd(p.double()), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ the row transform

def test_softmax_minmax_equals_expm1_form(gen):
    """Spec 2.6: for rows spanning exactly [0, 1], min-max(softmax(X / 0.1)) == expm1(10 X) / expm1(10)."""
    x = torch.rand(7, 30, generator=gen, dtype=F64)
    x = (x - x.amin(-1, keepdim=True)) / (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True))
    s = torch.softmax(x / 0.1, -1)
    literal = (s - s.amin(-1, keepdim=True)) / (s.amax(-1, keepdim=True) - s.amin(-1, keepdim=True))
    torch.testing.assert_close(literal, torch.expm1(10.0 * x) / math.expm1(10.0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("alpha", [10.0, 3.5])
def test_minmax_expm1_matches_literal_pipeline(gen, alpha):
    p = random_distributions(gen, 2, 13, 6, dtype=F64)
    j = ref.pairwise_jsd(p)
    torch.testing.assert_close(ref.minmax_expm1(j, alpha), minmax_softmax_minmax(j, 1.0 / alpha), rtol=0, atol=1e-13)


def test_cdam_map_range_diagonal_and_row_max(gen):
    a = ref.cdam_map(random_distributions(gen, 3, 21, 8, dtype=F64))
    assert a.min() >= 0.0 and a.max() <= 1.0
    # J_ii = 0 is each row's minimum, so X_ii = 1 and A_ii = 1: the diagonal is the row maximum.
    torch.testing.assert_close(a.diagonal(dim1=1, dim2=2), torch.ones(3, 21, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(a.amax(-1), torch.ones(3, 21, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(a.amin(-1), torch.zeros(3, 21, dtype=F64), rtol=0, atol=1e-15)
    assert not torch.allclose(a, a.transpose(1, 2), atol=1e-3), "the CDAM map is not symmetric"
    assert not torch.allclose(a.sum(-1), torch.ones(3, 21, dtype=F64), atol=1e-3), "nor row-stochastic"


def test_constant_rows_give_ones(gen):
    # N = 1: the only divergence is the zero diagonal.
    for dt in (F64, torch.float32):
        p = random_distributions(gen, 1, 1, 5, dtype=dt)
        assert torch.equal(ref.cdam_map(p), torch.ones(1, 1, 1, dtype=dt))
    # Identical rows: every divergence is 0 (rounding may leave ~1e-17, far below the 1e-6 rule).
    row = random_distributions(gen, 1, 7, dtype=F64)
    same = row.expand(6, 7)[None].contiguous()
    assert torch.equal(ref.cdam_map(same), torch.ones(1, 6, 6, dtype=F64))
    # One class: every distribution is [1].
    assert torch.equal(ref.cdam_map(torch.ones(2, 4, 1, dtype=F64)), torch.ones(2, 4, 4, dtype=F64))
    # Rows whose span is below the 1e-6 nats rule become ones, rows above it are transformed.
    j = torch.tensor([[[0.0, 4e-7, 2e-7], [0.5, 0.0, 0.25]]], dtype=F64)
    torch.testing.assert_close(ref.minmax_expm1(j, 10.0),
                               torch.tensor([[[1.0, 1.0, 1.0], [0.0, 1.0, math.expm1(5.0) / math.expm1(10.0)]]],
                                            dtype=F64), rtol=0, atol=1e-15)


def test_attention_references_match_their_definitions(gen):
    p = random_distributions(gen, 9, 6, dtype=F64)
    q = random_distributions(gen, 12, 6, dtype=F64)
    v = torch.randn(12, 5, generator=gen, dtype=F64)
    j = jsd_loop(p, q)
    expected = torch.softmax(-j / 0.07, -1) @ v
    torch.testing.assert_close(ref.jsd_attention(p[None], v[None], 0.07, q[None])[0], expected, rtol=0, atol=1e-13)
    vp = v[:9]
    a = minmax_softmax_minmax(jsd_loop(p, p), 0.1)
    torch.testing.assert_close(ref.cdam_attention(p[None], vp[None])[0], a @ vp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref.jsd_attention(p[None], vp[None])[0],
                               torch.softmax(-jsd_loop(p, p) / 0.1, -1) @ vp, rtol=0, atol=1e-13)


# ------------------------------------------------------------------ grids

@pytest.mark.parametrize("h,w,hs,ws", [(7, 5, 3, 2), (6, 6, 4, 4), (5, 9, 1, 2), (4, 3, 4, 3)])
def test_upsample_pairs_matches_tap_gather_and_dense_matrices(gen, h, w, hs, ws):
    n = hs * ws
    # Not symmetric on purpose: swapping the query and key axes must show.
    j = torch.rand(2, n, n, generator=gen, dtype=F64)
    got = ref._upsample_pairs(j, hs, ws, h, w)
    idx, wts = bilinear_taps_2d(h, w, hs, ws)
    idx, wts = idx.long(), wts.double()
    # up[b, i, k] = sum_{t, u} wts[i, t] wts[k, u] j[b, idx[i, t], idx[k, u]]
    gathered = j[:, idx[:, :, None, None], idx[None, None, :, :]]  # [B, N, 4, N, 4]
    by_taps = torch.einsum("it,ku,bitku->bik", wts, wts, gathered)
    # bilinear_taps_2d stores float32 weights, hence 1e-7 rather than machine precision here.
    torch.testing.assert_close(got, by_taps, rtol=0, atol=1e-7)
    up = grid_matrix(h, w, hs, ws)
    torch.testing.assert_close(got, up @ j @ up.T, rtol=0, atol=1e-14)


@pytest.mark.parametrize("size_in,size_out", [(7, 3), (3, 7), (28, 24), (5, 1), (1, 4)])
def test_resize_matrix_is_torch_bilinear(gen, size_in, size_out):
    """Checks the test's own resampling matrices against F.interpolate (both directions)."""
    x = torch.randn(1, 2, size_in, 3, generator=gen, dtype=F64)
    want = F.interpolate(x, size=(size_out, 3), mode="bilinear", align_corners=False, antialias=False)
    got = torch.einsum("oi,bcij->bcoj", resize_matrix(size_out, size_in), x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)  # torch rounds the source coordinate differently


@pytest.mark.parametrize("h,w,scales", [
    (8, 8, CDAM_SCALES),
    (9, 6, CDAM_SCALES),
    (3, 5, CDAM_SCALES),          # s = 0.25 rounds to a 0 x 1 grid, kept at 1 x 1
    (7, 4, (0.6,)),               # no full-scale term at all
    (5, 6, (1.0, 0.5, 0.5)),      # a repeated scale counts twice in the mean
])
def test_multiscale_map_matches_independent_pipeline(gen, h, w, scales):
    sim = random_similarities(gen, 2, 6, h, w, dtype=F64)
    got = ref.multiscale_cdam_map(sim, scales, 0.1, 10.0)
    want = torch.stack([multiscale_independent(s, scales, 0.1, 10.0) for s in sim])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_multiscale_map_default_scales_and_tau(gen):
    sim = random_similarities(gen, 1, 4, 6, 7, dtype=F64)
    want = multiscale_independent(sim[0], CDAM_SCALES, 0.1, 10.0)[None]
    torch.testing.assert_close(ref.multiscale_cdam_map(sim), want, rtol=0, atol=1e-10)
    other = multiscale_independent(sim[0], CDAM_SCALES, 0.2, 10.0)[None]
    assert (ref.multiscale_cdam_map(sim, None, 0.2) - other).abs().max() < 1e-10
    # tau matters: the map at tau = 0.2 is not the map at 0.1.
    assert (ref.multiscale_cdam_map(sim) - other).abs().max() > 1e-3
