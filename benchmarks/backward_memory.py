"""Peak memory of one forward + backward step, each implementation in a fresh process.

    python -m cdam_fast.benchmarks.backward_memory [--op jsd_attention] [--N 784 --C 101 --D 768]

On CPU the bench's per-call peak (growth of the RSS high-water mark) misses memory the allocator
reuses from earlier calls; a fresh process per implementation does not: it reports the growth
of ru_maxrss over one step, after the inputs exist and one small warm-up step has loaded the
kernels. Same implementations as `cdam-fast bench --set backward` (benchmarks/backward.py).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

IMPLS = ("cpu", "reference", "compile")


def _child(op: str, impl: str, N: int, C: int, D: int) -> dict:
    import torch

    from cdam_fast.benchmarks import backward
    from cdam_fast.benchmarks.cases import Case
    from cdam_fast.benchmarks.inputs import make_input_set

    torch.set_num_threads(1)
    step = backward.op_callable(op, impl, None)
    warm = Case(op, N=16, C=C, D=D if op != "pairwise_jsd" else 0)
    step(make_input_set(warm, torch.device("cpu"), torch.Generator().manual_seed(1)))
    inputs = make_input_set(Case(op, N=N, C=C, D=D if op != "pairwise_jsd" else 0), torch.device("cpu"),
                            torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    step(inputs)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"op": op, "impl": impl, "peak_growth_mib": (after - before) / 1024, "first_step_s": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", action="append", default=None, help="op(s) (default: cdam_attention, jsd_attention)")
    ap.add_argument("--impl", action="append", default=None, help=f"implementation(s) (default: {', '.join(IMPLS)})")
    ap.add_argument("--N", type=int, default=784)
    ap.add_argument("--C", type=int, default=101)
    ap.add_argument("--D", type=int, default=768)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ops = args.op or ["cdam_attention", "jsd_attention"]
    if args.child:
        print(json.dumps(_child(ops[0], args.impl[0], args.N, args.C, args.D)))
        return 0
    for op in ops:
        for impl in args.impl or IMPLS:
            cmd = [sys.executable, "-m", "cdam_fast.benchmarks.backward_memory", "--child", "--op", op, "--impl", impl,
                   "--N", str(args.N), "--C", str(args.C), "--D", str(args.D)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            print(lines[-1] if res.returncode == 0 and lines else json.dumps(
                {"op": op, "impl": impl, "error": res.stderr.strip().splitlines()[-1:]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
