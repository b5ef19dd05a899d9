"""Bad input gets a clear error that names the argument; empty input gives empty output;
backend selection (names, CDAM_FAST_BACKEND, unavailable backends) behaves as documented."""
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import cdam_fast as cf
from cdam_fast import dispatch
from cdam_fast import reference
from cdam_fast.backends.reference_backend import ReferenceBackend
from conftest import random_distributions, random_similarities, random_values

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
FAST_BACKENDS = ("triton", "cuda", "cpu")


def raises_naming(name, exc=cf.CdamInputError, also=None):
    """pytest.raises(exc) whose message must contain the argument name as a word (and `also`)."""
    pattern = rf"\b{re.escape(name)}\b" + (f".*{also}" if also else "")
    return pytest.raises(exc, match=re.compile(pattern, re.S))


@pytest.fixture
def data(gen):
    """Valid float32 inputs on the CPU: p [2, 6, 5], q [2, 4, 5], v [2, 6, 3], vq [2, 4, 3],
    sim [2, 5, 3, 4] with its values vs [2, 12, 3]."""
    return dict(p=random_distributions(gen, 2, 6, 5), q=random_distributions(gen, 2, 4, 5),
                v=random_values(gen, 2, 6, 3), vq=random_values(gen, 2, 4, 3),
                sim=random_similarities(gen, 2, 5, 3, 4), vs=random_values(gen, 2, 12, 3))


# Every op as a call taking the inputs by name, so one test can break one argument of all of them.
CALLS = {
    "pairwise_jsd": lambda d, **kw: cf.pairwise_jsd(d["p"], **kw),
    "pairwise_jsd_q": lambda d, **kw: cf.pairwise_jsd(d["p"], d["q"], **kw),
    "cdam_map": lambda d, **kw: cf.cdam_map(d["p"], **kw),
    "cdam_attention": lambda d, **kw: cf.cdam_attention(d["p"], d["v"], **kw),
    "multiscale_cdam_map": lambda d, **kw: cf.multiscale_cdam_map(d["sim"], **kw),
    "multiscale_cdam_attention": lambda d, **kw: cf.multiscale_cdam_attention(d["sim"], d["vs"], **kw),
    "jsd_attention": lambda d, **kw: cf.jsd_attention(d["p"], d["v"], **kw),
    "jsd_attention_q": lambda d, **kw: cf.jsd_attention(d["p"], d["vq"], q=d["q"], **kw),
}
# Which arguments each call reads, by the names used in the error messages.
READS = {
    "pairwise_jsd": {"p": "p"}, "pairwise_jsd_q": {"p": "p", "q": "q"}, "cdam_map": {"p": "p"},
    "cdam_attention": {"p": "p", "v": "v"}, "multiscale_cdam_map": {"sim": "sim"},
    "multiscale_cdam_attention": {"sim": "sim", "vs": "v"}, "jsd_attention": {"p": "p", "v": "v"},
    "jsd_attention_q": {"p": "p", "q": "q", "vq": "v"},
}
ARGUMENTS = [pytest.param(call, key, name, id=f"{call}-{name}") for call, reads in READS.items()
             for key, name in reads.items()]
DISTRIBUTIONS = [a for a in ARGUMENTS if a.values[2] in ("p", "q")]
VALUES = [a for a in ARGUMENTS if a.values[2] not in ("p", "q")]


def broken(data, key, value):
    return {**data, key: value}


# ------------------------------------------------------------------ structure (checked up front)

@pytest.mark.parametrize("call,key,name", ARGUMENTS)
def test_wrong_rank(data, call, key, name):
    low = data[key][0, 0]  # two dims fewer: 1-D for p, q and v, 2-D for sim
    with raises_naming(name, also="dimensions"):
        CALLS[call](broken(data, key, low))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
@pytest.mark.parametrize("call,key,name", ARGUMENTS)
def test_non_float_dtype(data, call, key, name, dtype):
    with raises_naming(name, also="float"):
        CALLS[call](broken(data, key, data[key].to(dtype)))


@pytest.mark.parametrize("call,key,name", ARGUMENTS)
def test_not_a_tensor(data, call, key, name):
    with raises_naming(name, also="Tensor"):
        CALLS[call](broken(data, key, data[key].tolist()))


@pytest.mark.parametrize("call,key,name", [a for a in ARGUMENTS if a.values[1] not in ("p", "sim")])
def test_different_devices(data, call, key, name):
    # The meta device stands in for a second device on machines without a GPU.
    with raises_naming(name, also="meta"):
        CALLS[call](broken(data, key, data[key].to("meta")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a real second device")
def test_cuda_and_cpu_mixed(data):
    with raises_naming("v", also="cuda"):
        cf.cdam_attention(data["p"], data["v"].cuda())
    with raises_naming("q", also="cpu"):
        cf.pairwise_jsd(data["p"].cuda(), data["q"])


def test_mismatched_sizes(data):
    p, q, v, vq, sim, vs = (data[k] for k in ("p", "q", "v", "vq", "sim", "vs"))
    with raises_naming("q", also="class count"):
        cf.pairwise_jsd(p, q[..., :4])
    with raises_naming("q", also="batch"):
        cf.pairwise_jsd(p, q[:1])
    with raises_naming("v", also="token count"):
        cf.cdam_attention(p, v[:, :5])
    with raises_naming("v", also="batch"):
        cf.cdam_attention(p, v[None])
    with raises_naming("v", also="batch"):
        cf.cdam_attention(p, v[0])
    with raises_naming("v", also="token count"):
        cf.multiscale_cdam_attention(sim, vs[:, :11])
    with raises_naming("v", also="batch"):
        cf.multiscale_cdam_attention(sim, vs[:1])
    with raises_naming("v", also="token count"):
        cf.jsd_attention(p, v, q=q)          # v must have one row per key, i.e. per row of q
    with raises_naming("v", also="token count"):
        cf.jsd_attention(p, vq)
    with raises_naming("q", also="class count"):
        cf.jsd_attention(p, vq, q=q[..., :2])
    with raises_naming("q", also="batch"):
        cf.jsd_attention(p, vq, q=q[0])


def test_no_classes(data):
    with raises_naming("p"):
        cf.cdam_map(data["p"][..., :0])
    with raises_naming("p"):
        cf.cdam_attention(data["p"][..., :0], data["v"])
    with raises_naming("p"):
        cf.jsd_attention(data["p"][..., :0], data["v"])
    with raises_naming("p"):
        cf.pairwise_jsd(data["p"][..., :0])
    with raises_naming("sim"):
        cf.multiscale_cdam_map(data["sim"][:, :0])


@pytest.mark.parametrize("kw,name", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=-1.0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(alpha=float("inf")), "alpha"), (dict(alpha="10"), "alpha"), (dict(mode="fast"), "mode"),
    (dict(memory_budget=-1), "memory_budget"), (dict(memory_budget=1.5), "memory_budget"),
])
def test_bad_attention_options(data, kw, name):
    with raises_naming(name):
        cf.cdam_attention(data["p"], data["v"], **kw)
    if name != "mode" and name != "memory_budget":
        with raises_naming(name):
            cf.cdam_map(data["p"], **kw)
    with raises_naming(name):
        cf.multiscale_cdam_attention(data["sim"], data["vs"], **kw)


@pytest.mark.parametrize("kw,name", [
    (dict(scales=()), "scales"), (dict(scales=(1.0, 0.0)), "scales"), (dict(scales=(1.5,)), "scales"),
    (dict(scales=(-0.5,)), "scales"), (dict(scales=0.5), "scales"), (dict(scales=(float("nan"),)), "scales"),
    (dict(tau=0.0), "tau"), (dict(tau=-0.1), "tau"), (dict(tau=float("inf")), "tau"),
    (dict(alpha=0.0), "alpha"),
])
def test_bad_multiscale_options(data, kw, name):
    with raises_naming(name):
        cf.multiscale_cdam_map(data["sim"], **kw)
    with raises_naming(name):
        cf.multiscale_cdam_attention(data["sim"], data["vs"], **kw)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), None])
def test_bad_jsd_attention_tau(data, tau):
    with raises_naming("tau"):
        cf.jsd_attention(data["p"], data["v"], tau)


# ------------------------------------------------------------------ values (checked inside the op)

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("call,key,name", ARGUMENTS)
def test_non_finite_values(data, call, key, name, bad):
    t = data[key].clone()
    t[1, 2, 0] = bad
    with raises_naming(name, also="NaN or infinite"):
        CALLS[call](broken(data, key, t))


@pytest.mark.parametrize("call,key,name", DISTRIBUTIONS)
def test_negative_probabilities(data, call, key, name):
    t = data[key].clone()
    t[0, 1, :2] = torch.tensor([-0.25, t[0, 1, 0] + t[0, 1, 1] + 0.25])  # row still sums to 1
    with raises_naming(name, also="negative"):
        CALLS[call](broken(data, key, t))


@pytest.mark.parametrize("off", [2e-3, -2e-3, 0.5])
@pytest.mark.parametrize("call,key,name", DISTRIBUTIONS)
def test_rows_not_summing_to_one(data, call, key, name, off):
    t = data[key].clone()
    t[1, 0] *= 1.0 + off
    with raises_naming(name, also="sum to 1"):
        CALLS[call](broken(data, key, t))


@pytest.mark.parametrize("call,key,name", DISTRIBUTIONS)
def test_rows_within_tolerance_are_accepted(data, call, key, name):
    t = data[key].clone()
    t[1, 0] *= 1.0 + 5e-4
    out = CALLS[call](broken(data, key, t))
    assert bool(torch.isfinite(out).all())


def test_similarities_are_not_probabilities(data):
    """A common mistake: passing raw similarities (or logits) where distributions are expected."""
    cosines = data["sim"].abs().flatten(-2).transpose(-1, -2) + 0.2  # [2, 12, 5], CLIP-like positive values
    with raises_naming("p", also="softmax"):
        cf.cdam_map(cosines)


@pytest.mark.parametrize("call", CALLS)
def test_validate_false_skips_value_checks(data, call):
    bad = dict(data)
    bad["p"] = data["p"] * 1.5          # rows sum to 1.5
    bad["q"] = data["q"] * 0.5
    bad["sim"] = data["sim"].clone()
    bad["sim"][0, 0, 0, 0] = float("nan")
    with pytest.raises(cf.CdamInputError):
        CALLS[call](bad)
    out = CALLS[call](bad, validate=False)  # what comes out of a NaN is unspecified, but no error
    assert out.shape == CALLS[call](data).shape
    if not call.startswith("multiscale"):
        assert bool(torch.isfinite(out).all())


def test_validate_false_keeps_structural_checks(data):
    with raises_naming("v", also="token count"):
        cf.cdam_attention(data["p"], data["v"][:, :5], validate=False)
    with raises_naming("p", also="float"):
        cf.cdam_map(data["p"].long(), validate=False)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("flag", ["yes", "no", 0, 1, None])
def test_validate_must_be_a_bool(data, call, flag):
    with raises_naming("validate"):  # "no" is truthy: it would validate silently
        CALLS[call](data, validate=flag)


def test_bfloat16_softmax_output_is_accepted(gen):
    p = torch.softmax(random_similarities(gen, 200, 101).float() / 0.1, -1).to(BF16)
    cf.cdam_map(p)


def test_bfloat16_rows_off_by_more_than_rounding_are_rejected(gen):
    p = torch.softmax(random_similarities(gen, 20, 11).float() / 0.1, -1) * 1.02  # 2% off: not rounding
    with raises_naming("p", also="sum to 1"):
        cf.cdam_map(p.to(BF16))


# ------------------------------------------------------------------ empty inputs

def test_empty_inputs_give_empty_outputs(backend):
    name, dev = backend
    kw = dict(backend=name)

    def empty(*shape):
        return torch.zeros(*shape, device=dev)

    def dist(*shape):
        return torch.full(shape, 1.0 / shape[-1], device=dev)

    def check(out, shape, dtype=F32):
        assert tuple(out.shape) == shape and out.dtype == dtype and out.device.type == dev.type

    check(cf.pairwise_jsd(dist(0, 4), **kw), (0, 0))
    check(cf.pairwise_jsd(dist(0, 3, 4), **kw), (0, 3, 3))
    check(cf.pairwise_jsd(dist(2, 0, 4), **kw), (2, 0, 0))
    check(cf.pairwise_jsd(dist(3, 4), dist(0, 4), **kw), (3, 0))
    check(cf.pairwise_jsd(dist(0, 4), dist(5, 4), **kw), (0, 5))
    check(cf.cdam_map(dist(0, 4), **kw), (0, 0))
    check(cf.cdam_map(dist(0, 2, 3, 4), **kw), (0, 2, 3, 3))
    for mode in ("materialize", "recompute"):
        check(cf.cdam_attention(dist(0, 4), empty(0, 3), mode=mode, **kw), (0, 3))
        check(cf.cdam_attention(dist(2, 0, 4), empty(2, 0, 3), mode=mode, **kw), (2, 0, 3))
        check(cf.cdam_attention(dist(0, 5, 4), empty(0, 5, 3), mode=mode, **kw), (0, 5, 3))
        check(cf.cdam_attention(dist(5, 4), empty(5, 0), mode=mode, **kw), (5, 0))
        check(cf.multiscale_cdam_attention(empty(0, 4, 3, 3), empty(0, 9, 2), mode=mode, **kw), (0, 9, 2))
        check(cf.multiscale_cdam_attention(empty(4, 3, 3), empty(9, 0), mode=mode, **kw), (9, 0))
        check(cf.multiscale_cdam_attention(empty(4, 0, 3), empty(0, 2), mode=mode, **kw), (0, 2))
    check(cf.cdam_attention(dist(5, 4), empty(5, 0).half(), **kw), (5, 0), F16)
    check(cf.multiscale_cdam_map(empty(0, 4, 3, 3), **kw), (0, 9, 9))
    check(cf.multiscale_cdam_map(empty(4, 0, 3), **kw), (0, 0))
    check(cf.multiscale_cdam_map(empty(2, 4, 3, 0), **kw), (2, 0, 0))
    check(cf.jsd_attention(dist(0, 4), empty(0, 3), **kw), (0, 3))
    check(cf.jsd_attention(dist(5, 4), empty(5, 0), **kw), (5, 0))
    check(cf.jsd_attention(dist(0, 5, 4), empty(0, 5, 3), **kw), (0, 5, 3))
    check(cf.jsd_attention(dist(0, 4), empty(6, 3), q=dist(6, 4), **kw), (0, 3))
    check(cf.jsd_attention(dist(2, 3, 4), empty(2, 6, 0), q=dist(2, 6, 4), **kw), (2, 3, 0))


# ------------------------------------------------------------------ backend selection

def test_unknown_backend_name(data):
    for call in CALLS.values():
        with raises_naming("backend", exc=ValueError, also="bogus"):
            call(data, backend="bogus")


def test_backend_names_are_the_documented_ones():
    assert set(cf.BACKENDS) == {"auto", "triton", "cuda", "cpu", "reference"}


@pytest.fixture
def reference_calls(monkeypatch):
    """Counts the calls that reach the reference backend."""
    calls = []
    real = ReferenceBackend.forward

    def forward(self, op, call, train=False):
        calls.append(op)
        return real(self, op, call, train)
    monkeypatch.setattr(ReferenceBackend, "forward", forward)
    return calls


def test_environment_variable_overrides_auto(data, monkeypatch, reference_calls):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    for name, call in CALLS.items():
        reference_calls.clear()
        call(data)
        assert len(reference_calls) == 1, name


def test_environment_variable_does_not_override_an_explicit_backend(data, monkeypatch, reference_calls):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")  # would fail on CPU tensors if it were obeyed
    out = cf.cdam_map(data["p"], backend="reference")
    assert reference_calls == ["cdam_map"] and out.shape == (2, 6, 6)


def test_bad_environment_variable(data, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with raises_naming(dispatch.ENV_VAR, exc=ValueError, also="fastest"):
        cf.cdam_map(data["p"])


def test_environment_variable_naming_an_unavailable_backend(data, monkeypatch):
    """An unavailable backend asked for through the environment fails like an explicit one."""
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")  # a CUDA backend never runs CPU tensors
    with pytest.raises(cf.BackendUnavailableError, match="cuda"):
        cf.cdam_map(data["p"])


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
def test_auto_picks_the_best_available(dtype):
    """auto = triton for CUDA tensors, the first usable of (cpu, reference) for CPU tensors."""
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        chosen = dispatch.resolve("auto", cpu, dtype)
    want = "cpu" if dispatch.available_backends(cpu, dtype)["cpu"] is None else "reference"
    assert chosen.name == want
    cuda = torch.device("cuda")
    if torch.cuda.is_available() and dispatch.available_backends(cuda, dtype)["triton"] is None:
        assert dispatch.resolve("auto", cuda, dtype).name == "triton"


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
@pytest.mark.parametrize("call", CALLS)
def test_auto_always_runs_where_the_reference_runs(data, call, dtype, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    cast = {k: t.to(dtype) for k, t in data.items()}
    if dtype == BF16:  # bfloat16 rows must be re-quantised to stay within the 1e-3 row-sum check
        cast["p"] = random_distributions(torch.Generator().manual_seed(0), 2, 6, 5, dtype=BF16)
        cast["q"] = random_distributions(torch.Generator().manual_seed(1), 2, 4, 5, dtype=BF16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "falling back to the reference" is expected
        out = CALLS[call](cast)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", FAST_BACKENDS)
def test_float64_with_an_explicit_fast_backend_raises(data, name):
    dev = torch.device("cuda") if name in ("cuda", "triton") and torch.cuda.is_available() else torch.device("cpu")
    with pytest.raises(cf.BackendUnavailableError, match=name):
        cf.cdam_map(data["p"].double().to(dev), backend=name)
    with pytest.raises(cf.BackendUnavailableError, match=name):
        cf.cdam_attention(data["p"].to(dev), data["v"].double().to(dev), backend=name)


def test_float64_with_auto_uses_the_reference(data, reference_calls, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    out = cf.cdam_map(data["p"].double())
    assert out.dtype == F64 and reference_calls == ["cdam_map"]
    out = cf.cdam_attention(data["p"], data["v"].double())
    assert out.dtype == F64 and reference_calls[-1] == "cdam_attention"


def test_cuda_backend_on_cpu_tensors_raises(data):
    why = dispatch.unavailable_reason("cuda", torch.device("cpu"), F32)
    assert why is not None, "a CUDA backend cannot run CPU tensors"
    with pytest.raises(cf.BackendUnavailableError, match="cuda"):
        cf.cdam_map(data["p"], backend="cuda")


def test_triton_on_cpu_tensors_without_interpreter_raises():
    """Run in a fresh interpreter: TRITON_INTERPRET is read once, when Triton is imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_VAR)}
    code = (
        "import torch, cdam_fast as cf\n"
        "p = torch.full((3, 4), 0.25)\n"
        "try:\n"
        "    cf.cdam_map(p, backend='triton')\n"
        "except cf.BackendUnavailableError as e:\n"
        "    print('RAISED', e)\n"
        "else:\n"
        "    print('NO ERROR')\n"
        "print('AUTO', tuple(cf.cdam_map(p).shape))\n"
    )
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "RAISED" in res.stdout and "triton" in res.stdout, res.stdout
    assert "AUTO (3, 3)" in res.stdout, res.stdout  # auto still works there


# ------------------------------------------------------------------ parameter types and float32 ranges

@pytest.mark.parametrize("budget", [2**64, 2**63, True, False, "1024"])
def test_memory_budget_must_be_an_int64_byte_count(data, budget):
    with raises_naming("memory_budget"):
        cf.cdam_attention(data["p"], data["v"], memory_budget=budget)
    with raises_naming("memory_budget"):
        cf.multiscale_cdam_attention(data["sim"], data["vs"], memory_budget=budget)


@pytest.mark.parametrize("scales", ["1.0", b"1", (1.0, "0.5"), (True,), {"a": 1}])
def test_scales_must_be_numbers(data, scales):
    with raises_naming("scales"):
        cf.multiscale_cdam_map(data["sim"], scales=scales)


@pytest.mark.parametrize("alpha", [3.5e38, 1e300])
def test_alpha_beyond_the_float32_range_is_rejected(data, alpha):
    """alpha beyond float32 would reach the kernels as inf (alpha >= 3.4e38 gave NaN)."""
    with raises_naming("alpha", also="float32"):
        cf.cdam_map(data["p"], alpha)
    with raises_naming("alpha", also="float32"):
        cf.cdam_attention(data["p"], data["v"], alpha)
    with raises_naming("alpha", also="float32"):
        cf.multiscale_cdam_attention(data["sim"], data["vs"], alpha=alpha)


@pytest.mark.parametrize("tau", [1e-46, 1e-300])
def test_tau_below_the_float32_range_is_rejected(data, tau):
    """tau below the smallest float32 would reach the kernels as 0."""
    with raises_naming("tau", also="float32"):
        cf.jsd_attention(data["p"], data["v"], tau)
    with raises_naming("tau", also="float32"):
        cf.multiscale_cdam_map(data["sim"], tau=tau)


def test_extreme_parameters_inside_the_range_are_accepted(data):
    out = cf.cdam_map(data["p"].double(), 1e37)
    assert bool(torch.isfinite(out).all())
    out = cf.jsd_attention(data["p"].double(), data["v"].double(), 1e-36)
    assert bool(torch.isfinite(out).all())


# ------------------------------------------------------------------ CDAM_FAST_MEMORY_BUDGET

def test_bad_memory_budget_variable_does_not_break_import():
    env = {**os.environ, "CDAM_FAST_MEMORY_BUDGET": "abc"}
    code = "import cdam_fast, torch; print('IMPORTED', cdam_fast.DEFAULT_MEMORY_BUDGET)"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "IMPORTED" in res.stdout, res.stderr


@pytest.mark.parametrize("value", ["abc", "-1", "1.5e9", "1 GiB"])
def test_bad_memory_budget_variable_is_named_when_used(data, monkeypatch, value):
    monkeypatch.setenv("CDAM_FAST_MEMORY_BUDGET", value)
    with raises_naming("CDAM_FAST_MEMORY_BUDGET", also=re.escape(value) if value != "-1" else None):
        cf.cdam_attention(data["p"], data["v"])
    # an explicit budget does not read the variable
    cf.cdam_attention(data["p"], data["v"], memory_budget=1 << 20)


def test_memory_budget_variable_is_read_at_each_call(monkeypatch):
    from cdam_fast import memory

    monkeypatch.setenv("CDAM_FAST_MEMORY_BUDGET", "12345")
    assert memory.resolve_budget(None) == 12345
    monkeypatch.setenv("CDAM_FAST_MEMORY_BUDGET", " 0 ")
    assert memory.resolve_budget(None) == 0
    monkeypatch.delenv("CDAM_FAST_MEMORY_BUDGET")
    assert memory.resolve_budget(None) == cf.DEFAULT_MEMORY_BUDGET


# ------------------------------------------------------------------ input-aware dispatch

def _call(op, *tensors_and_options):
    from cdam_fast.opspec import OPS

    return OPS[op].bind((*tensors_and_options, "auto", True))[0]


def test_triton_declares_its_launch_and_offset_limits(monkeypatch):
    """Sizes the Triton kernels cannot launch (more than 2^31 - 1 programs on the one-dimensional
    grid, int32 tap indices) are reasons, so dispatch never sends them there; batches past the
    65535 of grid axes y/z are not. Meta tensors stand in for the large inputs."""
    triton_module = pytest.importorskip("cdam_fast.backends.triton_backend")
    monkeypatch.setattr(triton_module.TritonBackend, "unavailable_reason", lambda self, device, dtype: None)
    triton = triton_module.TritonBackend()
    meta = dict(device="meta")
    ok = _call("cdam_map", torch.empty(4, 784, 101, **meta), 10.0)
    assert triton.not_supported_reasons("cdam_map", ok) == []
    big_batch = _call("pairwise_jsd", torch.empty(70000, 4, 3, **meta), None)
    assert triton.not_supported_reasons("pairwise_jsd", big_batch) == []  # folded into grid x
    huge = _call("pairwise_jsd", torch.empty(2048, 2**16, 3, **meta), None)
    assert any("programs per launch" in r for r in triton.not_supported_reasons("pairwise_jsd", huge))
    taps = _call("multiscale_cdam_map", torch.empty(1, 2, 2**15, 2**14, **meta), cf.CDAM_SCALES, 0.1, 10.0)
    assert any("tap-table entries" in r for r in triton.not_supported_reasons("multiscale_cdam_map", taps))


def test_cuda_declares_its_launch_limits(monkeypatch):
    from cdam_fast.backends.cuda_backend import CudaBackend

    monkeypatch.setattr(CudaBackend, "unavailable_reason", lambda self, device, dtype: None)

    class Built:  # a built extension: only the launch limits are left to refuse a call
        failure = report = staticmethod(lambda: None)
    monkeypatch.setattr(CudaBackend, "extension", Built())
    cuda = CudaBackend()
    meta = dict(device="meta")
    ok = _call("multiscale_cdam_map", torch.empty(2, 101, 28, 28, **meta), cf.CDAM_SCALES, 0.1, 10.0)
    assert cuda.not_supported_reasons("multiscale_cdam_map", ok) == []
    big = _call("multiscale_cdam_map", torch.empty(1, 4, 300, 300, **meta), cf.CDAM_SCALES, 0.1, 10.0)
    assert cuda.not_supported_reasons("multiscale_cdam_map", big) == []  # N = 90000 on a one-dimensional grid
    huge = _call("multiscale_cdam_map", torch.empty(64, 4, 1000, 1000, **meta), cf.CDAM_SCALES, 0.1, 10.0)
    assert any("launch blocks" in r for r in cuda.not_supported_reasons("multiscale_cdam_map", huge))
    many = _call("multiscale_cdam_map", torch.empty(1, 4, 8, 8, **meta), [1.0] * 17, 0.1, 10.0)
    assert any("scales = 17" in r for r in cuda.not_supported_reasons("multiscale_cdam_map", many))
    batch = _call("cdam_attention", torch.empty(70000, 2, 3, **meta), torch.empty(70000, 2, 4, **meta), 10.0, "auto", 0)
    assert cuda.not_supported_reasons("cdam_attention", batch) == []


def test_explicit_backend_that_cannot_run_the_call_lists_its_reasons(data, monkeypatch):
    if dispatch.unavailable_reason("triton", torch.device("cpu"), F32) is not None:
        pytest.skip("triton does not run CPU tensors here")
    from cdam_fast.backends.triton_backend import TritonBackend

    monkeypatch.setattr(TritonBackend, "limit_reasons", lambda self, op, call: ["a simulated limit"])
    with pytest.raises(cf.BackendUnavailableError, match=r"'triton'.*a simulated limit"):
        cf.pairwise_jsd(data["p"], backend="triton")


def test_auto_skips_a_backend_whose_limits_a_call_exceeds(data, monkeypatch, reference_calls):
    """The warning names the backend actually used, even past several skipped ones."""
    from cdam_fast.backends.cpu_backend import CpuBackend
    from cdam_fast.backends.cuda_backend import CudaBackend

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    # cuda tried on CPU tensors too, and "running" them but for a reason of its machine
    monkeypatch.setattr(dispatch, "PRIORITY", tuple((n, t, None if n == "cuda" else d) for n, t, d in dispatch.PRIORITY))
    monkeypatch.setattr(CudaBackend, "devices", None)
    monkeypatch.setattr(CpuBackend, "limit_reasons", lambda self, op, call: ["a simulated limit"])
    with pytest.warns(RuntimeWarning, match=r"backend 'cuda' unavailable.*'cpu' cannot either.*falling back to "
                                            r"'reference'"):
        out = cf.cdam_map(data["p"])
    assert reference_calls == ["cdam_map"]
    torch.testing.assert_close(out, reference.cdam_map(data["p"], 10.0))


def test_triton_backend_functions_take_non_contiguous_inputs(gen):
    """The backend's functions used to be the raw launchers, which read v as if contiguous."""
    if dispatch.unavailable_reason("triton", torch.device("cpu"), F32) is not None:
        pytest.skip("triton does not run CPU tensors here")
    from cdam_fast.backends.triton_backend import TritonBackend

    triton_backend = TritonBackend()
    p = random_distributions(gen, 2, 5, 3)
    v = random_values(gen, 2, 4, 5).transpose(1, 2)  # [2, 5, 4], non-contiguous
    torch.testing.assert_close(triton_backend.jsd_attention(p, v, 0.1, None),
                               triton_backend.jsd_attention(p, v.contiguous(), 0.1, None), rtol=0, atol=0)
    pt = p.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(triton_backend.pairwise_jsd(pt, pt), triton_backend.pairwise_jsd(p, p), rtol=0, atol=0)


def test_registered_ops_check_their_parameters_too(data):
    """torch.ops.cdam_fast.* called directly (no public wrapper) still rejects bad parameters."""
    ops = torch.ops.cdam_fast
    with raises_naming("alpha", also="float32"):
        ops.cdam_map(data["p"], 1e39, "reference", True)
    with raises_naming("tau"):
        ops.jsd_attention(data["p"], data["v"], -1.0, None, "reference", True)
    with raises_naming("mode"):
        ops.cdam_attention(data["p"], data["v"], 10.0, "fast", 0, "reference", True)
    with raises_naming("memory_budget"):
        ops.cdam_attention(data["p"], data["v"], 10.0, "auto", -5, "reference", True)
    with raises_naming("scales"):
        ops.multiscale_cdam_map(data["sim"], [2.0], 0.1, 10.0, "reference", True)


# ------------------------------------------------------------------ direct calls of the registered ops

@pytest.mark.parametrize("call, names", [
    (lambda p: torch.ops.cdam_fast.cdam_attention(p, torch.ones(1, 4096, 3), 10.0, "recompute", 0, "auto", True), "v"),
    (lambda p: torch.ops.cdam_fast.pairwise_jsd(p, torch.softmax(torch.randn(1, 6, 7), -1), "auto", True), "q"),
    (lambda p: torch.ops.cdam_fast.jsd_attention(p, torch.ones(1, 9, 3), 0.1, None, "auto", True), "v"),
    (lambda p: torch.ops.cdam_fast.multiscale_cdam_attention(torch.randn(1, 5, 2, 2), torch.ones(1, 9, 3), [1.0], 0.1,
                                                           10.0, "recompute", 0, "auto", True), "v"),
    (lambda p: torch.ops.cdam_fast.pairwise_jsd(p[0], None, "auto", True), "p"),
    (lambda p: torch.ops.cdam_fast.pairwise_jsd(p[None], None, "auto", True), "p"),
    (lambda p: torch.ops.cdam_fast.pairwise_jsd(torch.ones(1, 2, 2, dtype=torch.int32), None, "auto", True), "p"),
    (lambda p: torch.ops.cdam_fast.cdam_attention(p, torch.ones(2, 4, 3), 10.0, "auto", 0, "auto", False), "v"),
])
def test_direct_calls_get_the_shape_checks_before_any_kernel(call, names):
    """The public wrappers check shapes; the registered ops must too (a mismatched v made the CPU
    kernel read past the end of p)."""
    p = torch.softmax(torch.randn(1, 4, 5), -1)
    with raises_naming(names):
        call(p)


def test_a_tensor_of_scales_and_a_missing_mode_are_argument_errors(data):
    with raises_naming("scales"):
        cf.multiscale_cdam_map(data["sim"], scales=torch.tensor([1.0, 0.5]))
    with raises_naming("scales", also="not tensors"):  # float() would drop a gradient with only a warning
        cf.multiscale_cdam_map(data["sim"], scales=[torch.tensor(1.0, requires_grad=True)])
    with raises_naming("alpha", also="not a tensor"):
        cf.cdam_map(data["p"], alpha=torch.tensor(10.0))
    with raises_naming("tau", also="not a tensor"):
        cf.jsd_attention(data["p"], data["v"], tau=torch.tensor(0.1))
    import numpy as np  # numpy scalars are real numbers: accepted as floats
    assert torch.equal(cf.cdam_map(data["p"], alpha=np.float32(10.0)), cf.cdam_map(data["p"], alpha=10.0))
    with raises_naming("mode"):
        cf.cdam_attention(data["p"], data["v"], mode=None)
