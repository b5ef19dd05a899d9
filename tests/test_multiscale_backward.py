"""The fused CPU backward of cdam_map and the multi-scale ops (csrc/cdam_cpu_multiscale_backward.cpp):
against the float64 reference formulas on random inputs (scale sets with and without the full
grid, repeated scales, the paper's seven scales, several alphas, row chunks, tied extremes), the
path really taken, and its memory in recompute mode measured in a subprocess."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cdam_fast as cf
from cdam_fast import reference as ref
from cdam_fast.backends import cpu_backward
from cdam_fast.backends.cpu_backend import CpuBackend
from cdam_fast.opdefs import pairwise_jsd as pairwise_jsd_home
from cdam_fast.grids import CDAM_SCALES
from conftest import random_distributions, random_similarities, random_values, usable_backend
from test_autograd import F32, F64, GRAD_TOL, MULTISCALE_F32_TOL, _compare, _grads

SCALE_SETS = {"paper": CDAM_SCALES, "no_full_grid": (0.5, 0.75), "repeated_full": (1.0, 1.0, 0.6),
              "unordered": (0.6, 1.0, 0.35)}


@pytest.fixture
def cpu():
    return usable_backend("cpu")[0]


def _tol(alpha):
    return MULTISCALE_F32_TOL * max(1.0, alpha / 10)  # exp(-alpha t) resolves J's rounding ~alpha times worse


@pytest.mark.parametrize("alpha", [1.0, 10.0, 1e3])
@pytest.mark.parametrize("scales", list(SCALE_SETS))
def test_multiscale_ops_match_float64_reference(cpu, gen, scales, alpha):
    scales = SCALE_SETS[scales]
    sim, v = random_similarities(gen, 2, 5, 8, 9), random_values(gen, 2, 72, 6)
    ops = {"multiscale_cdam_map": (lambda b: lambda s: cf.multiscale_cdam_map(s, scales, alpha=alpha, backend=b),
                                   [sim]),
           "multiscale_cdam_attention": (lambda b: lambda s, v: cf.multiscale_cdam_attention(
               s, v, scales, alpha=alpha, mode="recompute", backend=b), [sim, v])}
    for op, (fn, inputs) in ops.items():
        expected = _grads(fn("reference"), [t.double() for t in inputs])
        got = _grads(fn(cpu), inputs)
        for g, e in zip(got, expected):
            err = (g.double() - e).abs().max().item()
            assert err <= _tol(alpha) * e.abs().max().item(), f"{op} {scales} alpha={alpha}: off by {err:.3g}"


@pytest.mark.parametrize("alpha", [1.0, 10.0, 1e3])
def test_cdam_map_matches_float64_reference(cpu, gen, alpha):
    p = random_distributions(gen, 2, 23, 6, one_hot=False)
    expected = _grads(lambda p: cf.cdam_map(p, alpha, backend="reference"), [p.double()])
    got = _grads(lambda p: cf.cdam_map(p, alpha, backend=cpu), [p])
    err = (got[0].double() - expected[0]).abs().max().item()
    assert err <= _tol(alpha) * expected[0].abs().max().item()


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_row_chunks_change_nothing(cpu, gen, monkeypatch, rows):
    """Chunks of a few full-grid rows (their smaller scales' source rows straddling the chunk
    borders) give the one-chunk result up to the rounding of the GEMMs' shapes."""
    sim, v = random_similarities(gen, 2, 4, 7, 9), random_values(gen, 2, 63, 5)
    p = random_distributions(gen, 2, 30, 4, one_hot=False)
    cases = {"multiscale_cdam_attention": (lambda s, v: cf.multiscale_cdam_attention(s, v, CDAM_SCALES, backend=cpu),
                                           [sim, v]),
             "multiscale_cdam_map": (lambda s: cf.multiscale_cdam_map(s, (1.0, 0.5, 0.8), backend=cpu), [sim]),
             "cdam_map": (lambda p: cf.cdam_map(p, backend=cpu), [p])}
    for op, (fn, inputs) in cases.items():
        whole = _grads(fn, inputs)
        monkeypatch.setattr(cpu_backward, "MAX_CHUNK_ROWS", rows)
        chunked = _grads(fn, inputs)
        monkeypatch.setattr(cpu_backward, "MAX_CHUNK_ROWS", None)
        for a, b in zip(chunked, whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=op)


def test_cdam_map_tie_rule_on_duplicate_rows(cpu, gen):
    """Duplicate rows tie exactly at row maxima: the gradient is split evenly, as the reference does."""
    p = random_distributions(gen, 1, 13, 4, dtype=F64, sharpness=1.0, zeros=False, one_hot=False)
    p[0, 3] = p[0, 8] = p[0, 11] = torch.tensor([0.94, 0.02, 0.02, 0.02], dtype=F64)
    p = p.float()
    j = ref.pairwise_jsd(p.double())[0]
    assert ((j == j.amax(-1, keepdim=True)).sum(-1) >= 2).sum() >= 5  # ties are really exercised
    expected = _grads(lambda p: cf.cdam_map(p, backend="reference"), [p.double()])
    got = _grads(lambda p: cf.cdam_map(p, backend=cpu), [p])
    _compare(got, expected, F32, "cdam_map with tied row maxima")


@pytest.mark.parametrize("alpha", [1e15, 3e38])
def test_cdam_map_identical_rows_at_huge_alpha(cpu, gen, alpha):
    """J = 0 between two identical rows ties with the diagonal at the row minimum: it passes no
    gradient, so the p gradient is the reference's (0 up to rounding), not G times a log's error."""
    p = random_distributions(gen, 1, 6, 4, dtype=F64, sharpness=1.5, zeros=False, one_hot=False)
    p[0, 3] = p[0, 1]
    (expected,) = _grads(lambda p: cf.cdam_map(p, alpha, backend="reference"), [p])
    (got,) = _grads(lambda p: cf.cdam_map(p, alpha, backend=cpu), [p.float()])
    err = (got.double() - expected).abs().max().item()
    assert err <= GRAD_TOL[F32] * max(expected.abs().max().item(), 1e-3)


@pytest.mark.parametrize("op", cpu_backward.MULTISCALE_OPS)
def test_the_fused_kernel_runs(cpu, gen, op, monkeypatch):
    calls = []
    mod = cpu_backward.multiscale_extension.module()
    monkeypatch.setattr(cpu_backward.multiscale_extension, "module",
                        lambda: calls.append(op) or mod)
    p, sim, v = random_distributions(gen, 1, 12, 3, one_hot=False), random_similarities(gen, 1, 3, 3, 4), \
        random_values(gen, 1, 12, 2)
    run = {"cdam_map": lambda: cf.cdam_map(p.requires_grad_(True), backend=cpu).sum().backward(),
           "multiscale_cdam_map": lambda: cf.multiscale_cdam_map(sim.requires_grad_(True), (1.0, 0.5),
                                                                 backend=cpu).sum().backward(),
           "multiscale_cdam_attention": lambda: cf.multiscale_cdam_attention(
               sim.requires_grad_(True), v, (1.0, 0.5), backend=cpu).sum().backward()}
    run[op]()
    assert calls, f"{op}: the fused CPU kernel did not run"


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    import cdam_fast as cf
    torch.set_num_threads(1)
    grid = int(sys.argv[1])
    gen = torch.Generator().manual_seed(0)
    def step(g):
        sim = (torch.randn(1, 3, g, g, generator=gen) * 0.3).requires_grad_(True)
        v = torch.randn(1, g * g, 8, generator=gen).requires_grad_(True)
        cf.multiscale_cdam_attention(sim, v, (1.0, 0.5), mode="recompute", backend="cpu").sum().backward()
    step(8)  # builds / loads the extensions, warms the allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(grid)
    print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
""")


def _step_mib(grid: int) -> float:
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(grid)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_recompute_memory_does_not_grow_with_n_squared(cpu):
    """Peak of forward + backward in recompute mode, N = 4096 against N = 1024 (each in a fresh
    process): one float32 N x N map at N = 4096 is 64 MiB, and the growth stays well below it
    (what grows: the scale-0.5 grid's divergences and their gradient, 4 MiB each, bounded chunks;
    measured ~26-30 MiB, against ~510 MiB for the composite backward this replaced)."""
    small, large = _step_mib(32), _step_mib(64)
    assert large - small < 48, f"fwd+bwd peak grew by {large - small:.1f} MiB from N = 1024 to 4096"


@pytest.mark.parametrize("n", [1, 7, 8, 33])
def test_self_divergence_gradient_takes_each_pair_once(cpu, gen, n):
    """The smaller grids' divergence gradient (G_ij + G_ji above the diagonal, one logarithm per
    unordered pair) against the float64 formula, with zero probabilities and a non-zero diagonal
    (which passes nothing); sizes around the vector width."""
    p = random_distributions(gen, 2, n, 5)
    G = torch.randn(2, n, n, generator=gen)
    expected = pairwise_jsd_home.jsd_vjp(p.double(), None, G.double())[0]
    got = cpu_backward._self_divergence_grad(G, p)
    assert (got[p == 0] == 0).all()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5 * max(expected.abs().max().item(), 1e-3))


# ---------------------------------------------------------------------------------------------
# The Triton backward of multiscale_cdam_attention (kernels/multiscale_backward.py): in the
# interpreter at tiny shapes here, compiled offline for sm_90 below.

@pytest.mark.parametrize("scales", [(1.0, 0.5), (0.5, 0.75), (1.0, 1.0, 0.6), (0.6, 1.0, 0.35)],
                         ids=["full_and_half", "no_full_grid", "repeated_full", "unordered"])
def test_triton_multiscale_ops_match_float64_reference(gen, scales):
    name, dev = usable_backend("triton")
    sim, v = random_similarities(gen, 2, 4, 4, 5), random_values(gen, 2, 20, 5)
    ops = {"multiscale_cdam_attention": (lambda b: lambda s, v: cf.multiscale_cdam_attention(s, v, scales, backend=b),
                                         [sim, v]),
           "multiscale_cdam_map": (lambda b: lambda s: cf.multiscale_cdam_map(s, scales, backend=b), [sim])}
    for op, (fn, inputs) in ops.items():
        expected = _grads(fn("reference"), [t.double() for t in inputs])
        got = _grads(fn(name), [t.to(dev) for t in inputs])
        _compare(got, expected, F32, f"triton {op} {scales}", multiscale=True)


def test_triton_cdam_map_matches_float64_reference(gen):
    """The single-scale map through the same kernels (its J taken as a scale onto itself), with
    tied row maxima from duplicate rows."""
    name, dev = usable_backend("triton")
    p = random_distributions(gen, 1, 13, 4, dtype=F64, sharpness=1.0, zeros=False, one_hot=False)
    p[0, 3] = p[0, 8] = p[0, 11] = torch.tensor([0.94, 0.02, 0.02, 0.02], dtype=F64)
    p = p.float()
    expected = _grads(lambda p: cf.cdam_map(p, backend="reference"), [p.double()])
    got = _grads(lambda p: cf.cdam_map(p, backend=name), [p.to(dev)])
    _compare(got, expected, F32, "triton cdam_map with tied row maxima")


def test_triton_multiscale_attention_runs_its_fused_kernels(gen, monkeypatch):
    from cdam_fast.kernels import multiscale_backward as kmb

    name, dev = usable_backend("triton")
    launched = []
    real = kmb.ms_small_grad_kernel
    monkeypatch.setattr(kmb, "ms_small_grad_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: launched.append(grid) or real[grid]})())
    sim, v = random_similarities(gen, 1, 3, 3, 4), random_values(gen, 1, 12, 2)
    cf.multiscale_cdam_attention(sim.to(dev).requires_grad_(True), v.to(dev), (1.0, 0.5),
                                 backend=name).sum().backward()
    assert launched


_COMPILE_SCRIPT = """
import json
from cdam_fast.kernels.offline_compile import inspect_kernel
from cdam_fast.kernels import multiscale_backward
for name, (k, sig, consts, warps) in multiscale_backward.offline_cases().items():
    print(json.dumps({"kernel": name, **inspect_kernel(k, sig, consts, warps, 90)}), flush=True)
"""


def test_triton_multiscale_backward_compiles_for_sm90_without_spills():
    pytest.importorskip("triton")
    import os

    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}  # needs real JIT functions
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = {r["kernel"]: r for r in map(json.loads, filter(lambda s: s.startswith("{"), res.stdout.splitlines()))}
    assert len(rows) == 6, sorted(rows)
    for name, r in rows.items():
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{name} spills on sm_90: {r}"
        assert 0 < r["registers"] <= 255, f"{name}: {r}"
        if "attention" in name:  # the products with g and v
            assert r["wgmma"] + r["mma"] > 0, f"{name} multiplies without tensor-core instructions"


def test_multiscale_backward_benchmark_runs(cpu, capsys):
    """benchmarks/multiscale_backward.py at a toy size: three rows, the fused backward restored."""
    from cdam_fast.benchmarks import multiscale_backward as bench

    fused = CpuBackend.multiscale_cdam_attention_backward
    bench.main(["--grid", "5", "--C", "3", "--D", "2", "--repeats", "1", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == list(bench.IMPLS)
    assert CpuBackend.multiscale_cdam_attention_backward is fused
