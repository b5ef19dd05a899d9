"""The ops compute in the precision their contract states (float32, or float64) inside
torch.autocast as outside it: forward and gradients are bit for bit the same on every backend
and mode (autocast used to reach the aten matmuls of the reference backend and of the CPU
materialize path only, so precision depended on the backend, N and the memory budget)."""
import pytest
import torch

import cdam_fast as cf
from cdam_fast.opspec import OP_NAMES, OPS
from conftest import random_distributions, random_similarities, random_values

BUDGET = cf.DEFAULT_MEMORY_BUDGET
CASES = [(op, mode) for op in OP_NAMES for mode in (("materialize", "recompute") if OPS[op].has_mode else (None,))]


def _inputs(op, gen, dev):
    kw = OPS[op].example_args(B=2, N=6, C=4, D=3, M=5, grid=(2, 3),
                              distributions=lambda s: random_distributions(gen, *s, device=dev),
                              values=lambda s: random_values(gen, *s, device=dev),
                              similarities=lambda s: random_similarities(gen, *s, device=dev))
    return {k: t.requires_grad_(True) for k, t in kw.items()}


def _forward_and_grads(op, mode, backend, inputs, autocast):
    options = {"scales": (1.0, 0.5)} if OPS[op].multiscale else {}
    if mode is not None:
        options.update(mode=mode, memory_budget=BUDGET)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = getattr(cf, op)(**inputs, **options, backend=backend)
        g = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
        grads = torch.autograd.grad(out, list(inputs.values()), g)
    return (out, *grads)


@pytest.mark.parametrize("op,mode", CASES)
def test_autocast_does_not_change_results(backend, gen, op, mode):
    name, dev = backend
    inputs = _inputs(op, gen, dev)
    plain = _forward_and_grads(op, mode, name, inputs, autocast=False)
    cast = _forward_and_grads(op, mode, name, inputs, autocast=True)
    for what, a, b in zip(["output", *inputs], plain, cast):
        assert b.dtype == a.dtype and torch.equal(a, b), f"{name} {op} {mode}: {what} differs under autocast"


def test_autocast_inside_compiled_code(gen):
    """torch.compile of code calling an op inside autocast gives the eager result outside it."""
    p, v = random_distributions(gen, 2, 6, 4), random_values(gen, 2, 6, 3)

    def fn(p, v):
        with torch.autocast("cpu", torch.bfloat16):
            return cf.cdam_attention(p, v, mode="materialize", backend="reference") * 2.0

    expected = cf.cdam_attention(p, v, mode="materialize", backend="reference") * 2.0
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(p, v), expected)
