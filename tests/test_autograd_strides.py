"""Backward of every op on non-contiguous inputs: torch.compile(fullgraph=True) gradients equal
eager's, and the backward ops' fakes agree with the real ops on strides (gradients are always
contiguous, cdam_fast/autograd/backward_ops.py). The compile backend is aot_eager's crossref variant,
which checks every op's fake output metadata (strides included) against the real output, as
inductor does, without inductor's C++ compile."""
import pytest
import torch

import cdam_fast as cf
from conftest import random_distributions, random_similarities, random_values

ops = torch.ops.cdam_fast
COMPILE_BACKEND = "aot_eager_decomp_partition_crossref"


def _strided(t: torch.Tensor, dims=(-1, -2)) -> torch.Tensor:
    """The same values, laid out with the two given dims swapped in memory (non-contiguous)."""
    out = t.transpose(*dims).contiguous().transpose(*dims)
    assert not out.is_contiguous()
    return out


def _inputs(gen, B=2, N=7, C=4, D=3):
    return {
        "p": _strided(random_distributions(gen, B, N, C)),
        "pc": _strided(random_distributions(gen, B, N, C, one_hot=False)),  # no J ties (test_autograd.py)
        "q": _strided(random_distributions(gen, B, N - 2, C)),
        "v": _strided(random_values(gen, B, N, D)),
        "vq": _strided(random_values(gen, B, N - 2, D)),
        "sim": _strided(random_similarities(gen, B, C, 3, 4), (2, 3)),
        "vs": _strided(random_values(gen, B, 12, D)),
    }


def _loss(b):
    def loss(p, pc, q, v, vq, sim, vs):
        outs = [
            cf.pairwise_jsd(p, backend=b), cf.pairwise_jsd(p, q, backend=b),
            cf.cdam_map(pc, backend=b),
            cf.cdam_attention(pc, v, mode="materialize", backend=b),
            cf.cdam_attention(pc, v, mode="recompute", backend=b),
            cf.multiscale_cdam_map(sim, (1.0, 0.5), backend=b),
            cf.multiscale_cdam_attention(sim, vs, (1.0, 0.5), backend=b),
            cf.jsd_attention(p, v, backend=b), cf.jsd_attention(p, vq, q=q, backend=b),
        ]
        return sum(o.square().sum() for o in outs)
    return loss


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]  # clone keeps the strides
    fn(*leaves).backward()
    return [t.grad for t in leaves]


def test_compiled_backward_on_noncontiguous_inputs_matches_eager(backend, gen):
    name, dev = backend
    inputs = [t.to(dev) for t in _inputs(gen).values()]
    assert not any(t.is_contiguous() for t in inputs)
    torch._dynamo.reset()
    compiled = _grads(torch.compile(_loss(name), fullgraph=True, backend=COMPILE_BACKEND), inputs)
    eager = _grads(_loss(name), inputs)
    eager_contiguous = _grads(_loss(name), [t.contiguous() for t in inputs])
    for i, (c, e, ec) in enumerate(zip(compiled, eager, eager_contiguous)):
        assert torch.isfinite(e).all() and e.abs().max() > 0, f"{name}: gradient {i} is degenerate"
        torch.testing.assert_close(e, ec, msg=f"{name}: gradient {i} depends on the input's strides")
        torch.testing.assert_close(c, e, msg=f"{name}: compiled gradient {i} differs from eager")


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_opcheck_backward_ops_on_noncontiguous_inputs(name, gen):
    from conftest import usable_backend

    usable_backend(name)
    x = _inputs(gen)
    p, pc, q, v, vq, sim, vs = x.values()
    B, N, M = p.shape[0], p.shape[1], q.shape[1]
    g = lambda *shape: _strided(torch.randn(*shape, generator=gen))  # noqa: E731
    budget = cf.DEFAULT_MEMORY_BUDGET
    # (grad, the forward's arguments, backend, validate, needs, saved statistics)
    cases = [
        (ops.pairwise_jsd_backward.default, (g(B, N, N), p, None, name, True, [True, False], None)),
        (ops.pairwise_jsd_backward.default, (g(B, N, M), p, q, name, True, [True, True], None)),
        (ops.cdam_map_backward.default, (g(B, N, N), pc, 10.0, name, True, [True], None)),
        (ops.cdam_attention_backward.default, (g(B, N, v.shape[2]), pc, v, 10.0, "auto", budget, name, True,
                                               [True, True], None)),
        (ops.cdam_attention_backward.default, (g(B, N, v.shape[2]), pc, v, 10.0, "auto", budget, name, False,
                                               [False, True], None)),
        (ops.multiscale_cdam_map_backward.default, (g(B, 12, 12), sim, [1.0, 0.5], 0.1, 10.0, name, True, [True],
                                                    None)),
        (ops.multiscale_cdam_attention_backward.default, (g(B, 12, vs.shape[2]), sim, vs, [1.0, 0.5], 0.1, 10.0,
                                                          "auto", budget, name, True, [True, True], None)),
        (ops.jsd_attention_backward.default, (g(B, N, vq.shape[2]), p, vq, 0.1, q, name, True, [True, True, True],
                                              None)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
