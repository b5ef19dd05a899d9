"""The training forwards save per-row statistics for the backward (docs/autograd.md, sections 2
and 4): jsd_attention its row log-sum-exp (FlashAttention-2 style), cdam_attention the row max /
min of J and their tie counts. The private ops cdam_fast::_<op>_train, what they return per
backend, that the Triton backward then skips a pass, that inference calls never compute the
statistics, and the ops under opcheck and torch.compile."""
import pytest
import torch

import cdam_fast as cf
from cdam_fast import _library as lib
from cdam_fast import reference as ref
from cdam_fast.opdefs import cdam as cdam_home
from cdam_fast.opdefs import jsd_attention as jsd_attention_home
from cdam_fast import dispatch
from cdam_fast.backends.reference_backend import ReferenceBackend
from cdam_fast.backends.triton_backend import TritonBackend
from cdam_fast.opspec import OPS
from conftest import random_distributions, random_values

ops = torch.ops.cdam_fast
F64 = torch.float64


@pytest.fixture(autouse=True)
def _small_interpreter_tiles(monkeypatch):
    monkeypatch.setenv("CDAM_FAST_INTERPRET_BLOCK", "16")


def _triton_device(backend):
    name, dev = backend
    if name != "triton":
        pytest.skip("Triton-specific: the other backends are covered in test_autograd.py")
    return dev


def _lse64(p, tau, q=None):
    """log2 sum_j exp(-J_ij / tau) in float64, written out here (not the code under test)."""
    j = ref.pairwise_jsd(p.double(), None if q is None else q.double())
    return torch.log2(torch.exp(-j / tau).sum(-1))


class _Launches:
    """Counts the launches of a Triton kernel (monkeypatched module attribute) and records their
    keyword arguments, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def _count(monkeypatch, module, name):
    counter = _Launches(getattr(module, name))
    monkeypatch.setattr(module, name, counter)
    return counter


@pytest.mark.parametrize("with_q", [False, True], ids=["self", "q"])
def test_saved_lse_against_float64(backend, gen, with_q):
    """Every backend's training op returns the forward's output and either the row log-sum-exp
    (base 2, float32 [B, N]; Triton and the reference compute it and declare so) or zeros (the
    CPU and CUDA C++ forwards save none, declare none, and their backwards do not need it)."""
    name, dev = backend
    p, q = random_distributions(gen, 2, 19, 5), random_distributions(gen, 2, 23, 5)
    v = random_values(gen, 2, 23 if with_q else 19, 6)
    kq = q.to(dev) if with_q else None
    out, lse = lib.jsd_attention_train(p.to(dev), v.to(dev), 0.2, kq, name, True)
    assert lse.shape == (2, 19) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert torch.equal(out, lib.jsd_attention(p.to(dev), v.to(dev), 0.2, kq, name, True))
    declared = dispatch.backend(name).saved_stats.get("jsd_attention")
    assert (declared is OPS["jsd_attention"].stats_format) == (name in ("triton", "reference"))
    if name in ("triton", "reference"):
        expected = _lse64(p, 0.2, q if with_q else None)
        # ~4x the largest relative error measured over 12 seeds (Triton 3.0e-7, reference 3.8e-7)
        assert (lse.double().cpu() - expected).abs().max().item() <= 1.5e-6 * expected.abs().max().item()
    else:
        assert (lse == 0).all()


def test_reference_saves_float64_lse_as_float32(gen):
    p = random_distributions(gen, 2, 7, 4, dtype=F64)
    v = random_values(gen, 2, 7, 3, dtype=F64)
    out, lse = lib.jsd_attention_train(p, v, 0.3, None, "reference", True)
    assert out.dtype == F64 and lse.dtype == torch.float32
    assert torch.allclose(lse.double(), _lse64(p, 0.3), rtol=2.5e-7, atol=0)  # float32 rounding: 6e-8


@pytest.mark.parametrize("with_q", [False, True], ids=["self", "q"])
def test_triton_backward_reuses_the_saved_lse(backend, gen, monkeypatch, with_q):
    """Through the public wrapper the Triton backward launches no LSE kernel (two passes over
    the key tiles); the public op called directly recomputes it (three). Both gradients match
    the float64 reference."""
    from cdam_fast.kernels import jsd_backward

    dev = _triton_device(backend)
    lse_pass = _count(monkeypatch, jsd_backward, "jsd_attention_lse_kernel")
    query_pass = _count(monkeypatch, jsd_backward, "jsd_attention_grad_query_kernel")
    p, q = random_distributions(gen, 2, 19, 5), random_distributions(gen, 2, 21, 5)
    v = random_values(gen, 2, 21 if with_q else 19, 6)
    g = random_values(gen, 2, 19, 6)
    keys = q if with_q else None
    expected = jsd_attention_home.jsd_attention_backward(g.double(), p.double(), v.double(), 0.1,
                                                         None if keys is None else keys.double())
    leaves = [t.to(dev).requires_grad_(True) for t in ((p, v, q) if with_q else (p, v))]

    def grads(fn):
        return torch.autograd.grad(fn(*leaves), leaves, g.to(dev))

    saved = grads(lambda p, v, q=None: cf.jsd_attention(p, v, q=q, backend="triton"))
    assert len(lse_pass.calls) == 0 and len(query_pass.calls) == 1
    recomputed = grads(lambda p, v, q=None: ops.jsd_attention(p, v, 0.1, q, "triton", True))
    assert len(lse_pass.calls) == 1 and len(query_pass.calls) == 2
    want = [expected[0], expected[1]] + ([expected[2]] if with_q else [])
    for got in (saved, recomputed):
        for i, (a, e) in enumerate(zip(got, want)):
            err = (a.double().cpu() - e).abs().max().item()
            assert err <= 2e-5 * e.abs().max().item(), f"gradient {i} off by {err:.3g}"


def test_triton_backward_recomputes_an_lse_that_was_not_saved(backend, gen, monkeypatch):
    """No saved lse (None): the backward runs its own LSE pass and the gradients are those of a
    saved lse."""
    from cdam_fast.kernels import jsd_backward

    dev = _triton_device(backend)
    lse_pass = _count(monkeypatch, jsd_backward, "jsd_attention_lse_kernel")
    p, v, g = random_distributions(gen, 1, 17, 4), random_values(gen, 1, 17, 5), random_values(gen, 1, 17, 5)
    p, v, g = p.to(dev), v.to(dev), g.to(dev)
    out, lse = lib.jsd_attention_train(p, v, 0.1, None, "triton", True)
    results = [ops.jsd_attention_backward(g, p, v, 0.1, None, "triton", True, [True, True, False], x)
               for x in (lse, None)]
    assert len(lse_pass.calls) == 1
    for other in results[1:]:
        for a, b in zip(results[0][:2], other[:2]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_inference_forward_does_not_compute_the_lse(backend, gen, monkeypatch):
    """No input requiring grad, or grad mode off: the public op, whose Triton kernel is compiled
    without the LSE store (WRITE_LSE=False) and returns one tensor. A gradient needed: the
    training op and WRITE_LSE=True."""
    from cdam_fast.kernels import jsd_attention as kernel_module

    dev = _triton_device(backend)
    forward = _count(monkeypatch, kernel_module, "jsd_attention_kernel")
    trained = []
    monkeypatch.setattr(TritonBackend, "jsd_attention_train",
                        lambda self, *a: trained.append(1) or kernel_module.jsd_attention(*a, with_lse=True))
    p, v = random_distributions(gen, 1, 9, 3).to(dev), random_values(gen, 1, 9, 4).to(dev)
    out = cf.jsd_attention(p, v, backend="triton")
    with torch.no_grad():
        out_ng = cf.jsd_attention(p, v.requires_grad_(True), backend="triton")
    assert isinstance(out, torch.Tensor) and not out_ng.requires_grad
    assert [c["WRITE_LSE"] for c in forward.calls] == [False, False] and not trained
    out_g = cf.jsd_attention(p, v, backend="triton")
    assert forward.calls[-1]["WRITE_LSE"] is True and trained == [1]
    assert out_g.requires_grad and torch.equal(out_g.detach(), out)


def test_train_ops_check_their_inputs_like_the_public_ops(gen):
    """Generated from the same OpSpec: a direct call with mismatched sizes or a bad option is
    refused by name before any kernel runs."""
    p, v = random_distributions(gen, 2, 6, 4), random_values(gen, 2, 5, 3)
    with pytest.raises(cf.CdamInputError, match="v has token count"):
        ops._jsd_attention_train(p, v, 0.1, None, "reference", True)
    with pytest.raises(cf.CdamInputError, match="tau must be"):
        ops._jsd_attention_train(p, random_values(gen, 2, 6, 3), -1.0, None, "reference", True)
    with pytest.raises(cf.CdamInputError, match="mode must be"):
        ops._cdam_attention_train(p, random_values(gen, 2, 6, 3), 10.0, "fast", 0, "reference", True)
    bad = p.clone()
    bad[0, 0, 0] = -0.5
    with pytest.raises(cf.CdamInputError, match="p has negative entries"):
        ops._cdam_attention_train(bad, random_values(gen, 2, 6, 3), 10.0, "auto", 0, "reference", True)


def test_empty_inputs(gen):
    p = random_distributions(gen, 2, 0, 3)
    v = random_values(gen, 2, 0, 4)
    out, lse = lib.jsd_attention_train(p, v, 0.1, None, "reference", True)
    assert out.shape == (2, 0, 4) and lse.shape == (2, 0)
    q, vq = random_distributions(gen, 2, 0, 3), random_values(gen, 2, 0, 4)
    pl = random_distributions(gen, 2, 5, 3).requires_grad_(True)
    cf.jsd_attention(pl, vq, q=q, backend="reference").sum().backward()
    assert pl.grad.shape == pl.shape and (pl.grad == 0).all()


# ---------------------------------------------------------------------------------------------
# cdam_attention: the row max / min of J and how many keys attain them.

def _extremes64(p):
    """[4, B, N] hi, lo, nhi, nlo of J(p, p) in float64, written out here."""
    j = ref.pairwise_jsd(p.double())
    hi, lo = j.amax(-1), j.amin(-1)
    return torch.stack([hi, lo, (j == hi[..., None]).sum(-1).double(), (j == lo[..., None]).sum(-1).double()])


def _tied_rows(gen):
    """Rows 3, 8, 11 duplicate a peaked row: bitwise-equal divergences in every precision, so
    they tie at the row maximum of most rows (as in test_autograd's tie test)."""
    p = random_distributions(gen, 2, 13, 4, dtype=F64, sharpness=1.0, zeros=False, one_hot=False)
    p[:, 3] = p[:, 8] = p[:, 11] = torch.tensor([0.94, 0.02, 0.02, 0.02], dtype=F64)
    return p.float()


@pytest.mark.parametrize("mode", ["materialize", "recompute"])
def test_saved_row_extremes(backend, gen, mode):
    """Triton's training forward returns hi / lo near float64's and exactly its tie counts (the
    duplicated rows tie at most rows' maxima in every precision; their own minima are not compared:
    J between two identical rows is 0 in float64 but may be a rounding residue ~4e-8 in float32,
    leaving the diagonal alone at the minimum); the other backends declare none and return zeros."""
    name, dev = backend
    p = _tied_rows(gen)
    v = random_values(gen, 2, 13, 5)
    out, stats = lib.cdam_attention_train(p.to(dev), v.to(dev), 10.0, mode, cf.DEFAULT_MEMORY_BUDGET, name, True)
    assert stats.shape == (4, 2, 13) and stats.dtype == torch.float32 and stats.is_contiguous()
    assert torch.equal(out, lib.cdam_attention(p.to(dev), v.to(dev), 10.0, mode, cf.DEFAULT_MEMORY_BUDGET, name, True))
    assert ("cdam_attention" in dispatch.backend(name).saved_stats) == (name == "triton")
    if name != "triton":
        assert (stats == 0).all()
        return
    expected = _extremes64(p)
    assert (expected[2] >= 2).sum() >= 5  # the case really has ties
    assert (stats[:2].double().cpu() - expected[:2]).abs().max().item() <= 5e-7  # measured: 1.1e-7 nats
    assert torch.equal(stats[2].double().cpu(), expected[2])
    others = [i for i in range(13) if i not in (3, 8, 11)]
    assert torch.equal(stats[3, :, others].double().cpu(), expected[3, :, others])
    dup = stats[3, :, [3, 8, 11]]
    assert ((dup == 1) | (dup == 3)).all()  # the diagonal alone, or with the two duplicates


@pytest.mark.parametrize("mode", ["materialize", "recompute"])
def test_saved_row_extremes_are_bitwise_the_backward_pass(backend, gen, mode):
    """The backward finds its tie positions by comparing its recomputed J with hi / lo, so the
    saved statistics must be bit for bit those of its own first pass, in both forward modes."""
    from cdam_fast.kernels import cdam_backward

    dev = _triton_device(backend)
    for p in (_tied_rows(gen), random_distributions(gen, 2, 21, 5),
              random_distributions(gen, 1, 18, 3, dtype=torch.float16)):
        v = random_values(gen, *p.shape[:2], 3)
        _, stats = lib.cdam_attention_train(p.to(dev), v.to(dev), 10.0, mode, cf.DEFAULT_MEMORY_BUDGET, "triton", True)
        assert torch.equal(stats, cdam_backward.row_statistics(p.to(dev)))


def test_triton_cdam_backward_reuses_the_saved_statistics(backend, gen, monkeypatch):
    """Through the public wrapper the Triton backward skips its row-statistics pass (three passes
    over the tiles instead of four); the public op called directly runs it. Both give the
    float64 reference's gradients, ties included."""
    from cdam_fast.kernels import cdam_backward

    dev = _triton_device(backend)
    first = _count(monkeypatch, cdam_backward, "cdam_row_stats_kernel")
    sums = _count(monkeypatch, cdam_backward, "cdam_grad_sums_kernel")
    p = _tied_rows(gen)
    v, g = random_values(gen, 2, 13, 5), random_values(gen, 2, 13, 5)
    expected = cdam_home.cdam_attention_backward(g.double(), p.double(), v.double(), 10.0)
    leaves = [p.to(dev).requires_grad_(True), v.to(dev).requires_grad_(True)]
    budget = cf.DEFAULT_MEMORY_BUDGET
    got = []
    for mode in ("materialize", "recompute"):
        got.append(torch.autograd.grad(cf.cdam_attention(*leaves, mode=mode, backend="triton"), leaves, g.to(dev)))
    assert len(first.calls) == 0 and len(sums.calls) == 2
    direct = ops.cdam_attention(*leaves, 10.0, "auto", budget, "triton", True)
    got.append(torch.autograd.grad(direct, leaves, g.to(dev)))
    assert len(first.calls) == 1 and len(sums.calls) == 3
    for grads in got:
        for i, (a, e) in enumerate(zip(grads, expected)):
            err = (a.double().cpu() - e).abs().max().item()
            assert err <= 2e-5 * e.abs().max().item(), f"gradient {i} off by {err:.3g}"


def test_inference_cdam_forward_does_not_count_ties(backend, gen, monkeypatch):
    from cdam_fast.kernels import cdam

    dev = _triton_device(backend)
    first = _count(monkeypatch, cdam, "row_stats_kernel")
    p, v = random_distributions(gen, 1, 9, 3).to(dev), random_values(gen, 1, 9, 4).to(dev)
    out = cf.cdam_attention(p, v, backend="triton")
    with torch.no_grad():
        cf.cdam_attention(p.requires_grad_(True), v, backend="triton")
    cf.multiscale_cdam_attention(random_values(gen, 1, 3, 3, 3).to(dev), v, (1.0, 0.5), backend="triton")
    assert [c["COUNT_TIES"] for c in first.calls] == [False, False, False]
    out_g = cf.cdam_attention(p, v, backend="triton")
    assert first.calls[-1]["COUNT_TIES"] is True and torch.equal(out_g.detach(), out)


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile.

@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_train_ops_opcheck(gen, name):
    """Both training ops, on a backend that saves the statistics (reference: jsd_attention) and
    on ones that do not (zeros then, so the checks hold there too)."""
    from conftest import usable_backend

    usable_backend(name)
    p, q = random_distributions(gen, 2, 6, 4), random_distributions(gen, 2, 5, 4)
    v, vq = random_values(gen, 2, 6, 3), random_values(gen, 2, 5, 3)
    budget = cf.DEFAULT_MEMORY_BUDGET
    for op, args in ((ops._jsd_attention_train.default, (p, vq, 0.1, q, name, True)),
                     (ops._jsd_attention_train.default, (p, v, 0.1, None, name, True)),
                     (ops._cdam_attention_train.default, (p, v, 10.0, "auto", budget, name, True))):
        args = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


def test_train_op_opcheck_triton(backend, gen):
    """The Triton training ops (which compute the statistics) under opcheck."""
    dev = _triton_device(backend)
    p, v = random_distributions(gen, 1, 7, 3).to(dev), random_values(gen, 1, 7, 2).to(dev)
    for op, args in ((ops._jsd_attention_train.default, (p, v, 0.1, None, "triton", True)),
                     (ops._cdam_attention_train.default, (p, v, 10.0, "recompute", 0, "triton", True))):
        args = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


def test_train_ops_under_compile(gen, monkeypatch):
    """torch.compile(fullgraph=True) of a loss through the public wrappers takes the training ops
    (the saved statistics reach the backward) and gives eager's gradients."""
    calls = []
    real = ReferenceBackend.forward

    def forward(self, op, call, train=False):
        if op == "jsd_attention" and train:
            calls.append(1)
        return real(self, op, call, train)
    monkeypatch.setattr(ReferenceBackend, "forward", forward)
    p = random_distributions(gen, 2, 9, 4).requires_grad_(True)
    v = random_values(gen, 2, 9, 3).requires_grad_(True)
    q = random_distributions(gen, 2, 7, 4).requires_grad_(True)
    vq = random_values(gen, 2, 7, 3).requires_grad_(True)

    def loss(p, v, q, vq):
        return (cf.jsd_attention(p, v, backend="reference").square().sum()
                + cf.jsd_attention(p, vq, 0.3, q=q, backend="reference").sum()
                + cf.cdam_attention(p, v, backend="reference").sum())

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = (p, v, q, vq)
    graph_ops = []

    def record(gm, example_inputs):
        graph_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch.compile(loss, fullgraph=True, backend=record)(*leaves)
    calls.clear()
    got = torch.autograd.grad(compiled(*leaves), leaves)
    assert len(calls) == 2
    assert sum("_jsd_attention_train" in t for t in graph_ops) == 2
    assert sum("_cdam_attention_train" in t for t in graph_ops) == 1
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want):
        assert torch.allclose(a, b)
