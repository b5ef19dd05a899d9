"""The whole pipeline per image (random weights). Minutes on CPU: there it runs only with
CDAM_BENCH_PIPELINE=1."""
import os

import pytest

from cdam_fast.benchmarks import pipeline_bench
from cdam_fast.benchmarks.cases import PIPELINE, Case

from .conftest import BACKENDS, DEVICE


@pytest.mark.parametrize("impl", BACKENDS + ("published", pipeline_bench.NO_CDAM))
def test_pipeline_per_image(benchmark, impl):
    _, why = pipeline_bench.load_segmenter_class()
    if why:
        pytest.skip(why)
    if DEVICE.type == "cpu" and os.environ.get("CDAM_BENCH_PIPELINE") != "1":
        pytest.skip("a ViT-B-16 pass per window takes seconds on CPU; set CDAM_BENCH_PIPELINE=1")
    case = Case(PIPELINE, C=21, image=(480, 640))
    predict = pipeline_bench.build(case, impl, DEVICE, "ViT-B-16")
    images = pipeline_bench.random_images(case, 2)
    state = {"k": 0}

    def call():
        out = predict(images[state["k"] % 2])
        state["k"] += 1
        return out

    call()
    benchmark.group = case.label()
    benchmark(call)
