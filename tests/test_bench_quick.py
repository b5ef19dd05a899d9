"""`cdam-fast bench --quick` runs end to end and writes well-formed results, and the
pytest-benchmark suite collects and runs once per benchmark, so neither can rot."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdam_fast.benchmarks.cases import MULTISCALE_OPS, OPS
from cdam_fast.cli import main as cdam_fast_main
from cdam_fast.dispatch import available_backends

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# --threads 1: on a busy 2-core machine two OpenMP threads stall each other for no gain here.
ARGS = ["bench", "--quick", "--threads", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    rc = cdam_fast_main(ARGS + ["--out", str(out)])
    return rc, out


def _records(out):
    return json.loads((out / "results.json").read_text())


def test_quick_run_succeeds_without_errors(quick_run):
    rc, out = quick_run
    data = _records(out)
    errors = [r for r in data["records"] if r["status"].startswith("error")]
    assert rc == 0 and not errors, errors


def test_json_metadata(quick_run):
    meta = _records(quick_run[1])["meta"]
    for key in ("device", "device_name", "torch", "triton", "cuda", "command", "options", "sets", "cpu_model"):
        assert key in meta, key
    assert meta["device"] == "cpu" and meta["sets"] == ["quick"]
    assert meta["sfu_limit"] is None  # no roofline on CPU
    assert meta["options"]["quick"] is True


def test_every_op_measured_by_reference_and_published(quick_run):
    records = _records(quick_run[1])["records"]
    for op in OPS:
        for impl in ("reference", "published"):
            ok = [r for r in records if r["op"] == op and r["impl"] == impl and r["status"] == "ok"]
            assert {r["N"] for r in ok} >= {64, 196}, (op, impl)


def test_records_are_consistent(quick_run):
    for r in _records(quick_run[1])["records"]:
        if r["status"] != "ok":
            assert r["median_ms"] is None
            assert r["status"].startswith(("skipped: ", "n/a: ", "OOM")), r["status"]
            continue
        assert 0 < r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["iqr_ms"] == pytest.approx(r["q3_ms"] - r["q1_ms"])
        assert r["reps"] >= 1
        if r["op"] == "pipeline":
            continue
        if r["op"] not in MULTISCALE_OPS:
            assert r["elements"] == r["B"] * r["N"] ** 2 * r["C"]
        assert r["elements_per_s"] == pytest.approx(r["elements"] / (r["median_ms"] * 1e-3))
        assert r["sfu_fraction"] is None  # CPU: n/a


def test_compiled_baselines_run_once_and_say_why_not_elsewhere(quick_run):
    records = _records(quick_run[1])["records"]
    compiled = [r for r in records if r["impl"] == "compile"]
    assert [r["case"] for r in compiled if r["status"] == "ok"] == ["cdam_attention B=1 N=64 C=101 D=64"]
    assert all(r["status"].startswith("skipped: --quick") for r in compiled if r["status"] != "ok")
    for r in records:
        if r["impl"] == "keops" and r["status"] != "ok":
            assert r["status"].startswith(("skipped: not installed", "skipped: --quick", "n/a: KeOps")), r["status"]
    pipeline = [r for r in records if r["op"] == "pipeline"]
    assert pipeline and all(r["status"].startswith(("skipped: ", "n/a: ")) for r in pipeline)


def test_csv_matches_json(quick_run):
    out = quick_run[1]
    records = _records(out)["records"]
    with (out / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    for row, rec in zip(rows, records):
        assert (row["op"], row["impl"], row["status"]) == (rec["op"], rec["impl"], rec["status"])
        if rec["median_ms"] is not None:
            assert float(row["median_ms"]) == pytest.approx(rec["median_ms"])


def test_plots_are_pngs(quick_run):
    import matplotlib.image

    for name in ("time_vs_n.png", "speedup.png", "memory_vs_n.png"):
        path = quick_run[1] / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        img = matplotlib.image.imread(path)
        assert img.shape[0] > 100 and img.shape[1] > 100


def test_existing_run_dir_is_not_overwritten(quick_run, capsys):
    out = quick_run[1]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cdam_fast_main(ARGS + ["--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_pytest_benchmark_suite_runs_once_per_benchmark():
    env = dict(os.environ, CDAM_BENCH_SIZES="64", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-disable", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "error" not in proc.stdout.lower(), tail


def test_cpu_vs_reference_script_runs(tmp_path):
    """benchmarks/cpu_vs_reference.py at a toy size: every op timed on both backends, the
    product-with-v floor reported, and an existing --json file is not overwritten."""
    why = available_backends("cpu", torch.float32)["cpu"]
    if why is not None:
        pytest.skip(f"the cpu backend is unavailable here: {why}")
    script = ROOT / "benchmarks" / "cpu_vs_reference.py"
    out = tmp_path / "cpu.json"
    cmd = [sys.executable, str(script), "--sizes", "16", "--classes", "5", "--width", "8", "--repeats", "1",
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert {r["op"] for r in data["rows"]} == {"pairwise_jsd", "cdam_map", "cdam_attention",
                                              "multiscale_cdam_attention", "jsd_attention"}
    assert all(r["cpu_s"] > 0 and r["reference_s"] > 0 for r in data["rows"])
    assert set(data["v_product_s"]) == {"16"}
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "not overwriting" in again.stderr
