"""The GPU check's Markdown block for benchmarks/RESULTS.md (failures first), its terminal
summary, and the splice that puts the block between RESULTS.md's gpu-check markers."""
from __future__ import annotations

from .cases import BACKWARD_LABEL
from .gpu_check_plan import BACKWARD_RATIO_TARGET, BACKWARD_RATIO_TARGETS
from .gpu_check_results import OUTCOMES

BEGIN = "<!-- gpu-check:begin -->"
END = "<!-- gpu-check:end -->"
MODES = ("materialize", "recompute", "auto")
BASELINE_COLUMNS = ("published", "compile", "reference")


class SpliceError(ValueError):
    """The block cannot go into RESULTS.md (a dry run, or no markers)."""


def _f(x, digits=3) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.4g}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(head, rows) -> list[str]:
    if not rows:
        return ["(no rows: the stage did not run or measured nothing; see Failures / Not run)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _mode(r) -> str:
    return r["mode"] or "-"


def _speedups(bench) -> dict:
    """{(case, impl, mode): {baseline: baseline median / this median}} over ok rows."""
    ok = [r for r in bench if r["status"] == "ok" and r["median_ms"]]
    base = {}
    for r in ok:
        if r["kind"] == "baseline":
            base.setdefault(r["case"], {})[r["impl"]] = r["median_ms"]
    return {(r["case"], r["impl"], r["mode"]): {b: ms / r["median_ms"] for b, ms in base.get(r["case"], {}).items()}
            for r in ok if r["kind"] == "backend"}


def _header(results) -> list[str]:
    meta, v = results["meta"], results.get("versions") or {}
    smi = v.get("nvidia_smi") if isinstance(v.get("nvidia_smi"), dict) else {}
    if meta.get("dry_run"):
        title = (f"## GPU check — DRY RUN on {meta['device']} (tiny sizes: tests the check, measures nothing; "
                 "not for RESULTS.md)")
    else:
        title = f"## GPU (measured by `scripts/gpu_check.sh`) — {v.get('device_name', 'unknown device')}"
    lines = [title, ""]
    device = v.get("device_name", "n/a")
    if v.get("gpu_sm_count"):
        device += f", {v['gpu_sm_count']} SMs, capability {v.get('gpu_capability')}"
    if smi:
        device += (f"; driver {smi.get('driver_version')}; SM clock {smi.get('clocks.sm')} (max "
                   f"{smi.get('clocks.max.sm')}), memory clock {smi.get('clocks.mem')}; {smi.get('memory.total')}; "
                   f"power {smi.get('power.draw')} of {smi.get('power.limit')}; {smi.get('pstate')}")
    elif isinstance(v.get("nvidia_smi"), str):
        device += f" ({v['nvidia_smi']})"
    lines += [
        f"* Device: {device}",
        f"* Versions: torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}, "
        f"Python {v.get('python')}, open_clip {v.get('open_clip')}; {v.get('nvcc', '')}",
        f"* Commit: {v.get('commit')} ({v.get('commit_source')})"
        + ("; tracked files modified" if v.get("git_dirty") else ""),
        f"* Run: `{meta['command']}`, started {meta['started']}, {meta['wall_s']} s of a "
        f"{meta['budget_s']:.0f} s budget",
        "",
    ]
    return lines


def _failures(results) -> list[str]:
    fails = results["failures"]
    lines = [f"### Failures ({len(fails)})", ""]
    lines += [f"* **{f['stage']}** `{f['item']}`: {f['detail']}" for f in fails] or ["None."]
    not_run = results["not_run"]
    lines += ["", f"### Not run, with the reason ({len(not_run)})", ""]
    lines += [f"* {n['stage']}: {n['item']}: {n['detail']}" for n in not_run] or ["Nothing."]
    return lines + [""]


def _correctness(results) -> list[str]:
    lines = ["### Correctness on the device (named pytest selections, float64 references)", ""]
    rows = [(s["name"], s["what"], s["passed"], s["failed"] + s["error"] + s["xpassed"], s["skipped"], s["xfailed"],
             _f(s["seconds"]), s["status"] + ("" if s["collected_only"] is None else
                                              f" (dry run: collected {s['collected_only']} tests, ran none)"))
            for s in results["tests"]["selections"]]
    rows += [(f"build: {b['backend']}", "JIT build of the compiled extension" + (" (cached)" if b["cached"] else ""),
              "-", "-", "-", "-", _f(b["seconds"]), b["status"]) for b in results["builds"]]
    lines += _table(("selection", "what", "passed", "failed", "skipped", "xfailed", "seconds", "status"), rows)
    commands = [f"* `{s['name']}`: `{s['command']}`" for s in results["tests"]["selections"] if s["command"]]
    return lines + (["", "Commands (run from the checkout's root):", ""] + commands if commands else []) + [""]


def _speed(results) -> list[str]:
    bench, meta = results["bench"], results["meta"]
    timing = ("CUDA-event-timed calls with rotated inputs" if meta["device"] == "cuda"
              else "perf_counter-timed calls (CPU: one to three calls, numbers meaningless)")
    command = (f"Command: `{meta['command']}` (stage `speed`; alone: `scripts/gpu_check.sh --stages speed`). "
               f"Medians of {timing} (benchmarks/timing.py).")
    lines = ["### Roofline (`benchmarks/roofline.py`)", ""]
    s = results.get("sfu_limit")
    lines += _table(("GPU", "SMs", "SM clock (source)", "theoretical lg2/s", "measured lg2/s"), [(
        s["device_name"], s["sm_count"], f"{s['clock_hz'] / 1e9:.3f} GHz ({s['clock_source']})",
        f"{s['theoretical_per_s'] / 1e12:.2f} T", f"{s['measured_per_s'] / 1e12:.2f} T" if s["measured_per_s"]
        else s["measured_note"] or "n/a")] if s else [])
    if not s:
        lines[-1] = "n/a: no GPU (the SFU roofline is a GPU measurement)."

    lines += ["", "### Divergence kernels vs the SFU limit (target >= 70 %, > 100 % with FMA-polynomial logs)", ""]
    rows = [(r["op"], r["B"], r["N"], r["C"], r["D"] or "-", r["impl"], _mode(r), _f(r["median_ms"]),
             _f(r["elements_per_s"] and r["elements_per_s"] / 1e12), _pct(r["sfu_fraction"]),
             _pct(r["sfu_fraction_measured"]), r["status"])
            for r in bench if r["group"] == "sfu" and r["kind"] == "backend"]
    lines += _table(("op", "B", "N", "C'", "D", "backend", "mode", "median ms", "T elem/s", "% of SFU limit",
                     "% of measured", "status"), rows)

    ups = _speedups(bench)
    lines += ["", "### Fused CDAM attention vs baselines (target >= 50x published, >= 3x torch.compile)", ""]
    rows = []
    for r in bench:
        if r["group"] != "baselines":
            continue
        x = ups.get((r["case"], r["impl"], r["mode"]), {})
        cols = [_f(x.get(b)) + "x" if b in x else "-" for b in BASELINE_COLUMNS]
        rows.append((r["case"], r["impl"], _mode(r), _f(r["median_ms"]), _f(r["iqr_ms"], 2), _mib(r["peak_mem_bytes"]),
                     *cols, r["status"]))
    lines += _table(("case", "impl", "mode", "median ms", "IQR ms", "peak MiB",
                     *(f"x {b}" for b in BASELINE_COLUMNS), "status"), rows)

    lines += ["", "### Materialize vs recompute (does `auto` pick the faster mode?)", ""]
    lines += _table(("case", "backend", "materialize ms", "recompute ms", "auto ms", "faster", "auto within 10 %",
                     "peak MiB (mat / rec)"), _modes_rows(bench))

    lines += ["", "### Low-memory mode (N = 65536 runs where the baselines run out of memory)", ""]
    rows = [(r["case"], r["impl"], _mode(r), _f(r["median_ms"]),
             "n/a" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**30:.3g}", r["status"])
            for r in bench if r["group"] == "lowmem"]
    lines += _table(("case", "impl", "mode", "median ms", "peak GiB", "status"), rows)

    lines += ["", "### Pipeline per image (fp16 autocast on CUDA; target >= 10x the published order)", ""]
    rows = []
    for r in bench:
        if r["group"] != "pipeline":
            continue
        x = ups.get((r["case"], r["impl"], r["mode"]), {})
        rows.append((r["image"], r["impl"], _f(r["median_ms"]), _f(r["images_per_s"]),
                     _f(x["published"]) + "x" if "published" in x else "-", r["status"]))
    lines += _table(("image", "impl", "median ms", "images/s", "x published", "status"), rows)

    lines += ["", f"### Forward + backward (target: backward <= {BACKWARD_RATIO_TARGET:g}x the forward for the "
              f"attention ops, <= {BACKWARD_RATIO_TARGETS['multiscale_cdam_attention']:g}x for the multi-scale op)",
              "", "backward = (forward + backward) - forward; x reference = autograd through the reference's "
              "forward + backward over this row's.", ""]
    lines += _table(("case", "impl", "mode", "forward ms", "fwd + bwd ms", "backward / forward", "target",
                     "x reference", "status"), _backward_rows(bench))
    return lines + ["", command, ""]


def _backward_rows(bench) -> list[tuple]:
    """Each fwd+bwd row of the "backward" group beside the forward row of its shape, impl and mode."""
    suffix = f" {BACKWARD_LABEL}"
    rows = [r for r in bench if r["group"] == "backward"]
    forward = {(r["case"], r["impl"], r["mode"]): r for r in rows if not r["case"].endswith(suffix)}
    reference = {r["case"]: r["median_ms"] for r in rows if r["impl"] == "reference" and r["status"] == "ok"}
    out = []
    for r in rows:
        if not r["case"].endswith(suffix):
            continue
        f = forward.get((r["case"][:-len(suffix)], r["impl"], r["mode"]))
        fwd = f["median_ms"] if f and f["status"] == "ok" else None
        step = r["median_ms"] if r["status"] == "ok" else None
        ratio = (step - fwd) / fwd if fwd and step else None
        target = "-"
        if r["kind"] == "backend":
            limit = BACKWARD_RATIO_TARGETS.get(r["op"], BACKWARD_RATIO_TARGET)
            target = f"<= {limit:g}: " + ("n/a" if ratio is None else "yes" if ratio <= limit else "no")
        ref = reference.get(r["case"])
        speedup = _f(ref / step) + "x" if ref and step and r["impl"] != "reference" else "-"
        status = r["status"] if r["status"] != "ok" or f is None or f["status"] == "ok" else f"forward: {f['status']}"
        out.append((r["case"][:-len(suffix)], r["impl"], _mode(r), _f(fwd), _f(step), _f(ratio), target, speedup,
                    status))
    return out


def _modes_rows(bench) -> list[tuple]:
    by = {}
    for r in bench:
        if r["kind"] == "backend" and r["mode"] in MODES:
            by.setdefault((r["case"], r["impl"]), {})[r["mode"]] = r
    rows = []
    for (case, impl), m in by.items():
        if not {"materialize", "recompute"} <= m.keys():
            continue
        ms = {k: m[k]["median_ms"] if k in m and m[k]["status"] == "ok" else None for k in MODES}
        faster = verdict = "n/a"
        if ms["materialize"] and ms["recompute"]:
            faster = min(("materialize", "recompute"), key=lambda k: ms[k])
            if ms["auto"]:
                verdict = "yes" if ms["auto"] <= 1.1 * ms[faster] else "no"
        rows.append((case, impl, _f(ms["materialize"]), _f(ms["recompute"]), _f(ms["auto"]), faster, verdict,
                     f"{_mib(m['materialize']['peak_mem_bytes'])} / {_mib(m['recompute']['peak_mem_bytes'])}"))
    return rows


def _profile(results) -> list[str]:
    p = results.get("profile")
    lines = ["### Kernel profile (torch.profiler)", ""]
    if not p:
        return lines + ["(not measured)", ""]
    lines.append(f"{p['case']}, backend `{p['backend']}`, {p['calls']} calls, sorted by {p['sorted_by']} "
                 "(totals over the calls):")
    lines.append("")
    lines += _table(("kernel / op", "calls", "self device ms", "self CPU ms"),
                    [(r["name"][:90], r["calls"], _f(r["self_device_ms"]), _f(r["self_cpu_ms"])) for r in p["rows"]])
    return lines + [""]


def render(results: dict) -> str:
    """The whole block, markers included."""
    lines = [BEGIN, *_header(results), *_failures(results), *_correctness(results), *_speed(results),
             *_profile(results), END]
    return "\n".join(lines) + "\n"


def _stage_note(stage: dict, results: dict) -> str:
    """What an "ok" hides: a test stage that ran no test, a stage that logged errors."""
    note = ""
    sel = next((s for s in results["tests"]["selections"] if s["name"] == stage["name"]), None)
    if sel is not None and stage["status"] == "ok" and not any(sel[k] for k in OUTCOMES):
        collected = sel["collected_only"]
        note += ", but ran 0 tests" + ("" if collected is None else f" (collected {collected} only)")
    logged = stage.get("logged_errors") or []
    if logged:
        more = f" (and {len(logged) - 1} more, in check.log)" if len(logged) > 1 else ""
        note += f", but logged an error: {logged[0]}{more}"
    return note


def summary(results: dict) -> str:
    """Terminal summary: failures first, then each stage's status."""
    lines = [f"FAILURES ({len(results['failures'])}):"]
    lines += [f"  {f['stage']}: {f['item']}: {f['detail']}" for f in results["failures"]] or ["  none"]
    lines.append("stages:")
    lines += [f"  {s['name']}: {s['status']}{_stage_note(s, results)} ({s['seconds']} s)" for s in results["stages"]]
    for s in results["tests"]["selections"]:
        lines.append(f"  {s['name']}: {s['passed']} passed, {s['failed'] + s['error']} failed, {s['skipped']} skipped, "
                     f"{s['xfailed']} xfailed")
    lines.append(f"results: {results['meta']['out']}/results.json, gpu_block.md")
    return "\n".join(lines)


def splice(text: str, block: str, results: dict) -> str:
    """RESULTS.md text with the part between the gpu-check markers replaced by `block`."""
    if results["meta"].get("dry_run"):
        raise SpliceError("that results.json is from a --dry-run (tiny CPU sizes): its numbers are no GPU "
                          "measurements, so it is not put into RESULTS.md")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SpliceError(f"the results file has no '{BEGIN}' ... '{END}' section to replace")
    return text[:start] + block.rstrip("\n") + text[end + len(END):]
