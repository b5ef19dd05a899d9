"""The benchmark baselines compute what cdam_fast.reference computes (float64 reference on
fresh random inputs), each at a tolerance fitting its working dtype."""
import pytest
import torch

from cdam_fast import reference as ref
from cdam_fast.benchmarks import baselines as bl
from cdam_fast.benchmarks import keops_baseline
from cdam_fast.grids import CDAM_SCALES

SINGLE = ("pairwise_jsd", "cdam_map", "cdam_attention", "jsd_attention")
MULTI = ("multiscale_cdam_map", "multiscale_cdam_attention")


def _inputs(op, gen, B=2, N=40, C=13, D=6, grid=(9, 8)):
    """float64 inputs for `op`: distributions / similarity grids, and values for attention ops."""
    if op in MULTI:
        first = 0.2 + 0.05 * torch.randn(B, C, *grid, generator=gen, dtype=torch.float64)
        N = grid[0] * grid[1]
    else:
        first = torch.softmax(3.0 * torch.randn(B, N, C, generator=gen, dtype=torch.float64), dim=-1)
    if "attention" in op:
        return first, torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    return (first,)


def _expected(op, args):
    if op in MULTI:
        return getattr(ref, op)(*args, CDAM_SCALES)
    return getattr(ref, op)(*args)


def _call(fn, op, args, **kw):
    return fn(*args, CDAM_SCALES, **kw) if op in MULTI else fn(*args, **kw)


@pytest.mark.parametrize("op", SINGLE + MULTI)
def test_plain_formula_matches_reference_float64(op, gen):
    args = _inputs(op, gen)
    got = _call(bl.PLAIN[op], op, args)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _expected(op, args), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", SINGLE + MULTI)
def test_published_order_matches_reference_in_float64(op, gen):
    # The published order (softmax of the min-max map, then min-max again) equals the expm1
    # form exactly; in float64 only rounding separates them.
    args = _inputs(op, gen)
    got = _call(bl.PUBLISHED[op], op, args, dtype=torch.float64)
    torch.testing.assert_close(got.double(), _expected(op, args), rtol=1e-9, atol=1e-10)


# Tolerances of the CPU default (fp32): J is ~1e-7 off; the map's row normalisation
# amplifies that by alpha / (max J - min J), and the attention sums N of them times v.
FP32_TOL = {"pairwise_jsd": 2e-6, "cdam_map": 5e-5, "cdam_attention": 2e-4, "jsd_attention": 5e-5,
            "multiscale_cdam_map": 5e-5, "multiscale_cdam_attention": 2e-4}


@pytest.mark.parametrize("op", SINGLE + MULTI)
def test_published_order_float32_default_on_cpu(op, gen):
    assert bl.published_dtype(torch.device("cpu")) == torch.float32
    args = _inputs(op, gen)
    got = _call(bl.PUBLISHED[op], op, args)
    torch.testing.assert_close(got.double(), _expected(op, args), rtol=0, atol=FP32_TOL[op])


def test_published_order_float16_divergence(gen):
    # The GPU working dtype: H(m) ~ log C is rounded to fp16 (about 1e-3 absolute), so J is
    # only good to a few 1e-3; a wrong formula is off by 0.1 or more.
    (p,) = _inputs("pairwise_jsd", gen, C=101)
    j = bl.published_pairwise_jsd(p, dtype=torch.float16)
    expected = ref.pairwise_jsd(p)
    assert float(expected.max()) > 0.2  # the comparison is not vacuous
    torch.testing.assert_close(j.double(), expected, rtol=0, atol=1.5e-2)


def test_published_order_float16_map_keeps_its_shape(gen):
    (p,) = _inputs("cdam_map", gen, N=24, C=101)
    a = bl.published_cdam_map(p, dtype=torch.float16)
    expected = ref.cdam_map(p)
    assert torch.isfinite(a).all()
    # every row has its maximum 1 on its own diagonal and its minimum 0, as in the reference
    torch.testing.assert_close(a.amax(-1).double(), torch.ones_like(expected[..., 0]), rtol=0, atol=1e-3)
    assert (a.argmax(-1) == expected.argmax(-1)).all()
    # fp16 costs ~1e-5 on average; alpha 5 instead of 10 would cost ~5e-3
    assert (a - expected).abs().mean() < 1e-4
    assert (a - expected).abs().max() < 5e-3


def test_upsample_pairs_is_separable_bilinear(gen):
    # Independent check of the pair upsampling: interpolating J along keys then queries
    # equals applying the 1-D bilinear matrices U (full <- small) on both sides: U J U^T.
    hs, ws, h, w = 3, 4, 7, 9
    j = torch.rand(hs * ws, hs * ws, generator=gen, dtype=torch.float64)
    eye = torch.eye(hs * ws, dtype=torch.float64).reshape(hs * ws, 1, hs, ws)
    u = torch.nn.functional.interpolate(eye, size=(h, w), mode="bilinear", align_corners=False)
    u = u.reshape(hs * ws, h * w).t()  # [N, n_s]
    torch.testing.assert_close(bl.upsample_pairs(j, hs, ws, h, w), u @ j @ u.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bl.upsample_pairs_batched(j[None], hs, ws, h, w)[0], u @ j @ u.t(),
                               rtol=1e-12, atol=1e-12)


def test_torch_compile_of_the_formula_matches_reference(gen):
    # One compiled graph (same shape as the --quick case, so the two share the compilation).
    p = torch.softmax(3.0 * torch.randn(1, 64, 101, generator=gen), dim=-1)
    v = torch.randn(1, 64, 64, generator=gen)
    got = bl.compiled("cdam_attention")(p, v)
    expected = ref.cdam_attention(p.double(), v.double())
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=5e-4)


@pytest.mark.parametrize("op", keops_baseline.OPS)
def test_keops_matches_reference(op, gen):
    pytest.importorskip("pykeops.torch", reason="pykeops is not installed (optional)")
    args = _inputs(op, gen)
    got = keops_baseline.FUNCTIONS[op](*args)
    torch.testing.assert_close(got, _expected(op, args), rtol=1e-9, atol=1e-10)


def test_keops_reports_dense_ops_as_not_applicable():
    for op in ("pairwise_jsd", "cdam_map", "multiscale_cdam_map", "multiscale_cdam_attention"):
        assert keops_baseline.unavailable_reason(op).startswith("n/a")
