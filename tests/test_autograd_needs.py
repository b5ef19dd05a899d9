"""The backward computes only the gradients asked for (ctx.needs_input_grad): with only v
requiring grad, the attention ops' backward forms v's gradient alone (the same values as the
full backward's) and no p gradient, on every backend; and it reads the inputs' values for its
bad-element check only when the forward did not validate them (no host sync otherwise)."""
import pytest
import torch

import cdam_fast as cf
from conftest import random_distributions, random_similarities, random_values

ops = torch.ops.cdam_fast


@pytest.fixture(autouse=True)
def _small_interpreter_tiles(monkeypatch):
    monkeypatch.setenv("CDAM_FAST_INTERPRET_BLOCK", "16")


def _cases(gen):
    """op -> (forward(p-like, v, backend), p-like, v); N = 21 spans two 16-row tiles."""
    p, v = random_distributions(gen, 2, 21, 5), random_values(gen, 2, 21, 6)
    q, vq = random_distributions(gen, 2, 18, 5), random_values(gen, 2, 18, 6)
    sim, vs = random_similarities(gen, 1, 4, 3, 5), random_values(gen, 1, 15, 6)
    return {
        "cdam_attention": (lambda a, v, b: cf.cdam_attention(a, v, backend=b), p, v),
        "cdam_attention recompute": (lambda a, v, b: cf.cdam_attention(a, v, mode="recompute", memory_budget=0,
                                                                        backend=b), p, v),
        "jsd_attention": (lambda a, v, b: cf.jsd_attention(a, v, backend=b), p, v),
        "jsd_attention q": (lambda a, v, b: cf.jsd_attention(a, v, q=q, backend=b), p, vq),
        "multiscale_cdam_attention": (lambda a, v, b: cf.multiscale_cdam_attention(a, v, (1.0, 0.5), backend=b),
                                      sim, vs),
    }


CASES = list(_cases(torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("case", CASES)
def test_v_only_backward_gives_the_full_backwards_v_gradient(backend, gen, case):
    name, dev = backend
    fn, a, v = _cases(gen)[case]
    a, v = a.to(dev), v.to(dev)
    g = torch.randn(fn(a, v, "reference").shape, generator=gen).to(dev)
    leaf_a, leaf_v = a.clone().requires_grad_(True), v.clone().requires_grad_(True)
    fn(leaf_a, leaf_v, name).backward(g)
    full = leaf_v.grad
    only_v = v.clone().requires_grad_(True)
    fixed = a.clone()  # requires no gradient
    fn(fixed, only_v, name).backward(g)
    assert fixed.grad is None and leaf_a.grad is not None
    if name == "triton":  # its v-only jsd pass skips the weights' renormalisation by their own sum
        torch.testing.assert_close(only_v.grad, full, rtol=2e-6, atol=2e-6 * full.abs().max().item())
    else:  # the same weights and the same product
        assert torch.equal(only_v.grad, full), case


@pytest.mark.parametrize("op", ["cdam_attention", "jsd_attention"])
def test_backward_op_returns_no_p_gradient_when_not_needed(backend, gen, op):
    """The backward op itself: needs [False, True] gives an empty p entry and v's gradient."""
    name, dev = backend
    p, v, g = random_distributions(gen, 2, 9, 4).to(dev), random_values(gen, 2, 9, 3).to(dev), \
        random_values(gen, 2, 9, 3).to(dev)
    if op == "cdam_attention":
        args = (g, p, v, 10.0, "auto", cf.DEFAULT_MEMORY_BUDGET, name, True)
        full, only_v = (ops.cdam_attention_backward(*args, needs, None) for needs in ([True, True], [False, True]))
    else:
        args = (g, p, v, 0.1, None, name, True)
        full, only_v = (ops.jsd_attention_backward(*args, needs, None) for needs in ([True, True, False],
                                                                                     [False, True, False]))
    assert only_v[0].numel() == 0 and full[0].shape == p.shape
    torch.testing.assert_close(only_v[1], full[1], rtol=2e-6, atol=2e-6 * full[1].abs().max().item())


def _count_launches(monkeypatch, module, name):
    kernel, calls = getattr(module, name), []

    class Launch:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Launch())
    return calls


def test_triton_v_only_backward_is_one_pass(backend, gen, monkeypatch):
    """With the forward's statistics saved, the v-only Triton backward is one key-side pass."""
    name, dev = backend
    if name != "triton":
        pytest.skip("Triton-specific launch counts")
    from cdam_fast.kernels import cdam_backward, jsd_backward

    launched = {k: _count_launches(monkeypatch, m, k) for m, k in (
        (jsd_backward, "jsd_attention_lse_kernel"), (jsd_backward, "jsd_attention_grad_query_kernel"),
        (jsd_backward, "jsd_attention_grad_key_kernel"), (cdam_backward, "cdam_row_stats_kernel"),
        (cdam_backward, "cdam_grad_sums_kernel"), (cdam_backward, "cdam_grad_query_kernel"),
        (cdam_backward, "cdam_grad_key_kernel"))}
    p, v = random_distributions(gen, 1, 20, 4).to(dev), random_values(gen, 1, 20, 3).to(dev).requires_grad_(True)
    cf.jsd_attention(p, v, backend="triton").sum().backward()
    cf.cdam_attention(p, v, backend="triton").sum().backward()
    counts = {k: len(c) for k, c in launched.items()}
    assert counts == {"jsd_attention_lse_kernel": 0, "jsd_attention_grad_query_kernel": 0,
                      "jsd_attention_grad_key_kernel": 1, "cdam_row_stats_kernel": 0, "cdam_grad_sums_kernel": 0,
                      "cdam_grad_query_kernel": 0, "cdam_grad_key_kernel": 1}, counts
    assert launched["jsd_attention_grad_key_kernel"][0]["NEED_P"] is False
    assert launched["cdam_grad_key_kernel"][0]["NEED_P"] is False


@pytest.mark.parametrize("validate", [True, False])
def test_backward_checks_values_only_when_the_forward_did_not(gen, monkeypatch, validate):
    """validate=True: the forward checked p, the backward reads nothing for its bad-element
    check (no host sync); validate=False: one check of every input together per backward."""
    from cdam_fast.autograd import backward_ops

    calls = []
    real = backward_ops._bad_elements
    monkeypatch.setattr(backward_ops, "_bad_elements", lambda spec, call: calls.append(spec.name) or real(spec, call))
    p = random_distributions(gen, 2, 7, 3).requires_grad_(True)
    q = random_distributions(gen, 2, 5, 3).requires_grad_(True)
    v = random_values(gen, 2, 5, 2).requires_grad_(True)
    cf.jsd_attention(p, v, q=q, validate=validate).sum().backward()
    cf.pairwise_jsd(p, q, validate=validate).sum().backward()
    assert calls == ([] if validate else ["jsd_attention", "pairwise_jsd"])


def test_pairwise_jsd_without_the_q_gradient(backend, gen):
    """q not requiring grad: p's gradient as in the full backward, and no key-side work for q."""
    name, dev = backend
    p, q = random_distributions(gen, 2, 9, 4).to(dev), random_distributions(gen, 2, 7, 4).to(dev)
    g = torch.randn(2, 9, 7, generator=gen).to(dev)
    leaf_p, leaf_q = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
    cf.pairwise_jsd(leaf_p, leaf_q, backend=name).backward(g)
    only_p = p.clone().requires_grad_(True)
    fixed = q.clone()
    cf.pairwise_jsd(only_p, fixed, backend=name).backward(g)
    assert fixed.grad is None and leaf_q.grad is not None
    assert torch.equal(only_p.grad, leaf_p.grad)
