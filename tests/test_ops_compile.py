"""The ops as torch.library custom ops: opcheck passes, and torch.compile(fullgraph=True) of
code calling them gives the eager result (one opaque node per op, shapes from register_fake)."""
import pytest
import torch
import torch._dynamo.testing

import cdam_fast as cf
from cdam_fast.opspec import OP_NAMES, OPS
from conftest import INTERPRETED, random_distributions, random_similarities, random_values

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
ops = torch.ops.cdam_fast
BUDGET = cf.DEFAULT_MEMORY_BUDGET


def opcheck_cases(name, gen):
    """(op, args) pairs covering every op, both optional-q forms, both modes and mixed dtypes."""
    p, q = random_distributions(gen, 2, 6, 4), random_distributions(gen, 2, 5, 4)
    v, vq = random_values(gen, 2, 6, 3), random_values(gen, 2, 5, 3)
    sim, vs = random_similarities(gen, 2, 4, 3, 5), random_values(gen, 2, 15, 3)
    p16, v16 = random_distributions(gen, 2, 6, 4, dtype=F16), random_values(gen, 2, 6, 3, dtype=BF16)
    scales = [1.0, 0.5]
    return {
        "pairwise_jsd": (ops.pairwise_jsd.default, (p, None, name, True)),
        "pairwise_jsd_q": (ops.pairwise_jsd.default, (p, q, name, True)),
        "pairwise_jsd_f16": (ops.pairwise_jsd.default, (p16, None, name, True)),
        "cdam_map": (ops.cdam_map.default, (p, 10.0, name, True)),
        "cdam_attention_materialize": (ops.cdam_attention.default, (p, v, 10.0, "materialize", BUDGET, name, True)),
        "cdam_attention_recompute": (ops.cdam_attention.default, (p, v, 10.0, "recompute", BUDGET, name, True)),
        "cdam_attention_16bit": (ops.cdam_attention.default, (p16, v16, 10.0, "auto", 0, name, True)),
        "multiscale_cdam_map": (ops.multiscale_cdam_map.default, (sim, scales, 0.1, 10.0, name, True)),
        "multiscale_cdam_attention": (ops.multiscale_cdam_attention.default,
                                      (sim, vs, scales, 0.1, 10.0, "auto", BUDGET, name, True)),
        "multiscale_cdam_attention_recompute": (ops.multiscale_cdam_attention.default,
                                                (sim.half(), vs, scales, 0.1, 10.0, "recompute", BUDGET, name, True)),
        "jsd_attention": (ops.jsd_attention.default, (p, v, 0.1, None, name, True)),
        "jsd_attention_q": (ops.jsd_attention.default, (p, vq, 0.1, q, name, True)),
        "jsd_attention_16bit": (ops.jsd_attention.default, (p16, v16, 0.1, None, name, True)),
    }


def layout_cases(name, gen):
    """Non-contiguous inputs (a transposed v, a permuted p / sim): every backend returns contiguous
    outputs, so the fake must too (it used to keep v's strides)."""
    def strided(t, *order):  # same values, permuted memory layout
        return t.permute(*order).contiguous().permute(*order)

    p = strided(random_distributions(gen, 2, 6, 4), 0, 2, 1)   # [2, 6, 4]
    vt = strided(random_values(gen, 2, 6, 3), 0, 2, 1)         # [2, 6, 3]
    sim = random_similarities(gen, 2, 4, 5, 3).permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)  # [2, 4, 3, 5]
    vs = strided(random_values(gen, 2, 15, 3), 0, 2, 1)
    assert not (p.is_contiguous() or vt.is_contiguous() or sim.is_contiguous() or vs.is_contiguous())
    return {
        "cdam_attention_vT": (ops.cdam_attention.default, (p, vt, 10.0, "materialize", BUDGET, name, True)),
        "cdam_attention_vT_recompute": (ops.cdam_attention.default, (p, vt, 10.0, "recompute", 0, name, True)),
        "multiscale_cdam_attention_vT": (ops.multiscale_cdam_attention.default,
                                         (sim, vs, [1.0, 0.5], 0.1, 10.0, "auto", BUDGET, name, True)),
        "jsd_attention_vT": (ops.jsd_attention.default, (p, vt, 0.1, None, name, True)),
        "pairwise_jsd_pT": (ops.pairwise_jsd.default, (p, None, name, True)),
    }


CASE_NAMES = list(opcheck_cases("reference", torch.Generator().manual_seed(0)))
LAYOUT_CASES = list(layout_cases("reference", torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_opcheck(backend, gen, case):
    name, dev = backend
    op, args = opcheck_cases(name, gen)[case]
    args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_opcheck_non_contiguous_inputs(backend, gen, case):
    name, dev = backend
    op, args = layout_cases(name, gen)[case]
    args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)
    out = op(*args)
    assert out.is_contiguous()


@pytest.mark.parametrize("op", OP_NAMES)
def test_every_registered_op_passes_opcheck(backend, gen, op):
    """Inputs from the op's own spec: an op added to the registry is checked without new code here."""
    name, dev = backend
    spec = OPS[op]
    kw = spec.example_args(B=2, N=6, C=4, D=3, M=5, grid=(2, 3),
                           distributions=lambda s: random_distributions(gen, *s, device=dev),
                           values=lambda s: random_values(gen, *s, device=dev),
                           similarities=lambda s: random_similarities(gen, *s, device=dev))
    options = {"alpha": 10.0, "tau": 0.1, "scales": [1.0, 0.5], "mode": "auto", "memory_budget": BUDGET}
    args = tuple(kw.get(k, options.get(k)) for k in spec.params) + (name, True)
    torch.library.opcheck(getattr(ops, op).default, args)


@pytest.mark.parametrize("m", [5, 0])
def test_mixed_dtypes_follow_one_rule(gen, m):
    """p float32 with q float64 (also with M = 0): computed in float64, returned as float64,
    eager and fake alike; an explicit float32-only backend refuses it."""
    p = random_distributions(gen, 2, 4, 3)
    q = random_distributions(gen, 2, max(m, 1), 3, dtype=torch.float64)[:, :m]
    torch.library.opcheck(ops.pairwise_jsd.default, (p, q, "reference", True))
    out = cf.pairwise_jsd(p, q)
    assert out.dtype == torch.float64 and out.shape == (2, 4, m)
    if m:
        from cdam_fast import reference

        torch.testing.assert_close(out, reference.pairwise_jsd(p.double(), q), rtol=0, atol=1e-15)
    if m:
        with pytest.raises(cf.BackendUnavailableError, match="float64"):
            cf.pairwise_jsd(p, q, backend="cpu")
    v = random_values(gen, 2, 4, 3, dtype=torch.float64)
    torch.library.opcheck(ops.cdam_attention.default, (p, v, 10.0, "auto", BUDGET, "reference", True))
    vk = random_values(gen, 2, m, 3, dtype=torch.float16)
    torch.library.opcheck(ops.jsd_attention.default, (p.half(), vk, 0.1, q, "reference", True))


def test_compile_fullgraph_transposed_values(gen):
    """The output layout is the library's rule, not a backend's (opcheck above covers each backend)."""
    name, dev = "reference", torch.device("cpu")

    def fn(p, vt):
        return cf.cdam_attention(p, vt.transpose(-1, -2), backend=name) * 2.0

    p, vt = random_distributions(gen, 2, 6, 4).to(dev), random_values(gen, 2, 3, 6).to(dev)
    # inductor (not aot_eager): it trusts the fake's strides and checks them on the real output.
    # Its on-disk graph cache does not key on the fake implementation, so a graph compiled
    # against an older fake (other checkouts share the cache) must not be reused here.
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(p, vt), fn(p, vt))


def test_opcheck_float64_reference(gen):
    """float64 inputs give float64 maps (fake and real agree on it)."""
    p = random_distributions(gen, 2, 5, 3, dtype=torch.float64)
    torch.library.opcheck(ops.pairwise_jsd.default, (p, None, "reference", True))
    torch.library.opcheck(ops.cdam_attention.default, (p.float(), random_values(gen, 2, 5, 4, dtype=torch.float64),
                                                       10.0, "auto", BUDGET, "reference", True))


def every_op(name):
    """A small model calling every op between ordinary tensor code (which inductor fuses)."""
    def fn(logits, v, q, sim, vs):
        p = torch.softmax(logits / 0.1, -1)
        outs = [
            cf.pairwise_jsd(p, backend=name),
            cf.pairwise_jsd(p, q, backend=name),
            cf.cdam_map(p, 10.0, backend=name) * 2.0,
            cf.cdam_attention(p, v, mode="materialize", backend=name),
            # bf16 v, except in the Triton interpreter, whose bf16 tl.dot returns garbage
            cf.cdam_attention(p, v.to(torch.float16 if name == "triton" and INTERPRETED else torch.bfloat16),
                              mode="recompute", backend=name).float(),
            cf.multiscale_cdam_map(sim, (1.0, 0.5), backend=name),
            cf.multiscale_cdam_attention(sim, vs, backend=name) + vs,
            cf.jsd_attention(p, v, backend=name),
            cf.jsd_attention(p, v[..., :5, :], 0.2, q=q, backend=name),
        ]
        return outs
    return fn


def inputs(gen, n=6, lead=(2,)):
    return (random_similarities(gen, *lead, n, 4), random_values(gen, *lead, n, 3),
            random_distributions(gen, *lead, 5, 4), random_similarities(gen, *lead, 4, 3, 5),
            random_values(gen, *lead, 15, 3))


def assert_same(compiled, eager):
    # The softmax in front of the ops may round differently once fused; everything downstream
    # stays within the correctness suite's tolerances.
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert c.dtype == e.dtype and c.shape == e.shape, i
        torch.testing.assert_close(c, e, rtol=1e-4 if e.dtype == F32 else 1e-2, atol=1e-4 if e.dtype == F32 else 1e-2,
                                   msg=lambda m, i=i: f"output {i}: {m}")


def test_compile_fullgraph(backend, gen):
    name, dev = backend
    fn = every_op(name)
    args = [t.to(dev) for t in inputs(gen)]
    assert_same(torch.compile(fn, fullgraph=True)(*args), fn(*args))


def test_compile_automatic_dynamic_shapes(gen):
    """After one shape change torch.compile re-traces with symbolic shapes (register_fake must
    handle them); further shapes reuse that graph."""
    fn = every_op("reference")
    # aot_eager runs the fake implementations on symbolic shapes like inductor does, without
    # inductor's C++ code generation (tens of seconds per graph on a 2-core CPU). Batch sizes
    # stay >= 2: torch specialises sizes 0 and 1.
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for n, lead in ((6, (2,)), (9, (3,)), (7, (4,)), (8, (2,))):
        args = inputs(gen, n, lead)
        assert_same(compiled(*args), fn(*args))
    assert counter.frame_count == 2


def test_compile_dynamic_true(gen):
    fn = every_op("reference")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for n, lead in ((6, (2,)), (9, (3,))):
        args = inputs(gen, n, lead)
        assert_same(compiled(*args), fn(*args))
        frames.append(counter.frame_count)
    # dynamo may restart its analysis once inside the first call; the second shape must reuse it
    assert frames[0] >= 1 and frames[1] == frames[0], frames


def test_value_checks_run_inside_the_compiled_graph(gen):
    """The value checks are part of the op, so a compiled graph still rejects bad values,
    and validate=False still skips them."""
    def fn(p, v, validate):
        return cf.cdam_attention(p, v, backend="reference", validate=validate)

    compiled = torch.compile(fn, fullgraph=True)
    p, v = random_distributions(gen, 6, 4), random_values(gen, 6, 3)
    torch.testing.assert_close(compiled(p, v, True), fn(p, v, True))
    with pytest.raises(cf.CdamInputError, match=r"\bp\b.*sum to 1"):
        compiled(p * 2.0, v, True)
    v_bad = v.clone()
    v_bad[0, 0] = float("nan")
    with pytest.raises(cf.CdamInputError, match=r"\bv\b.*NaN"):
        compiled(p, v_bad, True)
    assert compiled(p * 2.0, v, False).shape == v.shape


def test_structural_errors_surface_at_trace_time(gen):
    """Shape checks are plain Python in the wrapper: they fail while tracing. Without fullgraph
    dynamo falls back to eager and the user sees the CdamInputError itself; with fullgraph=True
    torch wraps it, but the message still names the argument."""
    def fn(p, v):
        return cf.cdam_attention(p, v)

    p, v = random_distributions(gen, 6, 4), random_values(gen, 5, 3)
    with pytest.raises(cf.CdamInputError, match=r"\bv\b.*token count"):
        torch.compile(fn)(p, v)
    with pytest.raises(Exception, match=r"\bv\b.*token count"):
        torch.compile(fn, fullgraph=True)(p, v)
