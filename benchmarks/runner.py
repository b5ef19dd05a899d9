"""Run a list of cases over every implementation and collect one record per (case, impl, mode).

A failing implementation never stops the run: out-of-memory becomes status "OOM", anything
else "error: ...", and whatever is not run says why ("skipped: ...", "n/a: ..."), so the
table always shows the full grid.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import backward, impls, pipeline_bench
from .cases import MODE_OPS, PIPELINE, Case, divergence_elements
from .inputs import dtype_of, make_input_sets
from .roofline import SfuLimit, fractions
from .timing import TimingOptions, is_out_of_memory, time_call

PIPELINE_BASELINES = ("reference", "published")  # see pipeline_bench
QUICK_HEAVY_NOTE = "skipped: --quick compiles torch.compile / KeOps for one case only (tens of seconds each on CPU)"
QUICK_PIPELINE_NOTE = ("skipped: not in --quick (a ViT-B-16 forward pass per 448 px window takes seconds "
                       "on CPU); run --set pipeline")


@dataclass
class RunOptions:
    device: torch.device
    timing: TimingOptions = field(default_factory=TimingOptions)
    backends: tuple | None = None  # restrict the fast backends (None: all usable)
    baselines: tuple = impls.BASELINES
    max_elements: float | None = None  # skip cases with more divergence elements than this
    memory_cap_bytes: int | None = None  # CPU: skip baselines estimated to need more
    pipeline_model: str = "ViT-B-16"
    seed: int = 0
    progress: bool = True
    quick: bool = False  # explains the compiled baselines' skipped rows as --quick's doing


@dataclass(frozen=True)
class Task:
    case: Case
    impl: str
    kind: str  # "backend", "baseline" or "context"
    mode: str | None = None


def plan(cases: list[Case], opts: RunOptions) -> tuple[list[Task], list[dict]]:
    """The tasks to run, and records for fast backends that cannot run on this machine."""
    tasks, unusable, cache = [], [], {}
    for case in cases:
        key = case.dtype
        if key not in cache:
            cache[key] = impls.usable_backends(opts.device, dtype_of(case.dtype))
        for name, why in cache[key].items():
            if opts.backends is not None and name not in opts.backends:
                continue
            if why is not None:
                unusable.append(_record(Task(case, name, "backend"), status=f"n/a: {why}"))
                continue
            modes = case.modes if case.op in MODE_OPS else (None,)
            tasks += [Task(case, name, "backend", m) for m in modes]
        for name in opts.baselines:
            if case.op == PIPELINE and name not in PIPELINE_BASELINES:
                continue
            tasks.append(Task(case, name, "baseline"))
        if case.op == PIPELINE:
            tasks.append(Task(case, pipeline_bench.NO_CDAM, "context"))
    return tasks, _dedupe_unusable(unusable)


def _dedupe_unusable(records):
    """One "n/a" row per (backend, reason) and op, not one per shape."""
    seen, out = set(), []
    for r in records:
        key = (r["impl"], r["op"], r["status"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _record(task: Task, status: str = "ok", **values) -> dict:
    c = task.case
    h, w = c.grid if c.op != PIPELINE else (0, 0)
    rec = {
        "case": c.label(), "op": c.op, "impl": task.impl, "kind": task.kind, "mode": task.mode or "",
        "B": c.B, "N": c.N, "C": c.C, "D": c.D, "h": h, "w": w,
        "image": f"{c.image[0]}x{c.image[1]}" if c.op == PIPELINE else "", "dtype": c.dtype, "status": status,
        "median_ms": None, "q1_ms": None, "q3_ms": None, "iqr_ms": None, "reps": 0, "first_call_s": None,
        "single_shot": False, "peak_mem_bytes": None, "elements": divergence_elements(c),
        "elements_per_s": None, "sfu_fraction": None, "sfu_fraction_measured": None, "images_per_s": None,
    }
    rec.update(values)
    return rec


def _skip_reason(task: Task, opts: RunOptions) -> str | None:
    case = task.case
    if case.op == PIPELINE:
        _, why = pipeline_bench.load_segmenter_class()
        if why:
            return why
        return QUICK_PIPELINE_NOTE if "quick" in case.tags else None
    if task.kind == "baseline":
        why = impls.baseline_skip_reason(case, task.impl, QUICK_HEAVY_NOTE if opts.quick else None)
        if why:
            return why
    elements = divergence_elements(case)
    if opts.max_elements is not None and elements > opts.max_elements:
        return f"skipped: {elements:.3g} divergence elements > --max-elements {opts.max_elements:.3g}"
    if opts.memory_cap_bytes is not None and task.kind == "baseline":
        need = (backward.estimated_bytes if backward.is_backward(case) else impls.estimated_bytes)(case, task.impl)
        if need > opts.memory_cap_bytes:
            return f"skipped: needs ~{need / 2**30:.1f} GiB > memory cap {opts.memory_cap_bytes / 2**30:.1f} GiB"
    return None


def _time_task(task: Task, inputs: list, opts: RunOptions, limit: SfuLimit | None) -> dict:
    case = task.case
    if case.op == PIPELINE:
        predict = pipeline_bench.build(case, task.impl, opts.device, opts.pipeline_model)
        images = pipeline_bench.random_images(case, 2, opts.seed)
        t = time_call(lambda i: predict(images[i]), len(images), opts.timing, opts.device)
        extra = {"images_per_s": 1e3 / t.median_ms if t.median_ms > 0 else None}
    else:
        make = backward.op_callable if backward.is_backward(case) else impls.op_callable
        fn = make(case.op, task.impl, task.mode)
        t = time_call(lambda i: fn(inputs[i]), len(inputs), opts.timing, opts.device)
        rate, frac, frac_measured = fractions(divergence_elements(case), t.median_ms, limit)
        extra = {"elements_per_s": rate, "sfu_fraction": frac, "sfu_fraction_measured": frac_measured}
    return _record(task, median_ms=t.median_ms, q1_ms=t.q1_ms, q3_ms=t.q3_ms, iqr_ms=t.iqr_ms, reps=t.reps,
                   first_call_s=t.first_call_s, single_shot=t.single_shot, peak_mem_bytes=t.peak_mem_bytes, **extra)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_status(e: BaseException) -> str:
    first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {first_line}"


def run(cases: list[Case], opts: RunOptions, limit: SfuLimit | None = None) -> list[dict]:
    tasks, records = plan(cases, opts)
    inputs_for, inputs = None, []
    bar = tqdm(tasks, desc="cdam-fast bench", unit="run", disable=not opts.progress, dynamic_ncols=True)
    for task in bar:
        bar.set_postfix_str(f"{task.impl} {task.case.label()}", refresh=False)
        why = _skip_reason(task, opts)
        if why:
            records.append(_record(task, status=why))
            continue
        try:
            if task.case.op != PIPELINE and inputs_for != task.case:
                inputs_for, inputs = None, []
                _free_memory(opts.device)
                inputs = make_input_sets(task.case, opts.device, opts.seed)
                inputs_for = task.case
            records.append(_time_task(task, inputs, opts, limit))
        except Exception as e:  # noqa: BLE001 - any failure is one row, not the end of the run
            records.append(_record(task, status="OOM" if is_out_of_memory(e) else _error_status(e)))
        if opts.device.type == "cuda":  # each implementation's peak memory starts from the same floor
            _free_memory(opts.device)
    return records
