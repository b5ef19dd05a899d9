"""The benchmark report does not turn noisy timings (IQR > median) into speed-up ratios."""
from cdam_fast.benchmarks import report
from cdam_fast.benchmarks.timing import Timing, is_noisy


def _record(impl, kind, median, iqr):
    return {"case": "jsd N=64", "op": "pairwise_jsd", "N": 64, "impl": impl, "kind": kind, "mode": None,
            "status": "ok", "median_ms": median, "q1_ms": 0.0, "q3_ms": iqr, "iqr_ms": iqr, "single_shot": False,
            "peak_mem_bytes": None, "elements_per_s": None, "sfu_fraction": None, "images_per_s": None}


def test_noisy_measurements_are_flagged_not_compared():
    assert Timing(1.0, 0.5, 2.6, 5, 0.0, None).noisy and not Timing(1.0, 0.9, 1.2, 5, 0.0, None).noisy
    assert is_noisy(0.25, 36.0) and not is_noisy(0.25, 0.25) and not is_noisy(None, 1.0)
    records = [_record("cpu", "backend", 36.0, 80.0), _record("reference", "baseline", 0.4, 0.05),
               _record("triton", "backend", 0.2, 0.01)]
    ups = report.speedups(records)
    text = report.format_speedups(ups)
    assert "cpu vs reference: not compared, too noisy (IQR > median: cpu)" in text
    assert "0.01x" not in text and "triton vs reference: 2.00x" in text
    table = report.format_table(records)
    assert table.count("noisy: IQR > median") == 1
