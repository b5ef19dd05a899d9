"""Autograd of every op (docs/autograd.md): the float64 reference formulas against finite
differences, the tie / constant-row / zero-probability rules, every backend's gradients against
the float64 reference's, compile / opcheck, and the errors."""
import importlib
import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

import cdam_fast as cf
from cdam_fast import reference as ref
from cdam_fast.opdefs import cdam as cdam_home
from cdam_fast.opdefs import jsd_attention as jsd_attention_home
from cdam_fast.testing import GRAD_TOL
from conftest import random_distributions, random_similarities, random_values, usable_backend

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ops = torch.ops.cdam_fast


@pytest.fixture(autouse=True)
def _small_interpreter_tiles(monkeypatch):
    """16-wide Triton tiles under the interpreter, so the small test shapes span several tiles."""
    monkeypatch.setenv("CDAM_FAST_INTERPRET_BLOCK", "16")


def smooth_distributions(gen, *shape):
    """Strictly positive float64 rows (no zeros, no one-hot): the smooth region gradcheck needs."""
    return random_distributions(gen, *shape, dtype=F64, sharpness=1.5, zeros=False, one_hot=False)


# ---------------------------------------------------------------------------------------------
# The float64 reference formulas against finite differences.

def _leaf(t):
    return t.detach().clone().requires_grad_(True)


GRADCHECK_CASES = {
    "pairwise_jsd": lambda g: ((lambda p: cf.pairwise_jsd(p, validate=False)), (smooth_distributions(g, 2, 5, 4),)),
    "pairwise_jsd_q": lambda g: ((lambda p, q: cf.pairwise_jsd(p, q, validate=False)),
                                 (smooth_distributions(g, 2, 5, 4), smooth_distributions(g, 2, 3, 4))),
    "cdam_map": lambda g: ((lambda p: cf.cdam_map(p, 3.0, validate=False)), (smooth_distributions(g, 2, 5, 4),)),
    "cdam_attention": lambda g: ((lambda p, v: cf.cdam_attention(p, v, validate=False)),
                                 (smooth_distributions(g, 1, 6, 3), random_values(g, 1, 6, 2, dtype=F64))),
    "multiscale_cdam_map": lambda g: ((lambda s: cf.multiscale_cdam_map(s, (1.0, 0.5, 0.75))),
                                      (random_similarities(g, 1, 3, 4, 5, dtype=F64),)),
    "multiscale_cdam_attention": lambda g: ((lambda s, v: cf.multiscale_cdam_attention(s, v, (1.0, 0.6), alpha=4.0)),
                                            (random_similarities(g, 2, 2, 3, 4, dtype=F64),
                                             random_values(g, 2, 12, 2, dtype=F64))),
    "jsd_attention": lambda g: ((lambda p, v: cf.jsd_attention(p, v, 0.3, validate=False)),
                                (smooth_distributions(g, 2, 5, 4), random_values(g, 2, 5, 3, dtype=F64))),
    "jsd_attention_q": lambda g: ((lambda p, v, q: cf.jsd_attention(p, v, 0.3, q=q, validate=False)),
                                  (smooth_distributions(g, 1, 4, 3), random_values(g, 1, 6, 2, dtype=F64),
                                   smooth_distributions(g, 1, 6, 3))),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_reference_gradcheck(gen, case):
    fn, inputs = GRADCHECK_CASES[case](gen)
    # fast_mode: finite differences along random directions (all inputs and outputs at once)
    assert gradcheck(fn, tuple(_leaf(t) for t in inputs), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_zero_probabilities_get_zero_gradient_and_the_rest_is_exact(gen):
    """p_ic = 0 (one-sided derivative -inf) gets gradient 0; the positive entries' gradient is
    the true partial derivative (finite differences moving those entries only)."""
    p = random_distributions(gen, 1, 6, 5, dtype=F64, sharpness=1.5)  # ~1/5 exact zeros, a one-hot row
    v = random_values(gen, 1, 6, 3, dtype=F64)
    pos = p > 0
    assert (~pos).any()
    x = _leaf(p[pos])

    def f(x):
        return cf.jsd_attention(p.masked_scatter(pos, x), v, 0.5, validate=False)

    assert gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    pl = _leaf(p)
    cf.jsd_attention(pl, v, 0.5, validate=False).sum().backward()
    assert torch.isfinite(pl.grad).all() and (pl.grad[~pos] == 0).all()


def test_minmax_vjp_splits_ties_like_amax_amin(gen):
    """Hand-derived min-max / expm1 gradient against torch autograd of the forward formula
    (amax / amin split their gradient evenly between ties), on rows with tied max and min."""
    j = torch.rand(3, 5, 7, generator=gen, dtype=F64)
    j[0, 0, 2] = j[0, 0, 5] = j[0, 0].max() + 0.1  # tied max
    j[0, 1, 1] = j[0, 1, 3] = j[0, 1, 6] = j[0, 1].min() - 0.1  # tied min
    j[1, 2] = 0.3  # constant row: X := 1, zero gradient
    ga = torch.randn(j.shape, generator=gen, dtype=F64)
    jl = _leaf(j)
    (expected,) = torch.autograd.grad(ref.minmax_expm1(jl, 7.0), jl, ga)
    got = cdam_home.minmax_expm1_vjp(j, ga, 7.0)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert (got[1, 2] == 0).all()


# ---------------------------------------------------------------------------------------------
# Every backend against the float64 reference.

def _grads(fn, inputs):
    leaves = [_leaf(t) for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64).to(out.dtype).to(out.device)
    return torch.autograd.grad(out, leaves, g)


def _grads_with(fn, inputs, g):
    leaves = [_leaf(t) for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, g.to(inputs[0].device))


def _op_cases(gen, dtype, N=19, C=5, D=6, B=2):
    p = random_distributions(gen, B, N, C, dtype=dtype)
    # The min-max of the CDAM ops is not differentiable at ties: a one-hot row ties at J = ln 2
    # with every row that lacks its class, and rounding breaks those ties differently in each
    # precision, so the CDAM cases keep the zeros but no one-hot row.
    pc = random_distributions(gen, B, N, C, dtype=dtype, one_hot=False)
    q = random_distributions(gen, B, N + 4, C, dtype=dtype)
    v = random_values(gen, B, N, D, dtype=dtype)
    vq = random_values(gen, B, N + 4, D, dtype=dtype)
    sim = random_similarities(gen, B, C, 4, 5, dtype=dtype)
    vs = random_values(gen, B, 20, D, dtype=dtype)
    return {
        "pairwise_jsd": (lambda b: lambda p: cf.pairwise_jsd(p, backend=b), (p,)),
        "pairwise_jsd_q": (lambda b: lambda p, q: cf.pairwise_jsd(p, q, backend=b), (p, q)),
        "cdam_map": (lambda b: lambda p: cf.cdam_map(p, backend=b), (pc,)),
        "cdam_attention_materialize": (lambda b: lambda p, v: cf.cdam_attention(p, v, mode="materialize", backend=b),
                                       (pc, v)),
        "cdam_attention_recompute": (lambda b: lambda p, v: cf.cdam_attention(p, v, mode="recompute", backend=b),
                                     (pc, v)),
        "multiscale_cdam_map": (lambda b: lambda s: cf.multiscale_cdam_map(s, (1.0, 0.5, 0.75), backend=b), (sim,)),
        "multiscale_cdam_attention": (lambda b: lambda s, v: cf.multiscale_cdam_attention(s, v, (1.0, 0.5), backend=b),
                                      (sim, vs)),
        "jsd_attention": (lambda b: lambda p, v: cf.jsd_attention(p, v, backend=b), (p, v)),
        "jsd_attention_q": (lambda b: lambda p, v, q: cf.jsd_attention(p, v, q=q, backend=b), (p, vq, q)),
    }


OP_CASES = list(_op_cases(torch.Generator().manual_seed(0), F32))
MULTISCALE_F32_TOL = 4e-5  # the multi-scale ops' fp32 tolerance (GRAD_TOL: cdam_fast/testing.py)


def _compare(got, expected, dtype, what, multiscale=False):
    tol = MULTISCALE_F32_TOL if multiscale and dtype == F32 else GRAD_TOL[dtype]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == dtype, f"{what}: gradient {i} is {g.dtype}, input was {dtype}"
        assert torch.isfinite(g).all(), f"{what}: gradient {i} is not finite"
        scale = e.abs().max().item()
        err = (g.double().cpu() - e).abs().max().item()
        assert err <= tol * max(scale, 1e-3), f"{what}: gradient {i} off by {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("case", OP_CASES)
def test_backend_gradients_match_float64_reference(backend, gen, case):
    name, dev = backend
    fn, inputs = _op_cases(gen, F32)[case]
    expected = _grads(fn("reference"), [t.double() for t in inputs])
    got = _grads(fn(name), [t.to(dev) for t in inputs])
    _compare(got, expected, F32, f"{name} {case}", multiscale=case.startswith("multiscale"))



def _gpu_tile_cases(gen):
    """Shapes that span several of the GPU's tiles: 70 rows (two 64-row or three 32-row query
    tiles), D = 40, and a 9 x 8 multi-scale grid."""
    pc = random_distributions(gen, 1, 70, 5, one_hot=False)
    v = random_values(gen, 1, 70, 40)
    sim, vs = random_similarities(gen, 1, 5, 9, 8), random_values(gen, 1, 72, 40)
    return {
        "cdam_attention_recompute": (lambda b: lambda p, v: cf.cdam_attention(p, v, mode="recompute", backend=b),
                                     (pc, v)),
        "jsd_attention": (lambda b: lambda p, v: cf.jsd_attention(p, v, backend=b), (pc, v)),
        "multiscale_cdam_attention": (lambda b: lambda s, v: cf.multiscale_cdam_attention(s, v, backend=b),
                                      (sim, vs)),
    }


def test_triton_gradients_at_the_gpu_tiles(monkeypatch, gen):
    """The backward kernels at the GPU's tile sizes (this Triton's tile set, or the one
    CDAM_FAST_TILES names) in the interpreter, against the float64 reference."""
    name, dev = usable_backend("triton")
    if dev.type != "cpu":
        pytest.skip("interpreter-only check (a GPU runs the GPU tiles in every test)")
    monkeypatch.setenv("CDAM_FAST_INTERPRET_BLOCK", "production")
    for case, (fn, inputs) in _gpu_tile_cases(gen).items():
        expected = _grads(fn("reference"), [t.double() for t in inputs])
        got = _grads(fn(name), inputs)
        _compare(got, expected, F32, f"triton {case} at the GPU tiles", multiscale=case.startswith("multiscale"))


def test_the_other_tile_set_computes_the_same():
    """Triton before 3.8 gets narrower tiles (kernels/common.py, NARROW_TILES): the GPU-tile tests,
    forward and backward, again in a process that takes the set this Triton does not."""
    usable_backend("triton")
    from cdam_fast.kernels import common

    if not common.INTERPRETED:
        pytest.skip("interpreter-only check")
    other = "wide" if common.NARROW_TILES else "narrow"
    tests = ["tests/test_autograd.py::test_triton_gradients_at_the_gpu_tiles",
             "tests/test_kernels_numerics.py::test_triton_production_tiles"]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         env={**os.environ, "CDAM_FAST_TILES": other}, cwd=Path(__file__).parent.parent,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "2 passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]

# bf16 rows are multiples of 1/256 (conftest): with few classes duplicate rows appear, whose exact
# ties at a row's max / min rounding breaks differently per precision, so CDAM is tested in fp16.
@pytest.mark.parametrize("case,dtype", [("cdam_attention_recompute", F16), ("cdam_map", F16), ("jsd_attention", F16),
                                        ("jsd_attention", BF16), ("multiscale_cdam_map", F16),
                                        ("multiscale_cdam_map", BF16), ("multiscale_cdam_attention", F16),
                                        ("multiscale_cdam_attention", BF16)])
def test_backend_gradients_16bit(backend, gen, case, dtype):
    """16-bit inputs: gradients come back in the input dtype, accumulated in fp32."""
    name, dev = backend
    # (the interpreter's broken bf16 tl.dot spoils the forward's output, which no backward reads)
    fn, inputs = _op_cases(gen, dtype)[case]
    expected = _grads(fn("reference"), [t.double() for t in inputs])
    got = _grads(fn(name), [t.to(dev) for t in inputs])
    _compare(got, expected, dtype, f"{name} {case} {dtype}", multiscale=case.startswith("multiscale"))


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_jsd_attention_backward_op_16bit(backend, gen, dtype):
    """The backward op itself on 16-bit inputs (no forward runs, so the interpreter's broken bf16
    product in the forward does not matter here)."""
    name, dev = backend
    p, v = random_distributions(gen, 2, 19, 5, dtype=dtype), random_values(gen, 2, 19, 6, dtype=dtype)
    g = random_values(gen, 2, 19, 6, dtype=dtype)
    expected = jsd_attention_home.jsd_attention_backward(g.double(), p.double(), v.double(), 0.1)[:2]
    got = ops.jsd_attention_backward(g.to(dev), p.to(dev), v.to(dev), 0.1, None, name, True, [True, True, False], None)[:2]
    _compare(got, expected, dtype, f"{name} jsd_attention_backward {dtype}")


@pytest.mark.parametrize("shape", [(1, 1, 4, 3), (2, 7, 1, 3), (2, 2, 21, 3, 5)], ids=["N=1", "C=1", "batched"])
def test_edge_shapes(backend, gen, shape):
    """N = 1 and C = 1 (every divergence is 0: zero gradient for p), several batch dims."""
    name, dev = backend
    *lead, n, c, d = shape
    p = random_distributions(gen, *lead, n, c, one_hot=False)
    v = random_values(gen, *lead, n, d)
    for op in (cf.jsd_attention, cf.cdam_attention):
        expected = _grads(lambda p, v: op(p, v, backend="reference"), [p.double(), v.double()])
        got = _grads(lambda p, v: op(p, v, backend=name), [p.to(dev), v.to(dev)])
        _compare(got, expected, F32, f"{name} {op.__name__} {shape}")
        if n == 1 or c == 1:
            assert (got[0] == 0).all()
    expected = _grads(lambda p: cf.cdam_map(p, backend="reference"), [p.double()])
    got = _grads(lambda p: cf.cdam_map(p, backend=name), [p.to(dev)])
    _compare(got, expected, F32, f"{name} cdam_map {shape}")
    if n == 1 or c == 1:
        assert (got[0] == 0).all()


def test_jsd_attention_without_keys(backend, gen):
    """q with zero rows (the forward's output is all zeros): zero gradients, no kernel runs (the
    CPU backward once divided by the padded key count here)."""
    name, dev = backend
    p = random_distributions(gen, 2, 5, 3).to(dev).requires_grad_(True)
    q = random_distributions(gen, 2, 0, 3).to(dev).requires_grad_(True)
    v = random_values(gen, 2, 0, 4).to(dev).requires_grad_(True)
    cf.jsd_attention(p, v, q=q, backend=name).sum().backward()
    for t in (p, q, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


# sim shape [..., C, h, w] and scales: one query token, one class (every divergence 0: zero
# gradient for sim), two batch dims with non-integer scales, a scale whose grid is one patch.
MULTISCALE_EDGES = {"N=1": ((1, 3, 1, 1), (1.0, 0.5)), "C=1": ((2, 1, 3, 4), (1.0, 0.6)),
                    "batched": ((2, 2, 3, 3, 5), (0.6, 1.0, 0.35)), "one_patch_scale": ((1, 4, 3, 6), (0.3, 1.0))}


@pytest.mark.parametrize("edge", list(MULTISCALE_EDGES))
def test_multiscale_edge_shapes(backend, gen, edge):
    name, dev = backend
    shape, scales = MULTISCALE_EDGES[edge]
    sim = random_similarities(gen, *shape)
    v = random_values(gen, *shape[:-3], shape[-2] * shape[-1], 3)
    cases = {"multiscale_cdam_map": (lambda b: lambda s: cf.multiscale_cdam_map(s, scales, backend=b), [sim]),
             "multiscale_cdam_attention": (lambda b: lambda s, v: cf.multiscale_cdam_attention(s, v, scales, backend=b),
                                           [sim, v])}
    for op, (fn, inputs) in cases.items():
        expected = _grads(fn("reference"), [t.double() for t in inputs])
        got = _grads(fn(name), [t.to(dev) for t in inputs])
        _compare(got, expected, F32, f"{name} {op} {edge}", multiscale=True)
        if edge in ("N=1", "C=1"):
            assert (got[0] == 0).all()


@pytest.mark.parametrize("alpha", [0.05, 1e30], ids=["small_alpha", "huge_alpha"])
def test_backend_transform_variants(backend, gen, alpha):
    """The CDAM transform's small-alpha variant (alpha < constants.SMALL_ALPHA_LIMIT) and a huge
    alpha (alpha log2 e clamped to float32; the map is one-hot at each row's minimum, so the
    gradient of p is exactly 0 and no alpha / span sized rounding survives): every backend
    against the float64 reference."""
    name, dev = backend
    p = random_distributions(gen, 2, 19, 5, one_hot=False)
    v = random_values(gen, 2, 19, 6)
    expected = _grads(lambda p, v: cf.cdam_attention(p, v, alpha=alpha, backend="reference"), [p.double(), v.double()])
    got = _grads(lambda p, v: cf.cdam_attention(p, v, alpha=alpha, mode="recompute", backend=name),
                 [p.to(dev), v.to(dev)])
    _compare(got, expected, F32, f"{name} cdam_attention alpha={alpha}")


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile.

def test_opcheck_with_autograd(gen):
    p, q = random_distributions(gen, 2, 6, 4), random_distributions(gen, 2, 5, 4)
    v, vq = random_values(gen, 2, 6, 3), random_values(gen, 2, 5, 3)
    sim, vs = random_similarities(gen, 2, 4, 3, 5), random_values(gen, 2, 15, 3)
    budget = cf.DEFAULT_MEMORY_BUDGET
    cases = [
        (ops.pairwise_jsd.default, (p, q, "reference", True)),
        (ops.cdam_map.default, (p, 10.0, "reference", True)),
        (ops.cdam_attention.default, (p, v, 10.0, "auto", budget, "reference", True)),
        (ops.multiscale_cdam_attention.default, (sim, vs, [1.0, 0.5], 0.1, 10.0, "auto", budget, "reference", True)),
        (ops.jsd_attention.default, (p, vq, 0.1, q, "reference", True)),
        (ops.jsd_attention.default, (p, v, 0.1, None, "reference", True)),
    ]
    for op, args in cases:
        args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


def test_compile_fullgraph_backward(gen):
    p = random_distributions(gen, 2, 9, 4).requires_grad_(True)
    v = random_values(gen, 2, 9, 3).requires_grad_(True)

    def loss(p, v):
        return (cf.jsd_attention(p, v, backend="reference").square().sum()
                + cf.cdam_attention(p, v, backend="reference").sum())

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(p, v).backward()
    got = p.grad.clone(), v.grad.clone()
    p.grad = v.grad = None
    loss(p, v).backward()
    assert torch.allclose(got[0], p.grad) and torch.allclose(got[1], v.grad)


# ---------------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_invalid_p_with_validate_false_costs_only_its_batch_element(backend, gen, bad):
    """validate=False lets a bad p through the forward (NaN in, NaN out); its backward gives that
    batch element NaN gradients, warns naming p, and the other element's gradients are exactly
    what it gets alone."""
    name, dev = backend
    p, v = random_distributions(gen, 2, 5, 3).to(dev), random_values(gen, 2, 5, 2).to(dev)
    p[0, 0, 0] = -0.1 if bad == "negative" else math.nan
    cases = {"jsd_attention": lambda p, v: cf.jsd_attention(p, v, validate=False, backend=name),
             "cdam_attention": lambda p, v: cf.cdam_attention(p, v, validate=False, backend=name),
             "cdam_map": lambda p, v: cf.cdam_map(p, validate=False, backend=name) @ v,
             "pairwise_jsd": lambda p, v: cf.pairwise_jsd(p, validate=False, backend=name) @ v}
    g = torch.randn(2, 5, 2, generator=gen).to(dev)
    for op, fn in cases.items():
        with pytest.warns(RuntimeWarning, match=r"\bp has non-finite or negative entries in batch element\(s\) \[0\]"):
            gp, gv = _grads_with(fn, [p, v], g)
        alone = _grads_with(fn, [p[1:], v[1:]], g[1:])
        assert gp[0].isnan().all(), op
        if "attention" in op:  # v is the op's input (elsewhere its gradient is torch's matmul's)
            assert gv[0].isnan().all(), op
        assert torch.equal(gp[1:], alone[0]) and torch.equal(gv[1:], alone[1]), op


def test_non_finite_sim_costs_only_its_batch_element(gen):
    sim, v = random_similarities(gen, 2, 3, 3, 4), random_values(gen, 2, 12, 2)
    sim[1, 0, 0, 0] = math.inf
    fn = lambda s, v: cf.multiscale_cdam_attention(s, v, scales=(1.0, 0.5), validate=False)  # noqa: E731
    g = torch.randn(2, 12, 2, generator=gen)
    with pytest.warns(RuntimeWarning, match=r"\bsim has NaN or \+inf entries in batch element\(s\) \[1\]"):
        gs, gv = _grads_with(fn, [sim, v], g)
    alone = _grads_with(fn, [sim[:1], v[:1]], g[:1])
    assert gs[1].isnan().all() and gv[1].isnan().all()
    assert torch.equal(gs[:1], alone[0]) and torch.equal(gv[:1], alone[1])


def test_tensor_hyperparameters_are_refused(gen):
    p = random_distributions(gen, 5, 3)
    v = random_values(gen, 5, 2)
    with pytest.raises(cf.CdamInputError, match="alpha"):
        cf.cdam_attention(p, v, alpha=torch.tensor(10.0, requires_grad=True))
    with pytest.raises(cf.CdamInputError, match="tau"):
        cf.jsd_attention(p, v, tau=torch.tensor(0.1, requires_grad=True))


def test_double_backward_raises_clearly(gen):
    p = random_distributions(gen, 5, 3).requires_grad_(True)
    v = random_values(gen, 5, 2).requires_grad_(True)
    (gp,) = torch.autograd.grad(cf.jsd_attention(p, v, backend="reference").sum(), p, create_graph=True)
    with pytest.raises(RuntimeError, match="jsd_attention_backward"):
        gp.sum().backward()


def test_cpu_backward_extension_builds_where_the_cpu_backend_does():
    """A compiler that builds the forward CPU kernels must build the backward ones too (else the
    backward would silently take the slower reference path)."""
    from cdam_fast.backends import cpu_backward
    from cdam_fast.dispatch import unavailable_reason

    if unavailable_reason("cpu", torch.device("cpu"), F32) is not None:
        pytest.skip("the CPU backend is unavailable here")
    assert cpu_backward.extension.failure() is None
    assert cpu_backward.multiscale_extension.failure() is None


def test_backend_tie_rule_on_duplicate_rows(backend, gen):
    """Duplicate rows give bitwise-equal divergences in every precision, so the row max / min of
    the CDAM transform are tied exactly: every backend must split their gradient evenly, like
    the float64 reference."""
    name, dev = backend
    p = random_distributions(gen, 1, 13, 4, dtype=F64, sharpness=1.0, zeros=False, one_hot=False)
    peaked = torch.tensor([0.94, 0.02, 0.02, 0.02], dtype=F64)
    p[0, 3] = p[0, 8] = p[0, 11] = peaked  # the farthest rows from most others: tied maxima
    p = p.float()
    v = random_values(gen, 1, 13, 5)
    j = ref.pairwise_jsd(p.double())[0]
    row_max_ties = (j == j.amax(-1, keepdim=True)).sum(-1)
    assert (row_max_ties >= 2).sum() >= 5  # the test really exercises ties
    expected = _grads(lambda p, v: cf.cdam_attention(p, v, backend="reference"), [p.double(), v.double()])
    got = _grads(lambda p, v: cf.cdam_attention(p, v, backend=name), [p.to(dev), v.to(dev)])
    _compare(got, expected, F32, f"{name} cdam_attention with tied row maxima")


# ---------------------------------------------------------------------------------------------
# Which backward runs: the backend object the forward ran on (autograd/register.py), never
# chosen again.

def _spy_backwards(monkeypatch, op):
    """Record which backward of `op` runs: 'reference' (the op's formulas) or the name of the
    backend whose own backward runs."""
    from cdam_fast.autograd import backward_ops

    ran = []
    real_own, real_formulas = backward_ops.run_own, backward_ops.run_formulas

    def own(chosen, spec, *args):
        if spec.name == op:
            ran.append(chosen.name)
        return real_own(chosen, spec, *args)

    def formulas(spec, *args):
        if spec.name == op:
            ran.append("reference")
        return real_formulas(spec, *args)

    monkeypatch.setattr(backward_ops, "run_own", own)
    monkeypatch.setattr(backward_ops, "run_formulas", formulas)
    return ran


def _runs_cpu_tensors(name):
    """Backend `name` runs CPU tensors here (triton: under TRITON_INTERPRET=1)."""
    from cdam_fast.dispatch import unavailable_reason

    return unavailable_reason(name, torch.device("cpu"), F32) is None


def test_backend_declarations_cover_their_backward():
    """Every backend's declared backward ops are ops it runs forward, each with a backward of its
    own or a composite on its kernels; the fused backends declare every op's."""
    from cdam_fast import dispatch
    from cdam_fast.opspec import COMPOSITE_BACKWARD_OPS, OP_NAMES

    for name, _, _ in dispatch.PRIORITY:
        if not _runs_cpu_tensors(name):
            continue
        backend = dispatch.backend(name)
        assert set(backend.backward_ops) <= set(backend.ops), name
        for op in backend.backward_ops:
            assert callable(getattr(backend, f"{op}_backward", None)) or op in COMPOSITE_BACKWARD_OPS, (name, op)
        if name in ("cpu", "triton"):
            assert set(backend.backward_ops) == set(OP_NAMES), name


OP_CALLS = {  # op -> (forward on a backend, inputs)
    "cdam_map": lambda gen: (lambda b: lambda p: cf.cdam_map(p, backend=b), [random_distributions(gen, 2, 9, 4,
                                                                                                one_hot=False)]),
    "multiscale_cdam_attention": lambda gen: (
        lambda b: lambda s, v: cf.multiscale_cdam_attention(s, v, (1.0, 0.5), backend=b),
        [random_similarities(gen, 1, 3, 3, 4), random_values(gen, 1, 12, 2)]),
    "jsd_attention": lambda gen: (lambda b: lambda p, v: cf.jsd_attention(p, v, backend=b),
                                  [random_distributions(gen, 2, 9, 4), random_values(gen, 2, 9, 3)]),
}


@pytest.mark.parametrize("op", list(OP_CALLS))
def test_backward_runs_on_the_backend_the_forward_chose(monkeypatch, gen, op):
    """auto tries triton first here, but triton refuses this call (a stand-in for a size limit):
    the forward falls back to cpu, and so must the backward (picking by device and dtype alone
    would send it to triton)."""
    from cdam_fast import dispatch
    from cdam_fast.backends.triton_backend import TritonBackend

    if not (_runs_cpu_tensors("triton") and _runs_cpu_tensors("cpu")):
        pytest.skip("needs the cpu backend and Triton on CPU tensors (TRITON_INTERPRET=1)")
    monkeypatch.setattr(dispatch, "PRIORITY", tuple((n, t, None) for n, t, _ in dispatch.PRIORITY))
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(TritonBackend, "limit_reasons", lambda self, op, call: ["a simulated size limit"])
    fn, inputs = OP_CALLS[op](gen)
    ran = _spy_backwards(monkeypatch, op)
    with pytest.warns(RuntimeWarning, match="'triton' unavailable.*simulated size limit.*falling back to 'cpu'"):
        got = _grads(fn("auto"), inputs)
    assert ran == ["cpu"]
    _compare(got, _grads(fn("reference"), [t.double() for t in inputs]), F32, f"auto -> cpu {op}",
             multiscale=op.startswith("multiscale"))


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_explicit_backend_runs_its_own_backward(monkeypatch, gen, name):
    if not _runs_cpu_tensors(name):
        pytest.skip(f"backend {name!r} does not run CPU tensors here")
    for op, make in OP_CALLS.items():
        fn, inputs = make(gen)
        ran = _spy_backwards(monkeypatch, op)
        _grads(fn(name), inputs)
        assert ran == [name], op


def test_explicit_reference_backend_uses_the_reference_formulas(monkeypatch, gen):
    for op, make in OP_CALLS.items():
        fn, inputs = make(gen)
        ran = _spy_backwards(monkeypatch, op)
        _grads(fn("reference"), inputs)
        assert ran == ["reference"], op


def test_fused_backward_that_cannot_take_a_call_warns_once_and_uses_the_reference(monkeypatch, gen):
    """The forward runs on cpu; its backward extension "failed to build": one RuntimeWarning
    naming the backend and the reason, then the reference formulas (correct gradients)."""
    from cdam_fast.backends import cpu_backward
    from cdam_fast import dispatch

    if not _runs_cpu_tensors("cpu"):
        pytest.skip("the cpu backend is unavailable here")
    monkeypatch.setattr(dispatch, "_warned", set())
    for ext in (cpu_backward.extension, cpu_backward.multiscale_extension):
        monkeypatch.setattr(ext, "failure", lambda: "simulated compiler error")
    for op, make in OP_CALLS.items():
        fn, inputs = make(gen)
        ran = _spy_backwards(monkeypatch, op)
        with pytest.warns(RuntimeWarning, match=f"fused 'cpu' backward cannot take this {op} call.*"
                                                "simulated compiler error.*reference formulas"):
            got = _grads(fn("cpu"), inputs)
        assert ran == ["reference"], op
        _compare(got, _grads(fn("reference"), [t.double() for t in inputs]), F32, f"cpu -> reference {op}",
                 multiscale=op.startswith("multiscale"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per (backend, op, reason)
            _grads(fn("cpu"), inputs)


def test_backend_without_fused_backward_uses_the_reference_quietly(gen):
    """cuda has no backward of its own by design: the reference formulas, no warning, and its
    reason says so."""
    from cdam_fast.autograd import backward_ops
    from cdam_fast.backends.cuda_backend import CudaBackend
    from cdam_fast.opspec import OPS

    assert CudaBackend.backward_ops == ()
    p = random_distributions(gen, 2, 9, 4, one_hot=False)
    call = OPS["cdam_map"].bind((p, 10.0, "cuda", False))[0]
    assert CudaBackend().backward_not_supported_reasons("cdam_map", call) == [
        "not supported: this backend has no cdam_map backward"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backward_ops.backward_fn(OPS["cdam_map"], "cuda", call).func is backward_ops.run_formulas


def test_triton_backward_declares_its_launch_limit(monkeypatch, gen):
    """The Triton backward's reasons name its grid limit (flat one-dimensional launches)."""
    from cdam_fast.opspec import OPS

    if importlib.util.find_spec("triton") is None:
        pytest.skip("the optional package triton is not installed")
    from cdam_fast.backends.triton_backend import TritonBackend
    from cdam_fast.kernels import common

    p = random_distributions(gen, 2, 40, 4)
    call = OPS["cdam_map"].bind((p, 10.0, "triton", False))[0]
    triton = TritonBackend()
    assert triton.backward_not_supported_reasons("cdam_map", call) == []
    monkeypatch.setattr(common, "MAX_GRID_X", 2 * 3 * 3 - 1)  # B * cdiv(40, 16)^2 = 18 programs
    (why,) = triton.backward_not_supported_reasons("cdam_map", call)
    assert "programs per backward launch = 18" in why
    assert triton.backward_not_supported_reasons("jsd_attention", call) == []  # 2 * 3 programs


def test_composite_backward_benchmark_runs(capsys):
    """benchmarks/composite_backward.py at a toy size: both columns timed, the registry restored."""
    from cdam_fast.backends.cpu_backend import CpuBackend
    from cdam_fast.benchmarks import composite_backward

    if not _runs_cpu_tensors("cpu"):
        pytest.skip("the cpu backend is unavailable here")
    before = CpuBackend.backward_ops
    composite_backward.main(["--grid", "3", "--C", "3", "--D", "2", "--repeats", "1", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["cdam_map", "multiscale_cdam_attention"]
    assert all("composite:" in line and "reference formulas:" in line for line in lines)
    assert CpuBackend.backward_ops == before
