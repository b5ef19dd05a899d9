"""The CPU backward's per-task buffers (key-side class sums, and in the attention backward a
row's logs: C x Mp floats each, one set per concurrently running task) stay within the memory
policy's budget: at most min(threads, budget / per-task bytes) tasks, at least one
(csrc/cdam_cpu_backward.cpp, task_count). At 64 threads, C = 1000 and M = 16k they used to take
~4 GB each, whatever the budget. The extension reports the bytes it allocated
(last_buffer_bytes); the gradients are the same whatever the task count, up to the float32
rounding of the key-side sums (summed in another order). The fused backward of cdam_map and
the multi-scale ops (csrc/cdam_cpu_multiscale_backward.cpp) bounds its per-worker buffers the
same way."""
import pytest
import torch

import cdam_fast as cf
from cdam_fast import memory
from conftest import random_distributions, random_similarities, random_values, usable_backend

THREADS = 4
N, C, D = 40, 5, 3
MP = 64  # N padded to a multiple of the kernel's 32 lanes
F32 = 4


@pytest.fixture
def cpu_threads():
    usable_backend("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


def _buffer_bytes():
    from cdam_fast.backends import cpu_backward

    return cpu_backward.extension.module().last_buffer_bytes()


def _close_up_to_order(a, b):
    """float32 sums taken in another order: off by about the largest entry's rounding (up to 4.7e-7
    of it over 200 seeds)."""
    err, top = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= 2e-6 * top, f"off by {err:.3g}, largest entry {top:.3g}"


def _grads(fn, inputs, g):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, g)


@pytest.mark.parametrize("tasks", [1, 2, THREADS])
def test_cdam_attention_backward_buffers_follow_memory_budget(cpu_threads, gen, tasks):
    per_task = (2 * C + 3) * MP * F32  # key-side sums and a row's logs (C x Mp each), three Mp rows
    budget = tasks * per_task + per_task // 2
    p, v = random_distributions(gen, 1, N, C), random_values(gen, 1, N, D)
    g = random_values(gen, 1, N, D)
    fn = lambda b: lambda p, v: cf.cdam_attention(p, v, mode="recompute", memory_budget=b, backend="cpu")  # noqa: E731
    got = _grads(fn(budget), [p, v], g)
    assert _buffer_bytes() == tasks * per_task <= budget
    unbounded = _grads(fn(1 << 40), [p, v], g)
    assert _buffer_bytes() == THREADS * per_task
    _close_up_to_order(got[0], unbounded[0])
    assert torch.equal(got[1], unbounded[1])  # A^T g does not use the buffers


def test_a_zero_budget_still_runs_one_task(cpu_threads, gen):
    p, v = random_distributions(gen, 1, N, C), random_values(gen, 1, N, D)
    out = _grads(lambda p, v: cf.cdam_attention(p, v, mode="recompute", memory_budget=0, backend="cpu"), [p, v],
                 random_values(gen, 1, N, D))
    assert _buffer_bytes() == (2 * C + 3) * MP * F32 and all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("op", ["pairwise_jsd", "jsd_attention"])
def test_budget_from_the_environment(cpu_threads, gen, monkeypatch, op):
    """The ops without a memory_budget argument take the policy's default (CDAM_FAST_MEMORY_BUDGET)."""
    p, q, v = random_distributions(gen, 1, N, C), random_distributions(gen, 1, N, C), random_values(gen, 1, N, D)
    if op == "pairwise_jsd":
        fn, per_task = (lambda p, q: cf.pairwise_jsd(p, q, backend="cpu")), C * MP * F32
        g, inputs = torch.randn(1, N, N, generator=gen), [p, q]
    else:
        fn, per_task = (lambda p, q: cf.jsd_attention(p, v, q=q, backend="cpu")), (2 * C + 3) * MP * F32
        g, inputs = random_values(gen, 1, N, D), [p, q]
    unbounded = _grads(fn, inputs, g)
    assert _buffer_bytes() == THREADS * per_task
    monkeypatch.setenv(memory.BUDGET_ENV, str(per_task))
    got = _grads(fn, inputs, g)
    assert _buffer_bytes() == per_task
    for a, b in zip(got, unbounded):
        _close_up_to_order(a, b)


def _ms_buffer_bytes():
    from cdam_fast.backends import cpu_backward

    return cpu_backward.multiscale_extension.module().last_buffer_bytes()


H, W = 5, 8  # the full grid of the multi-scale cases: N = 40 tokens, keys padded to MP


@pytest.mark.parametrize("tasks", [1, 2, THREADS])
def test_multiscale_backward_buffers_follow_memory_budget(cpu_threads, gen, tasks):
    """Per worker: key-side sums and a row's logs (C x Mp each), three Mp rows, and the query-side
    adjoint of the smaller grid's source rows of a chunk (one chunk here: all n_s of them) x N."""
    from cdam_fast.grids import scale_grid

    hs, ws = scale_grid(H, W, 0.5)
    per_worker = (2 * C * MP + 3 * MP + hs * ws * H * W) * F32
    budget = tasks * per_worker + per_worker // 2
    sim, v, g = random_similarities(gen, 1, C, H, W), random_values(gen, 1, H * W, D), random_values(gen, 1, H * W, D)
    fn = lambda b: lambda s, v: cf.multiscale_cdam_attention(s, v, (1.0, 0.5), mode="recompute",  # noqa: E731
                                                             memory_budget=b, backend="cpu")
    got = _grads(fn(budget), [sim, v], g)
    assert _ms_buffer_bytes() == tasks * per_worker <= budget
    unbounded = _grads(fn(1 << 40), [sim, v], g)
    assert _ms_buffer_bytes() == THREADS * per_worker
    for a, b in zip(got, unbounded):
        _close_up_to_order(a, b)


def test_cdam_map_backward_buffers_follow_the_budget_from_the_environment(cpu_threads, gen, monkeypatch):
    """cdam_map has no memory_budget argument: its fused backward takes the policy's default."""
    per_worker = (2 * C * MP + 3 * MP) * F32
    p = random_distributions(gen, 1, N, C)
    g = torch.randn(1, N, N, generator=gen)
    unbounded = _grads(lambda p: cf.cdam_map(p, backend="cpu"), [p], g)
    assert _ms_buffer_bytes() == THREADS * per_worker
    monkeypatch.setenv(memory.BUDGET_ENV, str(per_worker))
    got = _grads(lambda p: cf.cdam_map(p, backend="cpu"), [p], g)
    assert _ms_buffer_bytes() == per_worker
    _close_up_to_order(got[0], unbounded[0])
