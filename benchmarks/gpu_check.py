"""The GPU acceptance check (``scripts/gpu_check.sh``): versions, correctness on the device,
the headline speed table (forwards, then forward + backward) and a kernel profile in about 6
minutes, each stage in its own process with its own time limit, results written as they arrive.

    python -m cdam_fast.benchmarks.gpu_check [--out DIR] [--dry-run] [--stages LIST] [--budget-s S]
    python -m cdam_fast.benchmarks.gpu_check --update-results DIR/results.json   # into benchmarks/RESULTS.md

The output folder (``--out``, else $CDAM_GPU_CHECK_OUT, else ``gpu_check_out/<timestamp>``; never
a folder holding files) gets at most six files, within the device tool's eight: results.json
(failures first), gpu_block.md (the Markdown block for benchmarks/RESULTS.md), progress.jsonl
(every record as it arrived: what a killed run keeps), check.log, tests.log, profile.txt.
``--dry-run`` runs every stage at tiny sizes (on CPU: Triton through its interpreter) and is
what CI runs. The stages, limits, selections and cases are in gpu_check_plan.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import gpu_check_markdown as markdown
from . import gpu_check_plan as plan
from .gpu_check_progress import PROGRESS_ENV, STAGE_ENV, append, read
from .gpu_check_results import assemble
from .report import OutputDirError, make_run_dir

OUT_ENV = "CDAM_GPU_CHECK_OUT"
NO_BUILD_ENV = "CDAM_FAST_NO_BUILD"  # extension_build's switch: no stage but the build compiles
STAGE_NAMES = ("versions", "build", *(f"tests:{s.name}" for s in plan.SELECTIONS), "speed", "profile")
PROGRESS_PLUGIN = "cdam_fast.benchmarks.gpu_check_progress"
PYTHON = "python"  # how commands are quoted in the results; run with sys.executable


def repo_root() -> Path:
    """The source checkout this package was installed from (editable): tests/ must be there."""
    import cdam_fast

    root = Path(cdam_fast.__file__).resolve().parent.parent
    if not (root / "tests" / "conftest.py").exists():
        raise SystemExit(f"gpu_check: needs a source checkout with tests/ (cdam_fast is imported from {root}); "
                         "install it with pip install -e .")
    return root


# Lines of a stage's log that report an error although the stage may exit 0 (a profiler's or a
# library's own logging, a traceback it caught): named in the summary beside "ok".
_LOGGED_ERROR = re.compile(r"^(ERROR|FATAL|CRITICAL)\b|^Traceback \(most recent call last\)")
MAX_LOGGED = 5


def logged_errors(log: Path, start: int = 0) -> list[str]:
    """The error lines (see _LOGGED_ERROR) of `log` from byte `start` on, at most MAX_LOGGED."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line.strip()[:300] for line in text.splitlines() if _LOGGED_ERROR.match(line)][:MAX_LOGGED]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_limited(proc: subprocess.Popen, limit_s: float) -> int | None:
    """The exit code, or None after killing the process group at the limit."""
    try:
        return proc.wait(timeout=max(0.0, limit_s))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None


class Check:
    def __init__(self, args, out: Path, root: Path):
        self.args, self.out, self.root = args, out, root
        self.dry_run = args.dry_run
        self.started = time.time()
        self.deadline = self.started + args.budget_s
        # A budget above the default stretches every stage's limit alike (a loaded CI machine);
        # a smaller one (rerunning one stage) keeps them.
        self.scale = max(1.0, args.budget_s / (plan.DRY_BUDGET_S if args.dry_run else plan.BUDGET_S))
        self.progress = out / "progress.jsonl"
        self.stages: list[dict] = []
        self.children: list[subprocess.Popen] = []
        self.build_proc, self.build_started, self.build_limit = None, 0.0, 0.0
        self.build_ok: bool | None = None  # None: not run
        self.gpu = self._has_gpu()
        self.native = "cuda" if self.gpu else "cpu"
        self.command = shlex.join(["scripts/gpu_check.sh", *args.argv])
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **{PROGRESS_ENV: str(self.progress)})
        self.env[NO_BUILD_ENV] = "1"  # until the build stage has built (or failed to build) the extension
        if not self.gpu:
            self.env.setdefault("TRITON_INTERPRET", "1")

    @staticmethod
    def _has_gpu() -> bool:
        import torch

        return torch.cuda.is_available()

    # -------------------------------------------------------------- bookkeeping

    def left(self) -> float:
        return self.deadline - time.time()

    def limit(self, name: str, own: float) -> float | None:
        """The stage's limit within the budget left (less what later stages are guaranteed), or
        None (the stage is recorded as not run)."""
        later = STAGE_NAMES[STAGE_NAMES.index(name) + 1:]
        kept = sum(self.scaled(plan.RESERVED_S[s]) for s in later
                   if s in plan.RESERVED_S and s in self.args.stages)
        left = self.left() - kept
        if left < plan.MIN_STAGE_S:
            self.record(name, f"not run: {max(left, 0):.0f} s left of the {self.args.budget_s:.0f} s budget "
                              "(after the time kept for later stages)")
            return None
        return min(own, left)

    def record(self, name: str, status: str, seconds: float = 0.0, limit_s: float | None = None,
               command: str = "", what: str = "", logged: list | None = None) -> None:
        self.stages.append({"name": name, "status": status, "seconds": round(seconds, 1), "limit_s": limit_s,
                            "command": command, "what": what, "logged_errors": list(logged or [])})
        self.log(f"[{name}] {status} ({seconds:.0f} s)" + (f"; logged: {logged[0]}" if logged else ""))
        self.write_results()

    def log(self, line: str) -> None:
        print(f"gpu_check: {line}", flush=True)
        with open(self.out / "check.log", "a") as f:
            f.write(line + "\n")

    def meta(self) -> dict:
        return {"dry_run": self.dry_run, "device": "cuda" if self.gpu else "cpu", "command": self.command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "wall_s": round(time.time() - self.started, 1), "budget_s": self.args.budget_s,
                "out": str(self.out)}

    def results(self) -> dict:
        return assemble(read(self.progress), self.stages, self.meta())

    def write_results(self) -> None:
        results = self.results()
        (self.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (self.out / "gpu_block.md").write_text(markdown.render(results))

    # -------------------------------------------------------------- processes

    def spawn(self, name: str, cmd: list[str], log_name: str, env: dict | None = None) -> subprocess.Popen:
        env = dict(env or self.env, **{STAGE_ENV: name})
        with open(self.out / log_name, "a") as log:
            log.write(f"\n===== [{name}] {shlex.join(cmd)}\n")
            log.flush()
            # Own process group (same session): a time limit kills the stage with its children.
            argv = [sys.executable if cmd[0] == PYTHON else cmd[0], *cmd[1:]]
            proc = subprocess.Popen(argv, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=os.setpgrp)
        self.children.append(proc)
        return proc

    def run_stage(self, name: str, cmd: list[str], own_limit: float, log_name: str = "check.log",
                  what: str = "", env: dict | None = None) -> int | None:
        limit_s = self.limit(name, own_limit)
        if limit_s is None:
            return None
        t0 = time.time()
        log = self.out / log_name
        start = log.stat().st_size if log.exists() else 0
        code = wait_limited(self.spawn(name, cmd, log_name, env), limit_s)
        seconds = time.time() - t0
        status = self._status(code, limit_s, log_name)
        # pytest's output is judged by its test records; other stages by their exit code and these lines
        logged = logged_errors(log, start) if log_name == "check.log" else []
        self.record(name, status, seconds, round(limit_s, 1), shlex.join(cmd), what, logged)
        return code

    def _status(self, code, limit_s, log_name) -> str:
        if code is None:
            return f"killed at its time limit of {limit_s:.0f} s (records so far kept)"
        if code == 0:
            return "ok"
        tail = (self.out / log_name).read_text().strip().splitlines()[-1:] or [""]
        return f"failed: exit code {code}: {tail[0][:300]}"

    def stage_cmd(self, stage: str) -> list[str]:
        cmd = [PYTHON, "-m", "cdam_fast.benchmarks.gpu_check_stages", stage, "--out", str(self.out),
               "--command", self.command]
        if self.dry_run:
            cmd.append("--dry-run")
        fast = ["triton"] + ([self.native] if self.build_ok else [])
        return cmd + ["--fast-backends", ",".join(fast)]

    def scaled(self, pair: tuple) -> float:
        """The (GPU, dry run) seconds that apply, stretched by a larger budget."""
        gpu, dry = pair
        return (dry if self.dry_run else gpu) * self.scale

    def own_limit(self, stage: str) -> float:
        return self.scaled(plan.STAGE_LIMITS_S[stage])

    # -------------------------------------------------------------- stages

    def versions(self) -> None:
        from .gpu_check_stages import versions_info

        t0 = time.time()
        try:
            append(self.progress, {"stage": "versions", "type": "versions", "data": versions_info()})
            status = "ok"
        except Exception as e:  # noqa: BLE001 - reported, and the other stages still run
            status = f"failed: {type(e).__name__}: {str(e)[:300]}"
        self.record("versions", status, time.time() - t0)

    def start_build(self) -> None:
        limit_s = self.limit("build", self.own_limit("build"))
        if limit_s is None:
            return
        env = {k: v for k, v in self.env.items() if k != NO_BUILD_ENV}
        if self.gpu:
            env.setdefault("MAX_JOBS", "8")  # leave cores to the Triton compiles of the tests running meanwhile
        self.build_proc = self.spawn("build", self.stage_cmd("build"), "check.log", env)
        self.build_started, self.build_limit = time.time(), limit_s

    def build(self) -> None:
        """Wait for the background build, or (on CPU, where two processes compete for a few cores)
        build now; once per run."""
        if self.build_proc is None and self.build_ok is None and not any(s["name"] == "build" for s in self.stages):
            self.start_build()
        if self.build_proc is None:
            return
        proc, self.build_proc = self.build_proc, None
        remaining = self.build_limit - (time.time() - self.build_started)
        code = wait_limited(proc, remaining)
        seconds = time.time() - self.build_started
        if code is None:
            status = (f"skipped: the {self.native} extension build took longer than {self.build_limit:.0f} s "
                      "and was abandoned; its backend is left out")
        else:
            status = "ok"
        if code not in (None, 0):
            # a failed build is one failure: its own record's, with the compiler's first error line
            recorded = any(r.get("type") == "build" for r in read(self.progress))
            status = (f"skipped: the build failed (exit code {code}); its backend is left out" if recorded
                      else self._status(code, self.build_limit, "check.log"))
        self.build_ok = code == 0
        if self.build_ok:
            self.env.pop(NO_BUILD_ENV, None)  # later stages load the cached build
        self.record("build", status, seconds, round(self.build_limit, 1), shlex.join(proc.args))

    def selection_cmd(self, sel: plan.Selection) -> list[str] | None:
        args = list(sel.dry_args if self.dry_run else sel.args)
        files = sorted({str(p.relative_to(self.root)) for g in sel.globs for p in (self.root / "tests").glob(g)})
        if sel.globs and not files:
            return None
        args = [a.replace("{native}", self.native) for a in files + args]
        cmd = [PYTHON, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", PROGRESS_PLUGIN]
        if not self.dry_run and sel.workers > 1 and _has_xdist():
            cmd += ["-n", str(sel.workers)]
        return cmd + args

    def run_selection(self, sel: plan.Selection) -> None:
        name = f"tests:{sel.name}"
        what = sel.what.replace("{native}", self.native)
        if sel.needs_build:
            self.build()
            if not self.build_ok:
                self.record(name, f"skipped: the {self.native} extension is not built in this run", what=what)
                return
        cmd = self.selection_cmd(sel)
        if cmd is None:
            self.record(name, f"skipped: no test file matches {', '.join('tests/' + g for g in sel.globs)} yet",
                        what=what)
            return
        code = self.run_stage(name, cmd, self.scaled(sel.limit_s), "tests.log", what)
        if code == 5 and self.stages[-1]["name"] == name:  # pytest: no tests collected
            self.stages[-1]["status"] = ("skipped: the selection matched no test yet" if sel.none_ok
                                         else "failed: the selection matched no test (renamed tests?)")
            self.write_results()

    def run(self) -> int:
        wanted = set(self.args.stages)
        self.log(f"{'dry run' if self.dry_run else 'GPU check'} on {'cuda' if self.gpu else 'cpu'} into {self.out}; "
                 f"budget {self.args.budget_s:.0f} s")
        self.write_results()
        try:
            if "versions" in wanted:
                self.versions()
            needs_build = wanted & {"build", "tests:native", "speed", "profile"}
            if needs_build and self.gpu:
                self.start_build()  # in the background: nvcc runs on the host's cores while the Triton tests run
            for sel in plan.SELECTIONS:
                if f"tests:{sel.name}" in wanted:
                    self.run_selection(sel)
            if needs_build:
                self.build()
            for stage in ("speed", "profile"):
                if stage in wanted:
                    self.run_stage(stage, self.stage_cmd(stage), self.own_limit(stage))
        finally:  # also on SIGTERM: no stage outlives the check, and what was measured is written
            for proc in self.children:
                if proc.poll() is None:
                    _kill_group(proc)
            self.write_results()
        results = self.results()
        print()
        print(markdown.summary(results))
        return 1 if results["failures"] else 0


def _has_xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


def _stages(text: str) -> tuple:
    names = [x.strip() for x in text.split(",") if x.strip()]
    out = []
    for n in names:
        matched = [s for s in STAGE_NAMES if s == n or s.startswith(n + ":")]
        if not matched:
            raise argparse.ArgumentTypeError(f"--stages: unknown stage {n!r}; choose from {', '.join(STAGE_NAMES)} "
                                             "(or 'tests' for every selection)")
        out += matched
    return tuple(out)


def describe(dry_run: bool) -> str:
    """What the check runs, stage by stage ({native}: cuda on a GPU, cpu in a CPU dry run)."""
    pick = 1 if dry_run else 0
    lines = [f"budget {plan.DRY_BUDGET_S if dry_run else plan.BUDGET_S:.0f} s; stages in order:",
             "versions", f"build (limit {plan.STAGE_LIMITS_S['build'][pick]:.0f} s)"]
    for sel in plan.SELECTIONS:
        args = sel.dry_args if dry_run else sel.args
        words = [f"tests/{g}" for g in sel.globs] + [shlex.quote(a) for a in args]
        lines.append(f"tests:{sel.name} (limit {sel.limit_s[pick]:.0f} s): pytest {' '.join(words)}")
    lines.append(f"speed (limit {plan.STAGE_LIMITS_S['speed'][pick]:.0f} s):")
    for h in plan.HEADLINE:
        case = h.dry if dry_run else h.case
        what = ("triton only" if h.triton_only else "fast backends") if h.fast else "no fast backend"
        lines.append(f"  [{h.group}] {case.label() if case else h.case.label() + ': ' + h.dry_note} "
                     f"modes={','.join(h.case.modes)}; {what}; baselines: {', '.join(h.baselines) or 'none'}")
    profile = plan.DRY_PROFILE_CASE if dry_run else plan.PROFILE_CASE
    lines.append(f"profile (limit {plan.STAGE_LIMITS_S['profile'][pick]:.0f} s): {profile.label()}, "
                 f"{plan.PROFILE_CALLS} calls")
    return "\n".join(lines)


def update_results(results_json: Path, results_md: Path) -> int:
    results = json.loads(results_json.read_text())
    try:
        text = markdown.splice(results_md.read_text(), markdown.render(results), results)
    except markdown.SpliceError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    results_md.write_text(text)
    print(f"gpu_check: replaced the GPU block of {results_md} with {results_json}'s")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help=f"output folder (default ${OUT_ENV}, else gpu_check_out/<time>); "
                                                    "must not hold files")
    parser.add_argument("--dry-run", action="store_true", help="every stage at tiny sizes (CPU: Triton interpreted)")
    parser.add_argument("--stages", type=_stages, default=STAGE_NAMES,
                        help=f"comma-separated subset of {', '.join(STAGE_NAMES)} ('tests' = every selection)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds for the whole check (default {plan.BUDGET_S:.0f}, dry run "
                             f"{plan.DRY_BUDGET_S:.0f}); a larger budget stretches every stage's limit in proportion")
    parser.add_argument("--update-results", metavar="RESULTS_JSON", type=Path, default=None,
                        help="splice that run's Markdown block into --results-md and exit (GPU runs only)")
    parser.add_argument("--results-md", type=Path, default=None, help="default: benchmarks/RESULTS.md of the checkout")
    parser.add_argument("--list", action="store_true", help="print what each stage would run and exit")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.update_results is not None:
        return update_results(args.update_results, args.results_md or repo_root() / "benchmarks" / "RESULTS.md")
    if args.budget_s is None:
        args.budget_s = plan.DRY_BUDGET_S if args.dry_run else plan.BUDGET_S
    if args.list:
        print(describe(args.dry_run))
        return 0
    root = repo_root()
    try:
        out = make_run_dir(args.out or os.environ.get(OUT_ENV) or None, root / "gpu_check_out")
    except OutputDirError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    check = Check(args, out.resolve(), root)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: children killed, results written
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
