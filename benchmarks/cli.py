"""`cdam-fast bench`: run a named set of benchmark cases, print a table, write JSON / CSV / plots.

Examples::

    cdam-fast bench --quick                      # every op at tiny sizes (CPU smoke run, < 2 min)
    cdam-fast bench --set gpu-full               # the whole GPU measurement
    cdam-fast bench --set ops --set lowmem --backends triton --baselines published,compile
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from . import impls, plots, report
from .cases import SETS, build_cases
from .roofline import sfu_limit
from .runner import RunOptions, run
from .timing import TimingOptions

# CPU runs skip cases above this many divergence elements unless told otherwise: the torch
# reference evaluates roughly 0.1-1 G elements/s on a few cores.
CPU_DEFAULT_MAX_ELEMENTS = 2e9


def _csv_list(choices, what):
    def parse(text: str) -> tuple:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        if names == ("none",):
            return ()
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list from {', '.join(choices)} "
                                             f"(or 'none'), got {text!r}")
        return names
    return parse


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sets = "; ".join(f"{name}: {help_}" for name, (_, help_) in SETS.items())
    parser.add_argument("--set", dest="sets", action="append", choices=list(SETS), metavar="NAME",
                        help=f"case set to run (repeatable). {sets}. Default: quick on CPU, ops on GPU")
    parser.add_argument("--quick", action="store_true",
                        help="the 'quick' set with short timing loops (under two minutes on a 2-core CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device to benchmark on (auto: cuda when available)")
    parser.add_argument("--out", default=None,
                        help="run directory (must not exist or be empty; default bench_out/<timestamp>)")
    parser.add_argument("--out-root", default="bench_out", help="parent of the default run directory")
    parser.add_argument("--backends", type=_csv_list(impls.FAST_BACKENDS, "--backends"), default=None,
                        help="fast backends to run (default: every one usable on the device)")
    parser.add_argument("--baselines", type=_csv_list(impls.BASELINES, "--baselines"), default=impls.BASELINES,
                        help="baselines to run beside them (default: all; 'none' for none)")
    parser.add_argument("--max-elements", type=_positive(float), default=None,
                        help="skip cases with more divergence elements (B N^2 C per scale) than this "
                             f"(default: {CPU_DEFAULT_MAX_ELEMENTS:.0e} on CPU, unlimited on GPU)")
    parser.add_argument("--max-case-seconds", type=_positive(float), default=30.0,
                        help="a case whose second call (the first one compiles) takes longer than this is "
                             "reported from that single call")
    parser.add_argument("--target-seconds", type=_positive(float), default=None,
                        help="time each measurement's repetitions aim to fill")
    parser.add_argument("--pipeline-model", default="ViT-B-16", help="open_clip model for the pipeline cases")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--threads", type=_positive(int), default=None,
                        help="torch CPU threads for the run (default: physical cores, or OMP_NUM_THREADS); 1 keeps a "
                             "loaded machine from stalling in OpenMP barriers")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-roofline", action="store_true", help="skip the lg2 microbenchmark (GPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="print the cases of the chosen sets and exit")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run the benchmark suite",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cdam-fast bench: --device cuda requested but torch.cuda.is_available() is False")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _timing(device: torch.device, quick: bool, target: float | None, max_case_s: float) -> TimingOptions:
    if device.type == "cuda":
        opts = TimingOptions(warmup_s=0.025, target_s=0.1, min_reps=10, max_reps=500)
    elif quick:
        opts = TimingOptions(target_s=0.04, min_reps=3, max_reps=15)
    else:
        opts = TimingOptions(target_s=0.5, min_reps=5, max_reps=50)
    if target is not None:
        opts.target_s = target
    opts.max_case_s = max_case_s
    return opts


def _memory_cap(device: torch.device) -> int | None:
    """CPU only: half the available RAM (a broadcast baseline past it would swap, not fail)."""
    if device.type == "cuda":
        return None  # the GPU allocator raises a clean out-of-memory error instead
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30


def run_from_args(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back


def _run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    names = list(args.sets or [])
    if args.quick and "quick" not in names:
        names.insert(0, "quick")
    if not names:
        names = ["quick"] if device.type == "cpu" else ["ops"]
    cases = build_cases(names)
    if args.list:
        for case in cases:
            print(case.label() + ("" if case.modes == ("auto",) else f"  modes={','.join(case.modes)}"))
        return 0
    try:
        run_dir = report.make_run_dir(args.out, args.out_root)
    except report.OutputDirError as e:
        print(f"cdam-fast bench: {e}", file=sys.stderr)
        return 2
    quick = names == ["quick"] or args.quick
    opts = RunOptions(
        device=device, timing=_timing(device, quick, args.target_seconds, args.max_case_seconds),
        backends=args.backends, baselines=args.baselines,
        max_elements=args.max_elements if args.max_elements is not None else (
            CPU_DEFAULT_MAX_ELEMENTS if device.type == "cpu" else None),
        memory_cap_bytes=_memory_cap(device), pipeline_model=args.pipeline_model, seed=args.seed,
        progress=not args.no_progress, quick="quick" in names,
    )
    started = time.time()
    limit = sfu_limit(device, measure=not args.no_roofline)
    env = report.environment(device)
    print(f"cdam-fast bench: sets {', '.join(names)} on {env['device_name']} ({device}); "
          f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}")
    print(limit.summary() if limit else "SFU roofline: n/a on CPU")
    records = run(cases, opts, limit)
    meta = {
        **env,
        "command": shlex.join(sys.argv),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"},
        "sets": names,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": None,
        "timing": vars(opts.timing),
        "peak_memory_source": ("torch.cuda.max_memory_allocated minus memory allocated before the call"
                               if device.type == "cuda"
                               else "growth of the process RSS high-water mark over one call, from a trimmed heap"),
        "sfu_limit": limit.as_dict() if limit else None,
    }
    print()
    print(report.format_table(records))
    print()
    print(report.format_roofline(records))
    print()
    print(report.format_speedups(report.speedups(records)))
    written = []
    if not args.no_plots:
        written += plots.write_plots(records, run_dir)
    meta["wall_s"] = round(time.time() - started, 2)
    report.write_json(run_dir / "results.json", meta, records)
    report.write_csv(run_dir / "results.csv", records)
    written = [run_dir / "results.json", run_dir / "results.csv"] + written
    print("\nwrote " + ", ".join(str(p) for p in written))
    errors = [r for r in records if r["status"].startswith("error")]
    if errors:
        print(f"cdam-fast bench: {len(errors)} measurement(s) failed with an error (see the status column)",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdam_fast.benchmarks", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from cdam_fast._threads import configure_threads

    configure_threads()  # as `cdam-fast bench` does; --threads still overrides
    return run_from_args(args)
