"""The GPU check's stages that are not pytest runs, each run in its own process by
``cdam_fast.benchmarks.gpu_check`` (a kernel fault or a hang costs one stage, not the run):

    python -m cdam_fast.benchmarks.gpu_check_stages {build,speed,profile} --out DIR [--dry-run]

Every result is appended to the progress file as soon as it exists (gpu_check_progress).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import gpu_check_plan as plan
from .gpu_check_progress import emit

NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
                     "memory.total", "power.draw", "power.limit", "temperature.gpu", "pstate")
# Written by scripts/gpu_wheels.sh where git works; the GPU machine's copy of the tree has no .git.
COMMIT_FILE = Path(".whl/commit.txt")
COMMIT_ENV = "CDAM_GPU_CHECK_COMMIT"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_backend(dev: torch.device) -> str:
    """The compiled (C++ / CUDA) backend of the device."""
    return "cuda" if dev.type == "cuda" else "cpu"


def _run(cmd, timeout=20) -> tuple[int | None, str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return out.returncode, (out.stdout + out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{type(e).__name__}: {e}"


def nvidia_smi() -> dict | str:
    if shutil.which("nvidia-smi") is None:
        return "n/a: nvidia-smi not found"
    code, text = _run(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"])
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if code != 0 or not lines:
        return f"n/a: nvidia-smi failed: {text[:300]}"
    # values keep their units ("1980 MHz"); the first GPU is the one torch uses by default
    return dict(zip(NVIDIA_SMI_FIELDS, (v.strip() for v in lines[0].split(","))))


def commit(env_commit: str | None) -> tuple[str | None, str]:
    """(commit, where it came from): git, $CDAM_GPU_CHECK_COMMIT, or the file the wheel script wrote."""
    if env_commit:
        return env_commit, "git"
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV], f"${COMMIT_ENV}"
    if COMMIT_FILE.exists():
        return COMMIT_FILE.read_text().strip(), f"{COMMIT_FILE} (written by scripts/gpu_wheels.sh; the tree may differ)"
    return None, "unknown (no .git here)"


def _version_or_reason(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:  # noqa: BLE001 - missing or broken: say which
        return f"missing: {type(e).__name__}: {str(e)[:120]}"


def versions_info() -> dict:
    """Stage 1, run inside the orchestrating process (it has torch loaded already)."""
    from .report import environment

    dev = device()
    env = environment(dev)
    sha, source = commit(env.get("git_commit"))
    nvcc = _run(["nvcc", "--version"])[1].splitlines() if shutil.which("nvcc") else ["n/a: nvcc not on PATH"]
    info = {**env, "commit": sha, "commit_source": source, "python_executable": sys.executable,
            "machine": platform.machine(), "nvidia_smi": nvidia_smi(), "nvcc": nvcc[-1] if nvcc else "",
            "open_clip": _version_or_reason("open_clip"), "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["gpu_l2_bytes"] = getattr(props, "L2_cache_size", None)
    return info


def build(args) -> int:
    from cdam_fast.backends import extension_build as eb

    dev = device()
    name = native_backend(dev)
    spec = eb.cuda_spec() if name == "cuda" else eb.cpu_spec()
    ext = eb.cuda_extension if name == "cuda" else eb.cpu_extension
    why = eb.toolchain_problem(spec)
    if why is not None:
        emit({"type": "build", "backend": name, "status": f"skipped: {why}", "seconds": 0.0, "cached": False})
        return 0
    folder = eb.build_root() / spec.module_name
    cached = any(folder.glob(f"{spec.module_name}*.so"))
    t0 = time.perf_counter()
    failure = ext.failure()
    seconds = round(time.perf_counter() - t0, 1)
    emit({"type": "build", "backend": name, "status": "ok" if failure is None else f"failed: {failure}",
          "seconds": seconds, "cached": cached})
    return 0 if failure is None else 1


def _timing(dry_run: bool):
    from .timing import TimingOptions

    if dry_run:  # the numbers mean nothing; one or two calls show the path works
        return TimingOptions(warmup_s=0.0, target_s=0.01, min_reps=1, max_reps=3, max_case_s=0.5, max_total_s=0.2)
    # A call slower than 5 s is timed once; slow cases keep >= 3 repetitions within 3 s.
    return TimingOptions(warmup_s=0.025, target_s=0.1, min_reps=5, max_reps=200, max_case_s=5.0, max_total_s=3.0)


def speed(args) -> int:
    from .cli import _memory_cap
    from .roofline import sfu_limit
    from .runner import RunOptions, Task, _record, run

    dev = device()
    limit = sfu_limit(dev, measure=True)
    emit({"type": "sfu_limit", "data": limit.as_dict() if limit else None})
    fast = tuple(args.fast_backends)
    for item in plan.HEADLINE:
        case = item.dry if args.dry_run else item.case
        command = f"{args.command} (speed: {item.case.label()})"
        if case is None:
            for name in item.baselines:
                rec = _record(Task(item.case, name, "baseline"), status=item.dry_note)
                emit({"type": "bench", "group": item.group, "command": command, "record": rec})
            continue
        backends = fast if item.fast else ()
        if item.triton_only and dev.type == "cuda":
            backends = tuple(b for b in backends if b == "triton")
        opts = RunOptions(device=dev, timing=_timing(args.dry_run), backends=backends,
                          baselines=item.baselines, memory_cap_bytes=_memory_cap(dev),
                          pipeline_model=plan.DRY_PIPELINE_MODEL if args.dry_run else plan.PIPELINE_MODEL,
                          progress=False)
        for rec in run([case], opts, limit):
            emit({"type": "bench", "group": item.group, "command": command, "record": rec})
    return 0


def _ms(event, *names) -> float | None:
    for n in names:
        value = getattr(event, n, None)
        if value is not None:
            return round(value / 1e3, 4)  # profiler times are microseconds
    return None


def profile(args) -> int:
    from torch.profiler import ProfilerActivity

    from . import impls
    from .inputs import make_input_sets

    dev = device()
    case = plan.DRY_PROFILE_CASE if args.dry_run else plan.PROFILE_CASE
    usable = impls.usable_backends(dev, torch.float32)
    backend = next((b for b in args.fast_backends if usable.get(b) is None), "reference")
    inputs = make_input_sets(case, dev)[0]
    fn = impls.op_callable(case.op, backend, "auto")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    fn(inputs), fn(inputs), sync()  # compiled and warm before the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(plan.PROFILE_CALLS):
            fn(inputs)
        sync()
    averages = prof.key_averages()
    key = "self_cpu_time_total"
    if dev.type == "cuda":  # torch >= 2.4 names device times "device"; older releases "cuda"
        key = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    rows = []
    for e in sorted(averages, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:plan.PROFILE_ROWS]:
        rows.append({"name": e.key, "calls": e.count,
                     "self_device_ms": _ms(e, "self_device_time_total", "self_cuda_time_total"),
                     "self_cpu_ms": _ms(e, "self_cpu_time_total")})
    table = averages.table(sort_by=key, row_limit=plan.PROFILE_ROWS, max_name_column_width=80)
    Path(args.out, "profile.txt").write_text(f"{case.label()} backend={backend}, {plan.PROFILE_CALLS} calls\n{table}\n")
    emit({"type": "profile", "backend": backend, "case": case.label(), "calls": plan.PROFILE_CALLS,
          "sorted_by": key, "rows": rows})
    return 0


STAGES = {"build": build, "speed": speed, "profile": profile}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--fast-backends", type=lambda s: [x for x in s.split(",") if x], default=[])
    parser.add_argument("--command", default="scripts/gpu_check.sh", help="the command to quote beside each number")
    args = parser.parse_args(argv)
    return STAGES[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
