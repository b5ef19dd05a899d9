"""Peak memory of the reference-formula backward glue, each case in a fresh process.

    python -m cdam_fast.benchmarks.glue_memory [--N 1024 --N 2048] [--C 21] [--D 64]

Cases: ``cdam_map`` on ``cpu`` (the composite backward: J recomputed, min-max / expm1 adjoint,
fused divergence vector-Jacobian product) and ``cdam_attention`` on ``reference`` in recompute
mode with a 1 MiB budget (the reference backward formulas). Reports the growth of ru_maxrss
over the forward alone and over forward + backward, after the inputs exist and a small warm-up
step has loaded the kernels (the CPU allocator returns large blocks to the OS, so a fresh
process per case is needed: growth in one process misses reused memory). float32, 1 thread.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CASES = (("cdam_map", "cpu"), ("cdam_attention", "reference"))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(op: str, backend: str, N: int, C: int, D: int) -> dict:
    import torch

    import cdam_fast as cf

    torch.set_num_threads(1)
    kw = dict(mode="recompute", memory_budget=1 << 20) if op == "cdam_attention" else {}

    def step(n, backward):
        g = torch.Generator().manual_seed(0)
        p = torch.softmax(torch.randn(1, n, C, generator=g) * 3, -1).requires_grad_(True)
        v = torch.randn(1, n, D, generator=g)
        base = _rss_mib()
        out = getattr(cf, op)(p, v, backend=backend, **kw) if op == "cdam_attention" else \
            getattr(cf, op)(p, backend=backend)
        fwd = _rss_mib() - base
        if backward:
            out.backward(torch.ones_like(out))
        return fwd, _rss_mib() - base

    step(32, True)  # warm-up: extension load, allocator
    fwd, both = step(N, True)
    return {"op": op, "backend": backend, "N": N, "forward_mib": round(fwd, 1), "forward_backward_mib": round(both, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, action="append", default=None, help="grid size(s) (default: 1024, 2048)")
    ap.add_argument("--C", type=int, default=21)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--child", nargs=2, metavar=("OP", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = args.N or [1024, 2048]
    if args.child:
        print(json.dumps(_child(*args.child, sizes[0], args.C, args.D)))
        return 0
    for N in sizes:
        for op, backend in CASES:
            cmd = [sys.executable, "-m", "cdam_fast.benchmarks.glue_memory", "--child", op, backend,
                   "--N", str(N), "--C", str(args.C), "--D", str(args.D)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            print(lines[-1] if res.returncode == 0 and lines else json.dumps(
                {"op": op, "backend": backend, "N": N, "error": res.stderr.strip().splitlines()[-1:]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
