"""pytest-benchmark set-up for `pytest benchmarks/ --benchmark-only` (or --benchmark-disable
for a one-call smoke run).

Sizes: CDAM_BENCH_SIZES="784,4096" (patch counts, squares for the multi-scale ops); default
64,196 on CPU and 784,4096 on GPU. Inputs rotate between calls like in `cdam-fast bench`.
"""
import os

import pytest
import torch

from cdam_fast.benchmarks.impls import usable_backends
from cdam_fast.benchmarks.inputs import make_input_sets

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sizes():
    text = os.environ.get("CDAM_BENCH_SIZES")
    if not text:
        return (784, 4096) if DEVICE.type == "cuda" else (64, 196)
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise pytest.UsageError(f"CDAM_BENCH_SIZES must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise pytest.UsageError(f"CDAM_BENCH_SIZES must list positive patch counts, got {text!r}")
    return sizes


SIZES = _sizes()
# The fast backends usable here, plus the reference (the chunked torch baseline).
BACKENDS = tuple(name for name, why in usable_backends(DEVICE).items() if why is None) + ("reference",)


@pytest.fixture
def run_rotated(benchmark):
    """run_rotated(fn, case): benchmark fn(inputs) over rotating input sets of `case`."""

    def run(fn, case):
        sets = make_input_sets(case, DEVICE)
        state = {"k": 0}

        def call():
            out = fn(sets[state["k"] % len(sets)])
            state["k"] += 1
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            return out

        call()  # compilation / autotuning stays out of the measurement
        return benchmark(call)

    return run
