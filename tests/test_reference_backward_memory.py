"""The reference backward formulas keep their memory bounded: the min-max / expm1 adjoint runs
block of rows by block of rows (same result, bit for bit, as the whole-map evaluation), and the
reference cdam_attention backward follows the forward's mode / memory_budget blocks."""
import pytest
import torch

import cdam_fast as cf
from cdam_fast import reference
from cdam_fast.opdefs import cdam as aref
from cdam_fast.opdefs import pairwise_jsd as jsd_home
from conftest import random_distributions, random_values

F64 = torch.float64


def _maps_with_ties(gen, dtype):
    """[B, N, N] divergence-like maps with repeated row max / min values, constant rows and zeros."""
    j = reference.pairwise_jsd(random_distributions(gen, 2, 11, 4, dtype=F64)).to(dtype)
    j[0, 3] = 0.25  # a constant row (span 0)
    j[0, 4, 1:3] = j[0, 4].amax()  # ties at the row maximum
    j[1, 5, 6:9] = j[1, 5].amin()  # ties at the row minimum (besides the diagonal zero)
    j[1, 2] = torch.round(j[1, 2] * 8) / 8  # many ties at once
    return j


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("alpha", [10.0, 1e4])
def test_rowwise_adjoint_is_the_whole_map_one_bit_for_bit(gen, monkeypatch, dtype, alpha):
    j = _maps_with_ties(gen, dtype)
    ga = torch.randn(j.shape, generator=gen, dtype=F64).to(dtype)
    whole = aref._minmax_expm1_vjp_rows(j.double(), ga.double(), alpha)
    want_grad = whole.masked_fill(j.double() == 0, 0.0)
    seen = []
    real = aref._minmax_expm1_vjp_rows
    monkeypatch.setattr(aref, "_minmax_expm1_vjp_rows", lambda a, b, c: seen.append(a.shape[0]) or real(a, b, c))
    monkeypatch.setattr(jsd_home, "_CHUNK_ELEMENTS", 3 * aref.TEMPS_PER_PAIR * j.shape[-1])  # 3-row blocks
    got = aref.minmax_expm1_vjp(j, ga, alpha)
    assert max(seen) == 3 and sum(seen) == j.shape[0] * j.shape[1]
    assert got.dtype == F64 and torch.equal(got, whole)
    assert torch.equal(aref.divergence_grad(j, ga, alpha), want_grad)
    assert torch.isfinite(got).all() and (got[0, 3] == 0).all()  # the constant row passes nothing
    ones = torch.ones((), dtype=dtype).expand(j.shape)  # the broadcast gradient of .sum()
    assert torch.equal(aref.minmax_expm1_vjp(j, ones, alpha), real(j.double(), ones.double(), alpha))


@pytest.fixture
def adjoint_rows(monkeypatch):
    """Row counts of every block the min-max / expm1 adjoint sees, and the whole-map calls."""
    seen = {"rows": [], "whole": 0}
    real_rows, real_jsd = aref._minmax_expm1_vjp_rows, jsd_home.pairwise_jsd
    monkeypatch.setattr(aref, "_minmax_expm1_vjp_rows",
                        lambda j, g, a: seen["rows"].append(j.shape[0]) or real_rows(j, g, a))

    def jsd(p, q=None):
        seen["whole"] += q is None and p.shape[1] > 1
        return real_jsd(p, q)
    monkeypatch.setattr(jsd_home, "pairwise_jsd", jsd)
    return seen


@pytest.mark.parametrize("budget,rows", [(0, 1), (aref.TEMPS_PER_PAIR * 13 * 8 * 4, 4)])
def test_cdam_attention_backward_recompute_is_blockwise(gen, adjoint_rows, budget, rows):
    p, v = random_distributions(gen, 2, 13, 5, dtype=F64), random_values(gen, 2, 13, 3, dtype=F64)
    p[1, 7] = p[1, 2]  # identical rows: J = 0 off the diagonal
    g = random_values(gen, 2, 13, 3, dtype=F64)
    want_p, want_v = aref.cdam_attention_backward(g, p, v, 10.0)  # the whole-map formulas
    adjoint_rows["rows"].clear()
    adjoint_rows["whole"] = 0
    leaf_p, leaf_v = p.clone().requires_grad_(True), v.clone().requires_grad_(True)
    out = cf.cdam_attention(leaf_p, leaf_v, mode="recompute", memory_budget=budget, backend="reference")
    out.backward(g)
    assert adjoint_rows["whole"] == 0 and max(adjoint_rows["rows"]) == rows
    torch.testing.assert_close(leaf_p.grad, want_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(leaf_v.grad, want_v, rtol=1e-13, atol=1e-13)


def test_cdam_attention_backward_blocks_use_the_forwards_rows(gen, monkeypatch):
    """J's rows in the backward are the forward's, bit for bit (so are its row max / min ties):
    with alpha large, a tie broken differently would move G by alpha / span."""
    p, v = random_distributions(gen, 1, 12, 4), random_values(gen, 1, 12, 3)
    seen = []
    real = aref.self_rows
    monkeypatch.setattr(aref, "self_rows", lambda pb, i0, i1: seen.append((i0, i1, real(pb, i0, i1))) or seen[-1][2])
    leaf = p.clone().requires_grad_(True)
    cf.cdam_attention(leaf, v, alpha=1e3, mode="recompute", memory_budget=aref.TEMPS_PER_PAIR * 12 * 4 * 5,
                      backend="reference").sum().backward()
    fwd, bwd = seen[:len(seen) // 2], seen[len(seen) // 2:]
    assert [s[:2] for s in fwd] == [s[:2] for s in bwd] == [(0, 5), (5, 10), (10, 12)]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(fwd, bwd))
    assert torch.isfinite(leaf.grad).all()


def test_cdam_attention_backward_blocks_promote_like_the_forward(gen, monkeypatch):
    """float32 p with float64 v computes in float64 (the dtype rule): the backward's row blocks
    are the forward's (sized for float64 values) and its J is float64, so the gradients are the
    whole-map float64 ones up to the rounding of the float32 p gradient (J in float32 gave
    errors ~1e-6 relative; a float32-sized block count, other blocks than the forward's)."""
    p = random_distributions(gen, 2, 12, 4, dtype=F64, zeros=False, one_hot=False).float()
    v, g = random_values(gen, 2, 12, 3, dtype=F64), random_values(gen, 2, 12, 3, dtype=F64)
    want_p, want_v = aref.cdam_attention_backward(g, p.double(), v, 10.0)
    seen = []
    real = aref.self_rows
    monkeypatch.setattr(aref, "self_rows", lambda pb, i0, i1: seen.append((i0, i1, pb.dtype)) or real(pb, i0, i1))
    leaf_p, leaf_v = p.clone().requires_grad_(True), v.clone().requires_grad_(True)
    budget = aref.TEMPS_PER_PAIR * 12 * 8 * 5  # 5 float64 rows per block (10 if sized for float32)
    cf.cdam_attention(leaf_p, leaf_v, mode="recompute", memory_budget=budget, backend="reference").backward(g)
    fwd, bwd = seen[:len(seen) // 2], seen[len(seen) // 2:]
    assert fwd == bwd and {s[:2] for s in bwd} == {(0, 5), (5, 10), (10, 12)} and {s[2] for s in bwd} == {F64}
    torch.testing.assert_close(leaf_p.grad, want_p.float(), rtol=2 ** -23, atol=0)
    torch.testing.assert_close(leaf_v.grad, want_v, rtol=1e-13, atol=1e-13)
