"""The C++ extensions (csrc/): the JIT build, its cache and failure path, dispatch, and the ops
against the float64 reference.

The numeric cases run on the "cpu" extension here and on the "cuda" extension where a GPU is
present (a GPU machine runs the same file); the cuda variants are skipped with the reason
otherwise. The shared suite (tests/test_ops_correctness.py) covers every backend as well; the
cases here are the extension's own list (odd sizes around its 16-key blocks and 64-row tiles,
exact zeros, one-hot rows, 16-bit inputs, q != p, both attention modes).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import cdam_fast as cf
from cdam_fast import dispatch
from cdam_fast import reference as ref
from cdam_fast.backends import extension_build as eb
from cdam_fast.backends.cpu_backend import CpuBackend
from cdam_fast.dispatch import BackendUnavailableError

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# The cpu row of test_ops_correctness.TOLERANCES (~4x the measured errors; docs/ops.md, "Accuracy")
J_ATOL = 8e-6      # centred float32 sums over C <= 512 classes, blocked by 64: <= 2e-6 nats measured
MAP_ATOL = 3e-5    # the row min-max and expm1 amplify J errors by up to 2 alpha / span
ATTN_RTOL = {F32: 1e-4, F16: 2e-3, BF16: 1e-2}  # relative to max |reference|; 16-bit outputs round
SCALES = (1.0, 0.25, 0.37, 0.5, 0.63, 0.75, 0.87)


@pytest.fixture(scope="session")
def cpu_extension_built():
    """Build the CPU extension once per test session (about a minute the first time)."""
    why = eb.toolchain_problem(eb.cpu_spec())
    if why is not None:
        pytest.skip(f"no toolchain to build the CPU extension: {why}")
    failure = eb.cpu_extension.failure()
    assert failure is None, failure  # a toolchain is present, so the build must succeed
    return eb.cpu_extension.module()


@pytest.fixture(params=["cpu", "cuda"])
def native(request, cpu_extension_built):
    """(backend name, device) for each compiled backend usable here."""
    name = request.param
    device = torch.device(name)
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU test: the cuda backend needs a CUDA GPU")
    why = dispatch.unavailable_reason(name, device, F32)
    if why is not None:
        pytest.fail(f"backend {name!r} should run here but: {why}")
    return name, device


def distributions(gen, *shape, sharpness=3.0, dtype=F32):
    p = torch.softmax(torch.randn(*shape, generator=gen, dtype=torch.float64) * sharpness, -1)
    return p.to(dtype)


def with_zeros_and_one_hots(p: torch.Tensor, gen) -> torch.Tensor:
    """Zero about a third of the entries (renormalised) and make a few rows exactly one-hot."""
    keep = torch.rand(p.shape, generator=gen, dtype=torch.float64) > 0.35
    keep[..., 0] = True
    q = p.double() * keep
    q = q / q.sum(-1, keepdim=True)
    n, C = q.shape[-2], q.shape[-1]
    for i in range(0, n, 3):
        q[..., i, :] = 0.0
        q[..., i, (i * 7) % C] = 1.0
    return q.to(p.dtype)


def ref_rows(fn, *tensors, **kw):
    """The reference in float64 on [..., rows, K] inputs flattened to one batch dimension."""
    def flat(t):
        return None if t is None else t.double().reshape(-1, *t.shape[-2:])

    return fn(*[flat(t) for t in tensors], **{k: flat(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})


def rel_err(out, expected):
    return ((out.double() - expected.reshape(out.shape)).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------- build


def test_build_is_cached_on_disk(cpu_extension_built):
    spec = eb.cpu_spec()
    folder = eb.build_root() / spec.module_name
    assert eb._library_exists(folder, spec.module_name)
    # A fresh process loads the cached library: no "building" line, and the ops work.
    code = ("import torch; from cdam_fast.backends import extension_build as eb; "
            "assert eb.cpu_extension.failure() is None; m = eb.cpu_extension.module(); "
            "p = torch.full((1, 3, 4), 0.25); print(float(m.pairwise_jsd(p, None).abs().max()))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "building cdam_fast" not in run.stderr
    assert float(run.stdout.strip().splitlines()[-1]) == 0.0


def test_a_read_only_cache_with_a_complete_build_keeps_loading(cpu_extension_built, tmp_path):
    """A copy of the built forward extension in a cache where no folder can be created (mkdir
    there fails as on a read-only mount; chmod would not stop root): the forward loads it, and the
    backward, whose extension is not in that cache, uses the reference formulas with a warning."""
    spec = eb.cpu_spec()
    cache = tmp_path / "read-only"
    shutil.copytree(eb.build_root() / spec.module_name, cache / "cdam_fast" / spec.module_name)
    code = textwrap.dedent("""
        import errno, os, warnings
        import torch
        import cdam_fast as cf

        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):  # os.makedirs and Path.mkdir call it too
            if str(path).startswith(os.environ["TORCH_EXTENSIONS_DIR"]):
                raise PermissionError(errno.EROFS, "Read-only file system", str(path))
            return real_mkdir(path, *args, **kwargs)

        os.mkdir = mkdir
        p = torch.softmax(3 * torch.randn(1, 6, 4, dtype=torch.float64), -1).float().requires_grad_()
        print("REPORT", cf.available_backends()["cpu"])
        out = cf.pairwise_jsd(p, backend="cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out.sum().backward()
        print("BACKWARD", bool(torch.isfinite(p.grad).all()), [str(w.message) for w in caught])
    """)
    env = {k: v for k, v in os.environ.items() if k not in (eb.NO_BUILD_ENV, dispatch.ENV_VAR)}
    env["TORCH_EXTENSIONS_DIR"] = str(cache)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "REPORT None" in run.stdout and "building cdam_fast" not in run.stderr
    assert "BACKWARD True" in run.stdout and "using the reference formulas" in run.stdout, run.stdout
    assert str(cache) in run.stdout  # the warning names the folder that could not be written


def test_fingerprint_tracks_sources_and_flags(tmp_path):
    src = tmp_path / "a.cpp"
    src.write_text("int f() { return 1; }\n")
    spec = eb.ExtensionSpec("x", (src,), cflags=("-O3",))
    before = spec.fingerprint()
    assert eb.ExtensionSpec("x", (src,), cflags=("-O3",)).fingerprint() == before
    assert eb.ExtensionSpec("x", (src,), cflags=("-O2",)).fingerprint() != before
    src.write_text("int f() { return 2; }\n")
    assert spec.fingerprint() != before and spec.module_name == f"x_{spec.fingerprint()}"


def test_isa_flags_follow_cpuinfo():
    with_avx2 = "processor : 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
    without = "processor : 0\nflags\t\t: fpu sse2 avx\n"
    assert "-mavx2" in eb.cpu_isa_flags(with_avx2) and "-DCPU_CAPABILITY_AVX2" in eb.cpu_isa_flags(with_avx2)
    assert eb.cpu_isa_flags(without) == ["-DCPU_CAPABILITY=DEFAULT"]


def test_compiler_error_becomes_one_line_reason(tmp_path):
    if eb.toolchain_problem(eb.ExtensionSpec("x", ())) is not None:
        pytest.skip("no C++ toolchain here")
    broken = tmp_path / "broken.cpp"
    broken.write_text("int main( {\n")
    spec = eb.ExtensionSpec("cdam_fast_broken", (broken,))
    with pytest.raises(eb.ExtensionBuildError) as info:
        eb.build(spec, root=tmp_path / "build")
    msg = str(info.value)
    assert "\n" not in msg and "failed" in msg
    assert "error" in msg.lower() and "broken.cpp" in msg


@pytest.fixture
def broken_toolchain(monkeypatch, tmp_path):
    """The CPU backend as it behaves on a machine without a compiler (fresh, unbuilt state)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no cached build: that would still load
    monkeypatch.setenv("CXX", "/nonexistent/bin/c++")
    monkeypatch.setattr(CpuBackend, "extension", eb._Cached(eb.cpu_spec))
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def test_missing_compiler_gives_reason_and_auto_falls_back(broken_toolchain, gen):
    why = CpuBackend().unavailable_reason(torch.device("cpu"), F32)
    assert why is not None and "no C++ compiler" in why and "/nonexistent/bin/c++" in why
    p = distributions(gen, 6, 4)
    with pytest.warns(RuntimeWarning, match=r"backend 'cpu' unavailable.*no C\+\+ compiler.*falling back to 'reference'"):
        out = cf.pairwise_jsd(p)
    torch.testing.assert_close(out.double(), ref.pairwise_jsd(p.double()[None])[0], atol=J_ATOL, rtol=0)
    with pytest.raises(BackendUnavailableError, match="no C\\+\\+ compiler"):
        cf.pairwise_jsd(p, backend="cpu")


def test_build_can_be_disabled(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there: a built one would still load
    monkeypatch.setenv(eb.NO_BUILD_ENV, "1")
    fresh = eb._Cached(eb.cpu_spec)
    assert eb.NO_BUILD_ENV in fresh.failure()
    with pytest.raises(eb.ExtensionBuildError):
        fresh.module()


# ---------------------------------------------------------------------------------------- dispatch


def test_auto_picks_cpu_for_cpu_float_tensors(cpu_extension_built, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    for dtype in (F32, F16, BF16):
        assert dispatch.resolve("auto", torch.device("cpu"), dtype).name == "cpu"


def test_cpu_backend_refuses_float64_and_gpu_tensors(cpu_extension_built, gen):
    p = distributions(gen, 5, 3)
    with pytest.raises(BackendUnavailableError, match="float64"):
        cf.pairwise_jsd(p.double(), backend="cpu")
    with pytest.raises(BackendUnavailableError, match="float64"):
        cf.cdam_attention(p, torch.randn(5, 2, dtype=torch.float64), backend="cpu")
    assert "CPU tensors only" in CpuBackend().unavailable_reason(torch.device("cuda"), F32)
    with pytest.raises(BackendUnavailableError, match="CPU tensors only"):
        dispatch.resolve("cpu", torch.device("cuda"), F32)
    if torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CPU tensors only"):
            cf.pairwise_jsd(p.cuda(), backend="cpu")


def test_bad_inputs_name_the_argument(cpu_extension_built):
    p = torch.softmax(torch.randn(4, 3), -1)
    with pytest.raises(cf.CdamInputError, match="rows of p must sum to 1"):
        cf.cdam_map(p * 2, backend="cpu")
    with pytest.raises(cf.CdamInputError, match="v has token count"):
        cf.cdam_attention(p, torch.randn(5, 2), backend="cpu")
    with pytest.raises(cf.CdamInputError, match="q has class count"):
        cf.jsd_attention(p, torch.randn(4, 2), q=torch.softmax(torch.randn(4, 5), -1), backend="cpu")


# ------------------------------------------------------------------------------------ numerics

SHAPES = [  # (lead, N, M, C): sizes off the 16-key blocks and 64-row tiles
    pytest.param((), 1, 1, 1, id="n1-c1"),
    pytest.param((), 7, 33, 3, id="n7-m33-c3"),
    pytest.param((2,), 33, 7, 101, id="b2-n33-m7-c101"),
    pytest.param((), 130, 17, 512, id="n130-c512"),
    pytest.param((2, 3), 17, 130, 5, id="b2x3-n17-m130"),
]


@pytest.mark.parametrize("lead,N,M,C", SHAPES)
def test_pairwise_jsd(native, gen, lead, N, M, C):
    name, dev = native
    p = distributions(gen, *lead, N, C)
    q = distributions(gen, *lead, M, C, sharpness=1.0)
    self_j = cf.pairwise_jsd(p.to(dev), backend=name)
    assert self_j.dtype == F32 and self_j.shape == (*lead, N, N)
    torch.testing.assert_close(self_j.cpu().double(), ref_rows(ref.pairwise_jsd, p).reshape(*lead, N, N), atol=J_ATOL, rtol=0)
    assert bool((self_j.diagonal(dim1=-2, dim2=-1) == 0).all())
    cross = cf.pairwise_jsd(p.to(dev), q.to(dev), backend=name)
    torch.testing.assert_close(cross.cpu().double(), ref_rows(ref.pairwise_jsd, p, q).reshape(*lead, N, M), atol=J_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_zeros_one_hots_and_16_bit_inputs(native, gen, dtype):
    name, dev = native
    p = with_zeros_and_one_hots(distributions(gen, 2, 37, 11), gen).to(dtype)
    # bf16 rounding moves row sums by up to ~3e-3, past the validator's tolerance: skip it here.
    J = cf.pairwise_jsd(p.to(dev), backend=name, validate=False)
    expected = ref_rows(ref.pairwise_jsd, p)  # the reference sees the same (rounded) values
    torch.testing.assert_close(J.cpu().double(), expected, atol=J_ATOL, rtol=0)
    one_hot = torch.arange(0, 37, 3)
    # Distinct one-hot rows are exactly ln 2 apart, equal ones exactly 0.
    sub = J[0][one_hot][:, one_hot].cpu().double()
    same = p[0, one_hot].float().argmax(-1)[:, None] == p[0, one_hot].float().argmax(-1)[None, :]
    torch.testing.assert_close(sub, torch.where(same, 0.0, math.log(2)).double(), atol=J_ATOL, rtol=0)
    A = cf.cdam_map(p.to(dev), backend=name, validate=False)
    torch.testing.assert_close(A.cpu().double(), ref_rows(ref.cdam_map, p), atol=MAP_ATOL, rtol=0)


def test_identical_rows_give_a_map_of_ones(native, gen):
    name, dev = native
    p = distributions(gen, 1, 5).expand(9, 5).contiguous()
    A = cf.cdam_map(p.to(dev), backend=name)
    assert bool((A == 1).all()), A
    v = torch.randn(9, 4, generator=gen)
    out = cf.cdam_attention(p.to(dev), v.to(dev), mode="recompute", backend=name)
    torch.testing.assert_close(out.cpu(), v.sum(0, keepdim=True).expand(9, 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [1e-3, 200.0])
def test_extreme_alpha_stays_finite(native, gen, alpha):
    """expm1(alpha) overflows float32 past alpha ~ 88; the kernels' ratio form must not."""
    name, dev = native
    p = distributions(gen, 40, 6)
    A = cf.cdam_map(p.to(dev), alpha, backend=name)
    assert bool(torch.isfinite(A).all())
    torch.testing.assert_close(A.cpu().double(), ref_rows(ref.cdam_map, p, alpha=alpha)[0], atol=MAP_ATOL, rtol=0)
    v = torch.randn(40, 8, generator=gen)
    out = cf.cdam_attention(p.to(dev), v.to(dev), alpha, mode="recompute", backend=name)
    assert rel_err(out.cpu(), ref_rows(ref.cdam_map, p, alpha=alpha)[0] @ v.double()) < ATTN_RTOL[F32]


@pytest.mark.parametrize("mode", ["materialize", "recompute"])
@pytest.mark.parametrize("lead,N,C,D", [
    pytest.param((), 1, 3, 5, id="n1"),
    pytest.param((), 33, 101, 1, id="n33-d1"),
    pytest.param((2,), 130, 7, 64, id="b2-n130-d64"),
    pytest.param((), 70, 512, 200, id="n70-c512-d200"),
    pytest.param((), 20, 13, 1024, id="n20-d1024"),
])
@pytest.mark.parametrize("vdtype", [F32, F16, BF16])
def test_cdam_map_and_attention(native, gen, lead, N, C, D, mode, vdtype):
    name, dev = native
    p = distributions(gen, *lead, N, C)
    v = torch.randn(*lead, N, D, generator=gen).to(vdtype)
    A_ref = ref_rows(ref.cdam_map, p, alpha=10.0)
    if mode == "materialize" and vdtype == F32:  # the map itself, once per shape
        A = cf.cdam_map(p.to(dev), backend=name)
        torch.testing.assert_close(A.cpu().double(), A_ref.reshape(A.shape), atol=MAP_ATOL, rtol=0)
    out = cf.cdam_attention(p.to(dev), v.to(dev), mode=mode, backend=name)
    assert out.dtype == vdtype and out.shape == v.shape
    expected = A_ref @ v.double().reshape(-1, N, D)
    assert rel_err(out.cpu(), expected) < ATTN_RTOL[vdtype]


@pytest.mark.parametrize("mode", ["materialize", "recompute"])
@pytest.mark.parametrize("lead,C,h,w,D", [
    pytest.param((), 3, 1, 1, 4, id="1x1"),
    pytest.param((), 5, 4, 9, 3, id="4x9"),
    pytest.param((2,), 101, 11, 6, 64, id="b2-11x6"),
    pytest.param((), 21, 17, 13, 200, id="17x13"),
])
def test_multiscale(native, gen, lead, C, h, w, D, mode):
    name, dev = native
    sim = torch.randn(*lead, C, h, w, generator=gen) * 0.3
    v = torch.randn(*lead, h * w, D, generator=gen)
    A_ref = ref.multiscale_cdam_map(sim.double().reshape(-1, C, h, w), SCALES, 0.1, 10.0)
    if mode == "materialize":
        A = cf.multiscale_cdam_map(sim.to(dev), backend=name)
        torch.testing.assert_close(A.cpu().double(), A_ref.reshape(A.shape), atol=MAP_ATOL, rtol=0)
    out = cf.multiscale_cdam_attention(sim.to(dev), v.to(dev), mode=mode, backend=name)
    assert out.shape == v.shape and out.dtype == v.dtype
    assert rel_err(out.cpu(), A_ref @ v.double().reshape(-1, h * w, D)) < ATTN_RTOL[F32]
    # 16-bit similarity grids and values
    out16 = cf.multiscale_cdam_attention(sim.to(BF16).to(dev), v.to(F16).to(dev), mode=mode, backend=name)
    A16 = ref.multiscale_cdam_map(sim.to(BF16).double().reshape(-1, C, h, w), SCALES, 0.1, 10.0)
    assert out16.dtype == F16 and rel_err(out16.cpu(), A16 @ v.to(F16).double().reshape(-1, h * w, D)) < ATTN_RTOL[F16]


@pytest.mark.parametrize("lead,N,M,C,D,tau", [
    pytest.param((), 1, None, 2, 3, 0.1, id="self-n1"),
    pytest.param((), 33, None, 101, 64, 0.1, id="self-n33"),
    pytest.param((2,), 17, 600, 7, 5, 0.05, id="b2-m600"),
    pytest.param((), 5, 4100, 7, 3, 0.02, id="m4100-online-softmax-over-two-key-blocks"),
    pytest.param((), 130, 70, 512, 200, 0.01, id="c512-sharp"),
    pytest.param((), 9, 20, 3, 1024, 1.0, id="d1024"),
])
@pytest.mark.parametrize("vdtype", [F32, BF16])
def test_jsd_attention(native, gen, lead, N, M, C, D, tau, vdtype):
    """M None: the keys are p itself; else q [.., M, C] != p."""
    name, dev = native
    p = distributions(gen, *lead, N, C)
    q = None if M is None else distributions(gen, *lead, M, C, sharpness=1.5)
    v = torch.randn(*lead, N if M is None else M, D, generator=gen).to(vdtype)
    out = cf.jsd_attention(p.to(dev), v.to(dev), tau, q=None if q is None else q.to(dev), backend=name)
    assert out.dtype == vdtype and out.shape == (*lead, N, D)
    expected = ref_rows(ref.jsd_attention, p, v, tau=tau, q=q)
    # A divergence error dJ (<= J_ATOL) moves the logits by dJ / tau, the weights relatively by
    # about 2 dJ / tau; a wrong tau (1 %) or formula moves them by >= 1e-2.
    assert rel_err(out.cpu(), expected) < ATTN_RTOL[vdtype] + 2 * J_ATOL / tau
