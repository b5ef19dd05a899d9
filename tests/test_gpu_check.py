"""scripts/gpu_check.sh: its CPU dry run end to end (what CI runs so the GPU check cannot rot),
the structure of results.json and of the Markdown block, the splice into RESULTS.md, the time
limits, and that the GPU test selections still select tests."""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdam_fast.benchmarks import gpu_check, gpu_check_markdown as md, gpu_check_plan as plan

ROOT = Path(__file__).resolve().parent.parent
OUT_FILES = {"results.json", "gpu_block.md", "progress.jsonl", "check.log", "tests.log", "profile.txt"}


# The limit, < 3 minutes on CI's 2 cores, as CPU seconds of the whole dry run (every
# process it starts): wall-clock time on a machine shared with other jobs says little.
DRY_RUN_CPU_S = 150.0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop(gpu_check.OUT_ENV, None)
    # The check's wall-clock budget is DRY_BUDGET_S on an idle machine; other jobs on the cores
    # (a load average above the core count) stretch it in proportion.
    load = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    budget = plan.DRY_BUDGET_S * load
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--budget-s", f"{budget:.0f}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert (out / "results.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out, json.loads((out / "results.json").read_text()), cpu_s


def test_dry_run_passes_within_its_budget(dry_run):
    proc, out, results, cpu_s = dry_run
    assert results["failures"] == [], json.dumps(results["failures"], indent=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results["meta"]["dry_run"] is True
    # the budget held (a stage that got no time left would have been a failure above)
    assert results["meta"]["wall_s"] <= results["meta"]["budget_s"] + 15
    assert cpu_s < DRY_RUN_CPU_S, f"the dry run used {cpu_s:.0f} CPU seconds"


def test_output_files_fit_the_device_tool(dry_run):
    _, out, _, _ = dry_run
    names = {p.name for p in out.iterdir()}
    assert names == OUT_FILES, names  # at most 8 plain files come back from the GPU machine
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)


def test_results_json_structure(dry_run):
    _, out, results, _ = dry_run
    assert list(results)[:2] == ["failures", "not_run"]  # failures first
    stages = {s["name"]: s["status"] for s in results["stages"]}
    assert set(stages) == set(gpu_check.STAGE_NAMES), stages
    for name, status in stages.items():
        assert status == "ok" or (name == "tests:backward" and status.startswith("skipped")), (name, status)
    versions = results["versions"]
    for key in ("torch", "triton", "python", "commit", "commit_source", "nvidia_smi", "open_clip"):
        assert key in versions, key
    # every record of the progress file made it into results.json
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert len(results["tests"]["records"]) == sum(r["type"] == "test" for r in progress)

    sel = {s["name"]: s for s in results["tests"]["selections"]}
    assert sel["tests:triton"]["passed"] >= 6 and sel["tests:native"]["passed"] >= 6
    ops = {"pairwise_jsd", "cdam_map", "cdam_attention", "multiscale_cdam_map", "multiscale_cdam_attention",
           "jsd_attention"}
    for stage, backend in (("tests:triton", "triton"), ("tests:native", "cpu")):
        ran = {r["nodeid"] for r in results["tests"]["records"] if r["stage"] == stage and r["outcome"] == "passed"}
        assert all(f"[{backend}-" in n for n in ran), ran
        assert {op for op in ops if any(re.search(rf"::test_{op}(_self|_cross)?\[", n) for n in ran)} == ops, ran
    assert results["builds"] and results["builds"][0]["backend"] == "cpu" and results["builds"][0]["status"] == "ok"

    bench = results["bench"]
    assert {r["group"] for r in bench} == {h.group for h in plan.HEADLINE}
    for group in {h.group for h in plan.HEADLINE}:
        assert any(r["group"] == group and r["status"] == "ok" for r in bench), group
    assert any(r["impl"] == "cpu" and r["status"] == "ok" for r in bench)  # the built backend is measured
    assert any(r["impl"] == "triton" and r["status"].startswith("n/a") for r in bench)  # interpreter: not timed
    assert any(r["impl"] == "compile" and r["status"] == plan.COMPILE_NOTE for r in bench)
    assert any(r["group"] == "pipeline" and r["impl"] == "published" and r["images_per_s"] for r in bench)
    assert all(r["command"].startswith("scripts/gpu_check.sh --dry-run") for r in bench)
    steps = [r for r in bench if r["group"] == "backward" and r["case"].endswith(" fwd+bwd")]
    for op in ("multiscale_cdam_attention", "cdam_attention", "jsd_attention"):  # forward + backward, timed
        for impl in ("cpu", "reference"):
            assert any(r["op"] == op and r["impl"] == impl and r["status"] == "ok" and r["median_ms"]
                       for r in steps), (op, impl)
    assert results["profile"]["rows"] and results["profile"]["backend"] == "cpu"
    assert (out / "profile.txt").read_text().strip()


def test_markdown_block(dry_run):
    _, out, results, _ = dry_run
    block = (out / "gpu_block.md").read_text()
    assert block == md.render(results)
    assert block.startswith(md.BEGIN) and block.rstrip().endswith(md.END)
    assert "DRY RUN" in block
    headings = ["### Failures (0)", "### Not run", "### Correctness on the device", "### Roofline",
                "### Divergence kernels vs the SFU limit", "### Fused CDAM attention vs baselines",
                "### Materialize vs recompute", "### Low-memory mode", "### Pipeline per image", "### Forward + backward",
                "### Kernel profile"]
    positions = [block.find(h) for h in headings]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(headings, positions))
    assert "| tests:triton |" in block and "Command: `scripts/gpu_check.sh --dry-run" in block
    assert "(dry run: collected " in block  # the gpu-only selection is collected, not run, on CPU
    for case in ("multiscale_cdam_attention B=1 N=49 C=101 D=16", "cdam_attention B=1 N=64 C=101 D=16",
                 "jsd_attention B=1 N=64 C=101 D=16"):  # forward ms and fwd + bwd ms both measured
        assert re.search(rf"^\| {case} \| cpu \| (auto|-) \| [0-9.e+-]+ \| [0-9.e+-]+ \| ", block, re.M), case


def test_console_summary_says_what_ok_hides(dry_run):
    proc, out, results, _ = dry_run
    summary = proc.stdout[proc.stdout.rindex("FAILURES ("):]
    # the GPU-only selection is only collected on CPU: "ok", but no test ran
    assert re.search(r"^  tests:gpu-only: ok, but ran 0 tests \(collected \d+ only\) \(", summary, re.M), summary
    assert not re.search(r"^  tests:(triton|native): ok, but ran 0", summary, re.M), summary
    # whatever error lines a stage logged (the CPU profiler logs one where it finds no GPU) are named
    log = (out / "check.log").read_text()
    section = log[log.index("===== [profile]"):]
    errors = [ln.strip() for ln in section.splitlines() if re.match(r"(ERROR|FATAL|CRITICAL)\b", ln)]
    stage = next(s for s in results["stages"] if s["name"] == "profile")
    assert stage["logged_errors"] == errors[:gpu_check.MAX_LOGGED]
    if errors:
        assert f"  profile: ok, but logged an error: {errors[0]}" in summary, summary


def test_summary_of_a_stage_that_ran_nothing_or_logged_an_error(tmp_path):
    log = tmp_path / "check.log"
    log.write_text("===== [speed] ...\nERROR:earlier stage\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("===== [profile] ...\nprofiler_start\nERROR:2026 DeviceProperties.cpp:56] gpuGetDeviceCount failed\n"
                "table\nTraceback (most recent call last):\n")
    assert gpu_check.logged_errors(log, start) == [
        "ERROR:2026 DeviceProperties.cpp:56] gpuGetDeviceCount failed", "Traceback (most recent call last):"]
    selection = {"name": "tests:x", "passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0, "xpassed": 0,
                 "collected_only": None}
    results = {"failures": [], "meta": {"out": "OUT"}, "tests": {"selections": [selection]}, "stages": [
        {"name": "tests:x", "status": "ok", "seconds": 1.0},
        {"name": "profile", "status": "ok", "seconds": 2.0, "logged_errors": ["ERROR: no GPU", "ERROR: again"]},
        {"name": "speed", "status": "ok", "seconds": 3.0, "logged_errors": []}]}
    text = md.summary(results)
    assert "  tests:x: ok, but ran 0 tests (1.0 s)" in text
    assert "  profile: ok, but logged an error: ERROR: no GPU (and 1 more, in check.log) (2.0 s)" in text
    assert "  speed: ok (3.0 s)" in text
    selection["passed"] = 3
    assert "  tests:x: ok (1.0 s)" in md.summary(results)


def test_a_dry_run_is_never_spliced_into_results_md(dry_run, tmp_path):
    _, out, _, _ = dry_run
    target = tmp_path / "RESULTS.md"
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    target.write_text(text)
    assert gpu_check.main(["--update-results", str(out / "results.json"), "--results-md", str(target)]) == 2
    assert target.read_text() == text


# ------------------------------------------------------------------ units (no dry run needed)

def _rec(case, impl, kind, mode="", median=None, status="ok", group="baselines", **kw):
    base = {"case": case, "op": case.split()[0], "impl": impl, "kind": kind, "mode": mode, "B": 1, "N": 4096, "C": 101,
            "D": 64, "image": "", "status": status, "median_ms": median, "iqr_ms": 0.1, "peak_mem_bytes": 2**20,
            "elements_per_s": None, "sfu_fraction": None, "sfu_fraction_measured": None, "images_per_s": None}
    return {"group": group, "command": "scripts/gpu_check.sh (speed)", **base, **kw}


def _results(bench, failures=(), dry_run=False):
    return {"failures": list(failures), "not_run": [],
            "meta": {"dry_run": dry_run, "device": "cuda", "command": "scripts/gpu_check.sh --out X",
                     "started": "2026-11-29T16:00:00Z", "wall_s": 300.0, "budget_s": 390.0, "out": "X"},
            "versions": {"device_name": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc"},
            "stages": [], "builds": [], "tests": {"selections": [], "records": []}, "sfu_limit": None,
            "bench": list(bench), "profile": None}


def test_render_speedups_mode_verdict_and_failures_first():
    case = "cdam_attention B=1 N=4096 C=101 D=64"
    bench = [
        _rec(case, "triton", "backend", "materialize", 2.0, group="modes"),
        _rec(case, "triton", "backend", "recompute", 3.0, group="modes"),
        _rec(case, "triton", "backend", "auto", 2.1, group="modes"),
        _rec("crop", "triton", "backend", "auto", 2.0),
        _rec("crop", "published", "baseline", "", 100.0),
        _rec("crop", "compile", "baseline", "", 7.0),
        _rec("crop", "cuda", "backend", "auto", None, status="error: RuntimeError: boom"),
    ]
    text = md.render(_results(bench, failures=[{"stage": "speed", "item": "crop cuda", "detail": "error: boom"}]))
    assert text.index("### Failures (1)") < text.index("### Correctness")
    assert "* **speed** `crop cuda`: error: boom" in text
    assert "| crop | triton | auto | 2 | 0.1 | 1 | 50x | 3.5x | - | ok |" in text
    assert f"| {case} | triton | 2 | 3 | 2.1 | materialize | yes | 1 / 1 |" in text
    assert "| crop | cuda | auto | n/a |" in text and "error: RuntimeError: boom |" in text


def test_render_backward_table_pairs_each_step_with_its_forward():
    crop, att = "multiscale_cdam_attention B=4 N=784 C=101 D=768", "jsd_attention B=1 N=4096 C=101 D=64"
    bench = [
        _rec(crop, "triton", "backend", "auto", 10.0, group="backward"),
        _rec(crop + " fwd+bwd", "triton", "backend", "auto", 35.0, group="backward"),
        _rec(crop, "reference", "baseline", "", 100.0, group="backward"),
        _rec(crop + " fwd+bwd", "reference", "baseline", "", 350.0, group="backward"),
        _rec(att, "triton", "backend", "", 2.0, group="backward"),
        _rec(att + " fwd+bwd", "triton", "backend", "", 8.0, group="backward"),
        _rec(att, "cuda", "backend", "", None, status="OOM", group="backward"),
        _rec(att + " fwd+bwd", "cuda", "backend", "", 9.0, group="backward"),
        _rec(att + " fwd+bwd", "triton", "backend", "", 1.0, group="sfu"),  # another group: not paired
    ]
    text = md.render(_results(bench))
    section = text[text.index("### Forward + backward"):text.index("### Kernel profile")]
    assert "<= 2.5x the forward for the attention ops, <= 3x for the multi-scale op" in section
    # backward = 35 - 10 = 25 ms = 2.5x the forward (multi-scale target 3); 350 / 35 = 10x the reference
    assert f"| {crop} | triton | auto | 10 | 35 | 2.5 | <= 3: yes | 10x | ok |" in section
    assert f"| {crop} | reference | - | 100 | 350 | 2.5 | - | - | ok |" in section
    # (8 - 2) / 2 = 3 > 2.5; no reference row for this shape
    assert f"| {att} | triton | - | 2 | 8 | 3 | <= 2.5: no | - | ok |" in section
    assert f"| {att} | cuda | - | n/a | 9 | n/a | <= 2.5: n/a | - | forward: OOM |" in section
    assert section.count(f"| {att} | triton |") == 1 and "fwd+bwd |" not in section


def test_splice_replaces_only_the_marked_section():
    text = f"# R\n\nbefore\n{md.BEGIN}\nold GPU section\n{md.END}\nafter\n"
    results = _results([])
    block = md.render(results)
    new = md.splice(text, block, results)
    assert new.startswith("# R\n\nbefore\n" + md.BEGIN) and new.endswith(md.END + "\nafter\n")
    assert "old GPU section" not in new and "NVIDIA H200" in new
    assert md.splice(new, block, results) == new  # idempotent: the markers survive
    with pytest.raises(md.SpliceError, match="no '<!-- gpu-check:begin -->'"):
        md.splice("# R\n", block, results)
    with pytest.raises(md.SpliceError, match="dry-run"):
        md.splice(text, block, _results([], dry_run=True))


def test_results_md_has_one_gpu_section_to_replace():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert text.count(md.BEGIN) == 1 and text.count(md.END) == 1 and text.index(md.BEGIN) < text.index(md.END)


def test_time_limit_kills_the_stage_and_its_children():
    t0 = time.time()
    proc = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60"], preexec_fn=os.setpgrp)
    assert gpu_check.wait_limited(proc, 0.5) is None
    assert time.time() - t0 < 8
    with pytest.raises(ProcessLookupError):  # the whole group is gone, the background sleep too
        for _ in range(50):
            os.killpg(proc.pid, 0)
            time.sleep(0.1)


def test_list_names_every_stage_and_case(capsys):
    assert gpu_check.main(["--list"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in gpu_check.STAGE_NAMES)
    assert all(h.case.label() in text for h in plan.HEADLINE)


def test_stage_names_and_errors():
    assert gpu_check._stages("tests") == tuple(f"tests:{s.name}" for s in plan.SELECTIONS)
    assert gpu_check._stages("speed,versions") == ("speed", "versions")
    with pytest.raises(Exception, match="unknown stage 'sped'"):
        gpu_check._stages("sped")


@pytest.mark.parametrize("sel", [s for s in plan.SELECTIONS if s.name in ("triton", "native")], ids=lambda s: s.name)
def test_gpu_selections_still_select_every_op(sel):
    """On a GPU these selections run full shapes; here they must at least collect a case per op and
    per dtype test (renamed tests fail this; the dry run collects the gpu-only selection itself)."""
    args = [a.replace("{native}", "cuda") for a in sel.args]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert proc.returncode == 0 and ids, proc.stdout[-2000:] + proc.stderr[-2000:]
    backend = "triton" if sel.name == "triton" else "cuda"
    for op in ("pairwise_jsd", "cdam_map", "cdam_attention", "multiscale_cdam_map", "multiscale_cdam_attention",
               "jsd_attention"):
        for kind in (r"(_self|_cross)?", "_dtypes"):
            assert any(re.search(rf"::test_{op}{kind}\[{backend}-", i) for i in ids), (op, kind)


def test_a_failed_build_is_one_failure_and_leaves_its_backend_out(tmp_path):
    """A compiler that fails (CXX=false, empty extension cache): the build record is the failure,
    and the compiled backend's selection is skipped with the reason instead of run."""
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop(gpu_check.OUT_ENV, None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cdam_fast.benchmarks.gpu_check", "--dry-run", "--stages",
                           "build,tests:native", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    results = json.loads((out / "results.json").read_text())
    assert proc.returncode == 1
    assert [f["item"] for f in results["failures"]] == ["cpu extension build"], results["failures"]
    assert "false" in results["failures"][0]["detail"]
    stages = {s["name"]: s["status"] for s in results["stages"]}
    assert stages["build"].startswith("skipped: the build failed") and stages["tests:native"].startswith("skipped")
