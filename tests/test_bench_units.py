"""The benchmark suite's building blocks: work counts, statistics, roofline arithmetic,
output directories and argument errors."""
import argparse
import math
import os

import pytest
import torch

from cdam_fast.benchmarks import cli, report, roofline
from cdam_fast.benchmarks.cases import OPS, PAPER_C, PAPER_N, SETS, Case, build_cases, divergence_elements
from cdam_fast.benchmarks.impls import usable_backends
from cdam_fast.benchmarks.timing import TimingOptions, quartiles, rss_peak_growth, time_cpu


def test_divergence_elements_match_the_spec_counts():
    # spec section 6: 62 M logs per scale at N = 784, C' = 101; about 128 M over the seven
    # scales ("the six smaller grids add about 1.07x the full-scale pairs").
    single = divergence_elements(Case("cdam_map", N=PAPER_N, C=PAPER_C))
    assert single == 784 * 784 * 101
    assert abs(single / 62e6 - 1) < 0.01
    multi = divergence_elements(Case("multiscale_cdam_map", N=PAPER_N, C=PAPER_C))
    assert abs(multi / 128e6 - 1) < 0.03
    assert abs(multi / single - 2.07) < 0.03
    assert divergence_elements(Case("jsd_attention", B=8, N=100, C=21, D=64)) == 8 * 100 * 100 * 21


def test_every_named_set_builds_and_covers_the_acceptance_shapes():
    for name in SETS:
        assert build_cases([name]), name
    full = build_cases(["gpu-full"])
    assert {c.op for c in full} >= set(OPS) | {"pipeline"}
    ns = {c.N for c in full}
    assert min(ns) == 196 and 16384 in ns and 65536 in ns
    assert {c.C for c in full} >= {21, 101, 251}
    assert {c.D for c in full} >= {64, 768}
    assert {c.B for c in full} >= {1, 64}
    assert any(c.op == "multiscale_cdam_attention" and c.N == 784 and c.C == 101 for c in full)
    # N = 65536 only in the low-memory (recompute) mode for the two-pass ops
    for c in full:
        if c.N == 65536 and c.op != "jsd_attention":
            assert c.modes == ("recompute",)


def test_unknown_set_names_the_set():
    with pytest.raises(ValueError, match="'nope'"):
        build_cases(["nope"])


def test_quartiles_hand_computed():
    assert quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (2.0, 3.0, 4.0)
    assert quartiles([1.0, 2.0]) == (1.25, 1.5, 1.75)
    with pytest.raises(ValueError, match="samples_ms"):
        quartiles([])


def test_rss_peak_growth_sees_a_large_allocation():
    got = rss_peak_growth(lambda: torch.ones(64 << 20, dtype=torch.uint8))  # 64 MiB, touched
    if got is None:
        pytest.skip("/proc/self/clear_refs not available on this system")
    assert 48 << 20 <= got <= 1 << 30


def test_sfu_limit_arithmetic_and_cpu():
    # H100 SXM: 132 SMs x 16 lg2/clock x 1.98 GHz = 4.18176e12 lg2/s
    assert math.isclose(roofline.theoretical_limit(132, 1.98e9), 4.18176e12)
    assert roofline.sfu_limit(torch.device("cpu")) is None
    limit = roofline.SfuLimit("gpu", 132, 1.98e9, "test", 4.18176e12, measured_per_s=3.0e12)
    rate, frac, frac_measured = roofline.fractions(4_181_760_000, 2.0, limit)  # elements in 2 ms
    assert math.isclose(rate, 2.09088e12) and math.isclose(frac, 0.5) and math.isclose(frac_measured, 0.69696)
    assert roofline.fractions(1000, 1.0, None)[1:] == (None, None)


def test_triton_is_never_benchmarked_on_cpu():
    reasons = usable_backends(torch.device("cpu"))
    assert "interpreter" in reasons["triton"]


def test_run_dir_is_never_reused(tmp_path):
    a = report.make_run_dir(None, tmp_path / "root")
    (a / "results.json").write_text("kept")
    b = report.make_run_dir(None, tmp_path / "root")  # same second: a suffixed sibling
    assert a != b and a.parent == b.parent
    with pytest.raises(report.OutputDirError, match="--out .*refusing to overwrite"):
        report.make_run_dir(a, tmp_path)
    assert (a / "results.json").read_text() == "kept"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.make_run_dir(empty, tmp_path) == empty
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(report.OutputDirError):
        report.make_run_dir(afile, tmp_path)


def _parser():
    parser = argparse.ArgumentParser(prog="bench", exit_on_error=True)
    cli.add_arguments(parser)
    return parser


@pytest.mark.parametrize("argv, needle", [
    (["--backends", "triton,gpu"], "--backends"),
    (["--baselines", "published,nope"], "--baselines"),
    (["--set", "everything"], "--set"),
    (["--max-elements", "-3"], "--max-elements"),
    (["--threads", "0"], "--threads"),
])
def test_bad_arguments_are_named(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(SystemExit, match="--device cuda"):
        cli.run_from_args(_parser().parse_args(["--device", "cuda", "--list"]))


def test_list_prints_cases_and_writes_nothing(tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli.main(["--set", "multiscale", "--list"]) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "multiscale_cdam_attention B=1 N=784 C=101 D=768" in out
    assert not any(tmp_path.iterdir())


def test_cpu_peak_of_a_case_after_larger_ones(one_thread):
    """Each case's peak is its own: memory a larger earlier case freed (kept by the allocator)
    does not hide the next case's allocations (they read 0 MiB before)."""
    def case(mib):
        def call(i):
            t = torch.ones(mib << 18)  # float32: mib MiB, touched
            return float(t[::4096].sum())
        return call

    opts = TimingOptions(target_s=0.01, min_reps=2, max_reps=3)
    for mib in (64, 8, 40, 16, 4):
        peak = time_cpu(case(mib), 2, opts).peak_mem_bytes
        if peak is None:
            pytest.skip("no RSS high-water mark or malloc_trim on this system (the table says n/a)")
        assert (mib - 0.5) * 2**20 <= peak <= (mib + 16) * 2**20, (mib, peak / 2**20)
