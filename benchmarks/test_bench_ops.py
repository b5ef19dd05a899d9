"""Every op on every backend usable here (and the reference) at a few sizes."""
import pytest

from cdam_fast.benchmarks.cases import ATTENTION_OPS, OPS, PAPER_C, Case
from cdam_fast.benchmarks.impls import op_callable

from .conftest import BACKENDS, SIZES


@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, run_rotated, op, backend, N):
    case = Case(op, N=N, C=PAPER_C, D=64 if op in ATTENTION_OPS else 0)
    benchmark.group = case.label()
    out = run_rotated(op_callable(op, backend, None), case)
    assert out.shape[-2] == N
