"""J error on flat, CLIP-like class distributions, per backend that runs here (docs/ops.md, "Accuracy").

Rows are softmax(z0 + sigma z_i) with one shared z0 (a flat distribution over C' classes) and
sigma set so that pairs differ by ~1e-3 nats: the regime where the entropy form
J = (ln2/2)(r_i + r_j - sum s log2 s) cancels numbers near log2 C'. Reports the max and median
absolute error of float32 J against the float64 reference, and the resulting map error.

    python benchmarks/jsd_accuracy.py [--classes 101 1000] [--n 64] [--backends reference cpu triton]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def flat_distributions(n: int, c: int, seed: int = 0, sigma: float = 0.06) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(c, generator=g, dtype=torch.float64) * 0.3
    z = torch.randn(1, n, c, generator=g, dtype=torch.float64) * sigma
    return torch.softmax(z0 + z, -1).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[101, 1000])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--backends", nargs="+", default=["reference", "cpu", "triton"])
    args = ap.parse_args(argv)
    if "triton" in args.backends and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import cdam_fast as cf
    from cdam_fast import reference as ref
    from cdam_fast.dispatch import available_backends

    print(f"{'backend':<10} {'C':>5} {'J span':>9} {'max |dJ|':>10} {'median |dJ|':>12} {'max |dA|':>10}")
    for c in args.classes:
        p = flat_distributions(args.n, c)
        want = ref.pairwise_jsd(p.double())
        want_map = ref.cdam_map(p.double())
        span = (want.amax(-1) - want.amin(-1)).median().item()
        for b in args.backends:
            dev = "cuda" if (b in ("cuda",) or (b == "triton" and torch.cuda.is_available())) else "cpu"
            why = available_backends(dev, torch.float32).get(b)
            if why is not None:
                print(f"{b:<10} {c:>5}  unavailable: {why}")
                continue
            j = cf.pairwise_jsd(p.to(dev), backend=b).cpu().double()
            a = cf.cdam_map(p.to(dev), backend=b).cpu().double()
            err = (j - want).abs()
            print(f"{b:<10} {c:>5} {span:>9.2e} {err.max().item():>10.2e} {err.median().item():>12.2e} "
                  f"{(a - want_map).abs().max().item():>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
