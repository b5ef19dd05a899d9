"""The baselines beside the backends: published order, torch.compile, KeOps.

torch.compile and KeOps compile per shape (tens of seconds each on CPU): on CPU they run
only with CDAM_BENCH_COMPILE=1.
"""
import os

import pytest

from cdam_fast.benchmarks import keops_baseline
from cdam_fast.benchmarks.cases import ATTENTION_OPS, OPS, PAPER_C, Case
from cdam_fast.benchmarks.impls import op_callable

from .conftest import DEVICE, SIZES

SLOW_TO_COMPILE = DEVICE.type == "cpu" and os.environ.get("CDAM_BENCH_COMPILE") != "1"


@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("baseline", ("published", "compile", "keops"))
@pytest.mark.parametrize("op", OPS)
def test_baseline(benchmark, run_rotated, op, baseline, N):
    if baseline == "keops":
        why = keops_baseline.unavailable_reason(op)
        if why:
            pytest.skip(why)
    if baseline in ("compile", "keops") and SLOW_TO_COMPILE:
        pytest.skip(f"{baseline} compiles per shape, tens of seconds on CPU; set CDAM_BENCH_COMPILE=1")
    case = Case(op, N=N, C=PAPER_C, D=64 if op in ATTENTION_OPS else 0)
    benchmark.group = case.label()
    out = run_rotated(op_callable(op, baseline, None), case)
    assert out.shape[-2] == N
