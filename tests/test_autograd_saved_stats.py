"""The training forward of jsd_attention saves the row log-sum-exp for the backward
(FlashAttention-2 style, docs/autograd.md section 4): the private op cdam_fast::_jsd_attention_train,
what it returns per backend, that the Triton backward then skips its LSE pass, that inference
calls never compute it, and the op under opcheck and torch.compile."""
import math

import pytest
import torch

import cdam_fast as cf
from cdam_fast import _library as lib
from cdam_fast import reference as ref
from cdam_fast.autograd import reference as bref
from cdam_fast.backends import reference_backend, triton_backend
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
    (base 2, float32 [B, N]; Triton and the reference compute it) or NaN (not saved: the CPU and
    CUDA C++ forwards do not, and their backwards do not need it)."""
    name, dev = backend
    p, q = random_distributions(gen, 2, 19, 5), random_distributions(gen, 2, 23, 5)
    v = random_values(gen, 2, 23 if with_q else 19, 6)
    kq = q.to(dev) if with_q else None
    out, lse = lib.jsd_attention_train(p.to(dev), v.to(dev), 0.2, kq, name, True)
    assert lse.shape == (2, 19) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert torch.equal(out, lib.jsd_attention(p.to(dev), v.to(dev), 0.2, kq, name, True))
    if name in ("triton", "reference"):
        expected = _lse64(p, 0.2, q if with_q else None)
        assert (lse.double().cpu() - expected).abs().max().item() <= 4e-6 * expected.abs().max().item()
    else:
        assert torch.isnan(lse).all()


def test_reference_saves_float64_lse_as_float32(gen):
    p = random_distributions(gen, 2, 7, 4, dtype=F64)
    v = random_values(gen, 2, 7, 3, dtype=F64)
    out, lse = lib.jsd_attention_train(p, v, 0.3, None, "reference", True)
    assert out.dtype == F64 and lse.dtype == torch.float32
    assert torch.allclose(lse.double(), _lse64(p, 0.3), rtol=1e-6, atol=0)


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
    expected = bref.jsd_attention_backward(g.double(), p.double(), v.double(), None if keys is None else keys.double(),
                                           0.1)
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
    """NaN lse (a forward that does not compute it) or None: the backward runs its own LSE pass
    and the gradients are those of a saved lse."""
    from cdam_fast.kernels import jsd_backward

    dev = _triton_device(backend)
    lse_pass = _count(monkeypatch, jsd_backward, "jsd_attention_lse_kernel")
    p, v, g = random_distributions(gen, 1, 17, 4), random_values(gen, 1, 17, 5), random_values(gen, 1, 17, 5)
    p, v, g = p.to(dev), v.to(dev), g.to(dev)
    out, lse = lib.jsd_attention_train(p, v, 0.1, None, "triton", True)
    results = [ops.jsd_attention_backward(g, p, v, None, out, 0.1, "triton", x)
               for x in (lse, torch.full_like(lse, math.nan), None)]
    assert len(lse_pass.calls) == 2
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
    monkeypatch.setattr(triton_backend, "jsd_attention_train",
                        lambda *a: trained.append(1) or kernel_module.jsd_attention(*a, with_lse=True))
    p, v = random_distributions(gen, 1, 9, 3).to(dev), random_values(gen, 1, 9, 4).to(dev)
    out = cf.jsd_attention(p, v, backend="triton")
    with torch.no_grad():
        out_ng = cf.jsd_attention(p, v.requires_grad_(True), backend="triton")
    assert isinstance(out, torch.Tensor) and not out_ng.requires_grad
    assert [c["WRITE_LSE"] for c in forward.calls] == [False, False] and not trained
    out_g = cf.jsd_attention(p, v, backend="triton")
    assert forward.calls[-1]["WRITE_LSE"] is True and trained == [1]
    assert out_g.requires_grad and torch.equal(out_g.detach(), out)


def test_empty_inputs(gen):
    p = random_distributions(gen, 2, 0, 3)
    v = random_values(gen, 2, 0, 4)
    out, lse = lib.jsd_attention_train(p, v, 0.1, None, "reference", True)
    assert out.shape == (2, 0, 4) and lse.shape == (2, 0)
    q, vq = random_distributions(gen, 2, 0, 3), random_values(gen, 2, 0, 4)
    pl = random_distributions(gen, 2, 5, 3).requires_grad_(True)
    cf.jsd_attention(pl, vq, q=q, backend="reference").sum().backward()
    assert pl.grad.shape == pl.shape and (pl.grad == 0).all()


def test_train_op_opcheck(gen):
    p, q = random_distributions(gen, 2, 6, 4), random_distributions(gen, 2, 5, 4)
    v, vq = random_values(gen, 2, 6, 3), random_values(gen, 2, 5, 3)
    for args in ((p, vq, 0.1, q, "reference", True), (p, v, 0.1, None, "reference", True)):
        args = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(ops._jsd_attention_train.default, args)


def test_train_op_under_compile(gen, monkeypatch):
    """torch.compile(fullgraph=True) of a loss through the public wrapper takes the training op
    (the saved lse reaches the backward) and gives eager's gradients."""
    calls = []
    real = reference_backend.jsd_attention_train
    monkeypatch.setattr(reference_backend, "jsd_attention_train", lambda *a: calls.append(1) or real(*a))
    p = random_distributions(gen, 2, 9, 4).requires_grad_(True)
    v = random_values(gen, 2, 9, 3).requires_grad_(True)
    q = random_distributions(gen, 2, 7, 4).requires_grad_(True)
    vq = random_values(gen, 2, 7, 3).requires_grad_(True)

    def loss(p, v, q, vq):
        return (cf.jsd_attention(p, v, backend="reference").square().sum()
                + cf.jsd_attention(p, vq, 0.3, q=q, backend="reference").sum())

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = (p, v, q, vq)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    assert len(calls) == 2
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want):
        assert torch.allclose(a, b)
