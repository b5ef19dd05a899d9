"""Gradients of the CDAM ops over the whole alpha range (docs/autograd.md, section 2, "Large
alpha"): finite for every alpha the ops accept, and equal to the float64 reference's where the
gradient is well-conditioned in float32, on every backend. Tiny shapes: the interpreter is slow."""
import math

import pytest
import torch

import cdam_fast as cf
from cdam_fast import reference as ref
from cdam_fast.opdefs import cdam as cdam_home
from cdam_fast.opdefs import pairwise_jsd as pairwise_jsd_home
from cdam_fast.opdefs import vjp
from cdam_fast.grids import class_distributions, scale_grid
from conftest import UNIT_ROUNDOFF, random_distributions, random_similarities, random_values
from test_autograd import GRAD_TOL

F32, F64 = torch.float32, torch.float64
ALPHAS = (1.0, 10.0, 1e3, 1e6, 1e15, 1e30, 1e37, 3e38)
SCALES = (1.0, 0.5)  # 4 x 4 -> 2 x 2: no query pixel midway between two source pixels, so no tied row minima
# Where the gradient through exp(-alpha t) is resolved in float32 (t rounded by ~u32 / span):
# ~4x the relative error measured here at alpha = 1e3 (1.2e-4, multi-scale).
RESOLVED_ALPHA = 1e3
# Above it, the comparison holds once every key other than a row's extremes has alpha t >= this:
# then exp(-alpha t) underflows in both precisions and only the extremes (handled exactly) remain.
UNDERFLOW_EXPONENT = 100.0


def _tol(alpha):
    return GRAD_TOL[F32] + 16 * UNIT_ROUNDOFF[F32] * min(alpha, RESOLVED_ALPHA)


def _inputs(gen):
    p = random_distributions(gen, 2, 7, 4, dtype=F64, sharpness=1.5, zeros=False, one_hot=False)
    v = random_values(gen, 2, 7, 3, dtype=F64)
    sim = random_similarities(gen, 2, 3, 4, 4, dtype=F64)
    vs = random_values(gen, 2, 16, 3, dtype=F64)
    return p, v, sim, vs


OPS = {  # op -> (forward(backend, alpha) on the leaves, which inputs, the divergence maps the min-max sees)
    "cdam_map": (lambda b, a: lambda p: cf.cdam_map(p, a, backend=b, validate=False), (0,),
                 lambda p, v, s, vs: [ref.pairwise_jsd(p)]),
    "cdam_attention": (lambda b, a: lambda p, v: cf.cdam_attention(p, v, a, backend=b, validate=False), (0, 1),
                       lambda p, v, s, vs: [ref.pairwise_jsd(p)]),
    "multiscale_cdam_map": (lambda b, a: lambda s: cf.multiscale_cdam_map(s, SCALES, alpha=a, backend=b), (2,),
                            lambda p, v, s, vs: _scale_maps(s)),
    "multiscale_cdam_attention": (lambda b, a: lambda s, v: cf.multiscale_cdam_attention(s, v, SCALES, alpha=a,
                                                                                          backend=b), (2, 3),
                                  lambda p, v, s, vs: _scale_maps(s)),
}


def _scale_maps(sim):
    B, C, h, w = sim.shape
    maps = []
    for s in SCALES:
        hs, ws = scale_grid(h, w, s)
        js = ref.pairwise_jsd(class_distributions(sim, hs, ws, 0.1))
        maps.append(js if (hs, ws) == (h, w) else ref._upsample_pairs(js, hs, ws, h, w))
    return maps


def _extremes_and_gap(maps):
    """(largest number of keys at a row's min or max, smallest t = (J - lo) / span of the others)."""
    ties, gap = 0, math.inf
    for j in maps:
        lo, hi = j.amin(-1, keepdim=True), j.amax(-1, keepdim=True)
        ext = (j == lo) | (j == hi)
        ties = max(ties, int((j == lo).sum(-1).max()), int((j == hi).sum(-1).max()))
        gap = min(gap, torch.where(ext, math.inf, (j - lo) / (hi - lo)).min().item())
    return ties, gap


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64).to(out.dtype).to(out.device)
    return torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("op", list(OPS))
def test_gradients_finite_and_right_over_the_alpha_range(backend, gen, op):
    name, dev = backend
    make, which, maps = OPS[op]
    inputs = _inputs(gen)
    ties, gap = _extremes_and_gap(maps(*inputs))
    assert ties == 1, "test inputs must have a single row min and max (ties are tested below)"
    for alpha in ALPHAS:
        ins = [inputs[k] for k in which]
        expected = _grads(make("reference", alpha), ins)
        got = _grads(make(name, alpha), [t.to(F32).to(dev) for t in ins])
        resolved = alpha <= RESOLVED_ALPHA or alpha * gap >= UNDERFLOW_EXPONENT
        assert resolved or alpha == 1e6, f"alpha={alpha:g}: inputs too close to ties (gap {gap:.3g})"
        for i, (g, e) in enumerate(zip(got, expected)):
            what = f"{name} {op} alpha={alpha:g} gradient {i}"
            assert torch.isfinite(e).all(), f"float64 reference: {what} not finite"
            assert torch.isfinite(g).all(), f"{what} not finite"
            if resolved:  # alpha = 1e6 can sit between the two regimes: finiteness only
                err = (g.double().cpu() - e).abs().max().item()
                scale = e.abs().max().item()
                assert err <= _tol(alpha) * max(scale, 1e-3), f"{what} off by {err:.3g} (scale {scale:.3g})"


def test_huge_alpha_gradients_vanish_off_ties(gen):
    """alpha = 3e38, single row extremes: the map is one-hot at each row's minimum (exactly 1
    there, exactly 0 elsewhere) and its gradient is exactly 0 in both precisions (the direct and
    the through-min terms, each ~ alpha / span, cancel analytically)."""
    p = random_distributions(gen, 1, 6, 4, sharpness=1.5, zeros=False, one_hot=False)
    for dt in (F32, F64):
        (gp,) = _grads(lambda p: cf.cdam_map(p, 3e38, backend="reference"), [p.to(dt)])
        assert (gp == 0).all()


def test_minmax_vjp_ties_at_huge_alpha_are_exact():
    """Tied row minima at alpha = 3e38: each tied position gets (mean of the tied gX - its own
    gX) / span (the even split), a value far beyond float32, exact in float64; a single minimum
    gets exactly the rest of the row's sum, here 0."""
    alpha = 3e38
    j = torch.tensor([[[0.2, 0.5, 0.2, 0.9], [0.1, 0.4, 0.6, 0.9]]], dtype=F64)
    ga = torch.tensor([[[1.0, 2.0, -3.0, 0.5], [1.5, 0.0, 2.0, 1.0]]], dtype=F64)
    got = cdam_home.minmax_expm1_vjp(j.to(F32), ga.to(F32), alpha)
    assert got.dtype == F64 and not got.isnan().any()
    d = alpha / -math.expm1(-alpha)
    span = j.to(F32).double()[0, 0, 3] - j.to(F32).double()[0, 0, 0]
    gx0, gx2 = 1.0 * d, -3.0 * d
    expected0 = torch.tensor([((gx0 + gx2) / 2 - gx0) / span, 0.0, ((gx0 + gx2) / 2 - gx2) / span, 0.0], dtype=F64)
    assert torch.allclose(got[0, 0], expected0, rtol=1e-12, atol=0)
    assert (got[0, 1] == 0).all()


def test_scaled_vjp_gives_inf_not_nan_and_keeps_batch_elements_apart(gen):
    """G beyond the float32 range through the float32 divergence vjp: +-inf where the float64
    result is beyond float32, the float64 result elsewhere; a huge batch element leaves the
    other's small gradients intact."""
    p = random_distributions(gen, 2, 5, 3, dtype=F64, zeros=False, one_hot=False)
    g = torch.randn(2, 5, 5, generator=gen, dtype=F64)
    g[0] *= 1e42
    g[0, 1, 2] = 0.0
    expected = pairwise_jsd_home.jsd_vjp(p, None, g)[0]
    got = vjp.scaled_vjp(lambda x: pairwise_jsd_home.jsd_vjp(p.to(F32), None, x)[0], g, F32).to(F32)
    assert not got.isnan().any()
    assert torch.isinf(got[0]).all() and (got[0].sign() == expected[0].sign()).all()
    assert torch.allclose(got[1].double(), expected[1], rtol=1e-5, atol=1e-6)


def test_tied_multiscale_minima_never_give_nan(backend, gen):
    """A 3 x 4 grid at scale 0.5 (1 x 2) replicates rows of the pair upsampling: exact ties at
    the row minima whose +-alpha / span shares cancel only in exact arithmetic (docs/autograd.md:
    noise of size eps * alpha there, in any precision). Whatever their size, never NaN."""
    name, dev = backend
    sim = random_similarities(gen, 1, 3, 3, 4)
    v = random_values(gen, 1, 12, 2)
    for alpha in (1e15, 1e30, 3e38):
        gs, gv = _grads(lambda s, v: cf.multiscale_cdam_attention(s, v, (1.0, 0.5), alpha=alpha, backend=name),
                        [sim.to(dev), v.to(dev)])
        assert not gs.isnan().any() and torch.isfinite(gv).all(), f"{name} alpha={alpha:g}"


def test_identical_rows_at_huge_alpha(backend, gen):
    """Two identical rows of p: J = 0 between them ties with the diagonal at each row's minimum,
    with G ~ alpha / span there, while the divergence's exact gradient at J = 0 is 0. Every
    backend's p gradient is the float64 reference's (0: the map is constant near p), not G times
    its own log rounding (~alpha * 1e-7 on the CPU kernel before J = 0 passed no gradient). The
    v gradient (A^T g) is only finite here: the forward's A at the tie is 1 or ~0 depending on
    whether J rounds to exactly 0 (docs/autograd.md, "Near ties")."""
    name, dev = backend
    p = random_distributions(gen, 1, 6, 4, dtype=F64, sharpness=1.5, zeros=False, one_hot=False)
    p[0, 3] = p[0, 1]
    assert ref.pairwise_jsd(p)[0, 1, 3] == 0 and ref.pairwise_jsd(p.to(F32))[0, 1, 3] == 0  # the precondition
    v = random_values(gen, 1, 6, 3, dtype=F64)
    for alpha in (1e15, 1e30, 3e38):
        (expected, _) = _grads(lambda p, v: cf.cdam_attention(p, v, alpha, backend="reference"), [p, v])
        gp, gv = _grads(lambda p, v: cf.cdam_attention(p, v, alpha, backend=name),
                        [p.to(F32).to(dev), v.to(F32).to(dev)])
        assert torch.isfinite(gv).all()
        err = (gp.double().cpu() - expected).abs().max().item()
        assert err <= GRAD_TOL[F32] * max(expected.abs().max().item(), 1e-3), \
            f"{name} alpha={alpha:g}: p gradient off by {err:.3g}"


# The 3 x 3 rows: for alpha in ~[1780, 1843] every entry of a batch element's score
# gradient G is a float64 subnormal (exp(-alpha t) of the middle keys), and the power-of-two scale
# of scaled_vjp, 2^-frexp(max |G|), overflowed to inf: inf * 0 = NaN for the whole element.
SUBNORMAL_P = ((0.7, 0.2, 0.1), (0.1, 0.7, 0.2), (0.3, 0.3, 0.4))
SUBNORMAL_ALPHAS = (1780.0, 1800.0, 1843.0) + tuple(float(a) for a in torch.logspace(3, 5, 7, dtype=F64))
TAU = 0.1


def _subnormal_inputs():
    """(p [1, 3, 3], v [1, 3, 2], sim [1, 3, 3, 1] whose class distributions at scale 1 are p,
    v) in float64: the multi-scale ops at scales (1.0,) see the same divergences as cdam_map."""
    p = torch.tensor([SUBNORMAL_P], dtype=F64)
    sim = (TAU * p.log()).transpose(1, 2).reshape(1, 3, 3, 1)
    v = torch.tensor([[[1.0, -2.0], [0.5, 1.0], [2.0, 0.3]]], dtype=F64)
    return p, v, sim


SUBNORMAL_OPS = {  # op -> (forward(backend, alpha), which of (p, v, sim)); bf16 rows sum to 1 +- 2e-3
    "cdam_map": (lambda b, a: lambda p: cf.cdam_map(p, a, backend=b, validate=False), (0,)),
    "cdam_attention": (lambda b, a: lambda p, v: cf.cdam_attention(p, v, a, backend=b, validate=False), (0, 1)),
    "multiscale_cdam_map": (lambda b, a: lambda s: cf.multiscale_cdam_map(s, (1.0,), TAU, a, backend=b, validate=False), (2,)),
    "multiscale_cdam_attention": (lambda b, a: lambda s, v: cf.multiscale_cdam_attention(s, v, (1.0,), TAU, a,
                                                                                           backend=b, validate=False), (2, 1)),
}


@pytest.mark.parametrize("dtype", [F32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", list(SUBNORMAL_OPS))
def test_subnormal_score_gradients_are_finite_and_right(backend, op, dtype):
    """Every alpha of the sweep gives finite gradients equal to the float64 reference's at the
    same (rounded) inputs: here ~0, the true gradient being below the float32 range."""
    name, dev = backend
    make, which = SUBNORMAL_OPS[op]
    inputs = [_subnormal_inputs()[k].to(dtype) for k in which]
    for alpha in SUBNORMAL_ALPHAS:
        expected = _grads(make("reference", alpha), [t.double() for t in inputs])
        got = _grads(make(name, alpha), [t.to(dev) for t in inputs])
        for i, (g, e) in enumerate(zip(got, expected)):
            what = f"{name} {op} {dtype} alpha={alpha:g} gradient {i}"
            assert torch.isfinite(g).all(), f"{what} not finite"
            err = (g.double().cpu() - e).abs().max().item()
            scale = e.abs().max().item()
            assert err <= (_tol(alpha) + 2 * UNIT_ROUNDOFF[dtype]) * max(scale, 1e-3), f"{what} off by {err:.3g}"


def test_scaled_vjp_of_a_subnormal_gradient():
    """G whose largest entry is a float64 subnormal, through the float32 vjp: the exact result
    rounds to 0 in float32 (the gradient's dtype), and so does the scaled one (never inf * 0 =
    NaN); a G at the top of the float64 range is scaled back without overflowing the power of two
    (+-inf in float32, as the exact result)."""
    p = torch.tensor([SUBNORMAL_P], dtype=F64)
    for top in (1e-310, 5e-324, 1e300):
        g = torch.zeros(1, 3, 3, dtype=F64)
        g[0, 0, 1], g[0, 2, 1] = top, -top / 2
        expected = pairwise_jsd_home.jsd_vjp(p, None, g)[0]
        got = vjp.scaled_vjp(lambda x: pairwise_jsd_home.jsd_vjp(p.to(F32), None, x)[0], g, F32)
        assert not got.isnan().any(), top
        assert torch.allclose(got.float(), expected.float(), rtol=1e-5, atol=0), top
