"""The reference backend honours mode and memory_budget: beyond the budget it evaluates bounded
blocks of query rows (never whole N x N temporaries) and gives the definition's result."""
import pytest
import torch

import cdam_fast as cf
from cdam_fast import reference
from cdam_fast.opdefs import cdam as cdam_home
from cdam_fast.opdefs import multiscale as multiscale_home
from conftest import random_distributions, random_similarities, random_values

F64 = torch.float64
TEMPS_PER_PAIR = cdam_home.TEMPS_PER_PAIR


@pytest.fixture
def block_shapes(monkeypatch):
    """Shapes of every divergence block the transform sees, and whether the whole-map path ran
    (patched where the op homes' bounded references look them up)."""
    seen = {"blocks": [], "whole": 0}
    real = cdam_home.minmax_expm1
    spy = lambda j, alpha: seen["blocks"].append(tuple(j.shape)) or real(j, alpha)  # noqa: E731
    for home in (cdam_home, multiscale_home):
        monkeypatch.setattr(home, "minmax_expm1", spy)
    for home, name in ((cdam_home, "cdam_attention"), (multiscale_home, "multiscale_cdam_attention")):
        whole = getattr(home, name)
        monkeypatch.setattr(home, name, lambda *a, _w=whole, **k: seen.__setitem__("whole", seen["whole"] + 1) or _w(*a, **k))
    return seen


@pytest.mark.parametrize("budget,rows", [(0, 1), (TEMPS_PER_PAIR * 13 * 8 * 4, 4)])
def test_cdam_attention_recompute_is_blockwise_and_exact(gen, block_shapes, budget, rows):
    p, v = random_distributions(gen, 2, 13, 5, dtype=F64), random_values(gen, 2, 13, 3, dtype=F64)
    want = reference.cdam_attention(p, v, 10.0)
    block_shapes["blocks"].clear()
    block_shapes["whole"] = 0
    got = cf.cdam_attention(p, v, mode="recompute", memory_budget=budget, backend="reference")
    assert block_shapes["whole"] == 0
    assert block_shapes["blocks"] and max(b[-2] for b in block_shapes["blocks"]) == rows
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_auto_over_budget_also_bounds_memory(gen, block_shapes):
    p, v = random_distributions(gen, 1, 10, 4, dtype=F64), random_values(gen, 1, 10, 2, dtype=F64)
    cf.cdam_attention(p, v, memory_budget=100, backend="reference")
    assert block_shapes["whole"] == 0 and max(b[-2] for b in block_shapes["blocks"]) == 1
    block_shapes["blocks"].clear()
    cf.cdam_attention(p, v, mode="materialize", memory_budget=0, backend="reference")
    assert block_shapes["whole"] == 1  # an explicit materialize evaluates the whole map


@pytest.mark.parametrize("budget", [0, TEMPS_PER_PAIR * 42 * 8 * 5])
def test_multiscale_recompute_is_blockwise_and_exact(gen, block_shapes, budget):
    sim, v = random_similarities(gen, 2, 5, 7, 6, dtype=F64), random_values(gen, 2, 42, 3, dtype=F64)
    scales = (1.0, 0.5, 0.75, 0.25)
    want = reference.multiscale_cdam_attention(sim, v, scales, 0.1, 10.0)
    block_shapes["blocks"].clear()
    block_shapes["whole"] = 0
    got = cf.multiscale_cdam_attention(sim, v, scales, mode="recompute", memory_budget=budget, backend="reference")
    assert block_shapes["whole"] == 0
    assert max(b[-2] for b in block_shapes["blocks"]) == max(1, budget // (TEMPS_PER_PAIR * 42 * 8))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_float32_blocks_match_the_float32_definition(gen):
    p, v = random_distributions(gen, 2, 9, 5), random_values(gen, 2, 9, 3)
    got = cf.cdam_attention(p, v, mode="recompute", memory_budget=0, backend="reference")
    torch.testing.assert_close(got, reference.cdam_attention(p, v, 10.0), rtol=0, atol=1e-5)
