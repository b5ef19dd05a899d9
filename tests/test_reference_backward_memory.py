"""The reference backward formulas keep their memory bounded: the min-max / expm1 adjoint runs
block of rows by block of rows (same result, bit for bit, as the whole-map evaluation)."""
import pytest
import torch

from cdam_fast import reference
from cdam_fast.autograd import reference as aref
from conftest import random_distributions

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
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 3 * aref.TEMPS_PER_PAIR * j.shape[-1])  # 3-row blocks
    got = aref.minmax_expm1_vjp(j, ga, alpha)
    assert max(seen) == 3 and sum(seen) == j.shape[0] * j.shape[1]
    assert got.dtype == F64 and torch.equal(got, whole)
    assert torch.equal(aref.divergence_grad(j, ga, alpha), want_grad)
    assert torch.isfinite(got).all() and (got[0, 3] == 0).all()  # the constant row passes nothing
