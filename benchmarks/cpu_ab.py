"""Interleaved A/B of two builds of a CPU kernel source, both loaded in one process, one thread.

    python benchmarks/cpu_ab.py DIR_A DIR_B [--forward] [--pairs 15]
    python benchmarks/cpu_ab.py DIR_A DIR_B --accuracy

DIR_A and DIR_B each hold a copy of csrc/ (e.g. `git archive <commit> csrc | tar -x -C DIR_A`).
Default: the fused CPU backward (cdam_cpu_backward.cpp: attention_backward of cdam_attention and
jsd_attention, self keys); --forward: the forward (cdam_cpu.cpp: pairwise_jsd, cdam_attention in
recompute mode, jsd_attention). N = 784, C' = 101, D = 768. Calls alternate A, B, A, B, ...; on a
shared machine only the paired ratios B / A mean much: their median and IQR are printed with
each side's median time (IQR). --accuracy: instead of timing, each backward build's gradients
against the float64 reference formulas (cdam_fast/opdefs/cdam.py, jsd_attention.py) on a few small cases,
max error relative to the largest gradient entry, as tests/test_autograd.py measures it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils import cpp_extension

from cdam_fast.backends import cpu_backward as cb
from cdam_fast.backends import extension_build as eb
from cdam_fast.centring import centring_weights, row_terms
from cdam_fast.opdefs import cdam, jsd_attention


def _load(src_dir: str, source: str, tag: str):
    return cpp_extension.load(name=f"cpu_ab_{tag}_{os.getpid()}", sources=[os.path.join(src_dir, source)],
                              extra_cflags=list(eb.cpu_spec().cflags), extra_ldflags=["-fopenmp"],
                              extra_include_paths=[src_dir])


def _calls(forward: bool, N=784, C=101, D=768):
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, N, C, generator=gen) * 2, -1)
    v = torch.randn(1, N, D, generator=gen)
    if forward:
        return {"pairwise_jsd": lambda m: [m.pairwise_jsd(p)],
                "cdam_attention (recompute)": lambda m: [m.cdam_attention(p, v, 10.0, False)],
                "jsd_attention": lambda m: [m.jsd_attention(p, v, 0.1)]}
    g = torch.randn(1, N, D, generator=gen)
    w = centring_weights(p, None)
    pp, lp = cb._rows(p, w)
    kT, lkT, rk = cb._keys(p, w)
    rp = row_terms(p, w)
    return {name: (lambda m, kind=kind, param=param: m.attention_backward(pp, lp, rp, kT, lkT, rk, w, v, g, kind,
                                                                          param, True))
            for name, kind, param in (("cdam_attention backward", 1, 10.0), ("jsd_attention backward", 0, 0.1))}


def _accuracy(mods) -> None:
    """(N, C, D, logit scale): paper-like classes, peaky rows with one-hot ones, one class, few classes."""
    for seed, (N, C, D, sharp) in enumerate([(196, 101, 64, 2.0), (150, 21, 16, 6.0), (100, 1, 8, 1.0),
                                             (120, 7, 8, 4.0)]):
        gen = torch.Generator().manual_seed(seed)
        p = torch.softmax(torch.randn(1, N, C, generator=gen) * sharp, -1)
        if C > 1:  # one-hot rows: zeros in p, and duplicate rows (exact ties of J)
            p[0, :5] = 0
            p[0, :5, 0] = 1
        v, g = torch.randn(1, N, D, generator=gen), torch.randn(1, N, D, generator=gen)
        w = centring_weights(p, None)
        pp, lp = cb._rows(p, w)
        kT, lkT, rk = cb._keys(p, w)
        rp = row_terms(p, w)
        for kind, param, name in ((1, 10.0, "cdam_attention"), (0, 0.1, "jsd_attention")):
            pd, vd, gd = p.double(), v.double(), g.double()
            expected = (cdam.cdam_attention_backward(gd, pd, vd, param) if kind else
                        jsd_attention.jsd_attention_backward(gd, pd, vd, param))[:2]
            line = []
            for label, m in zip("AB", mods):
                T, U, gv = m.attention_backward(pp, lp, rp, kT, lkT, rk, w, v, g, kind, param, True)
                gp = cb._finish(T, p) + cb._finish(U[:, :, :N].transpose(1, 2), p)
                errs = [((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-3)).item()
                        for a, e in zip((gp, gv), expected)]
                line.append(f"{label}: p {errs[0]:.2e}, v {errs[1]:.2e}" + (f", p exactly 0: {bool((gp == 0).all())}"
                                                                            if C == 1 else ""))
            print(f"{name} N={N} C={C} D={D} logit scale {sharp}: " + "; ".join(line), flush=True)


def _iqr(x):
    q = statistics.quantiles(x, n=4)
    return q[0], q[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir_a")
    ap.add_argument("dir_b")
    ap.add_argument("--forward", action="store_true", help="time the forward (cdam_cpu.cpp) instead")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--accuracy", action="store_true", help="backward gradient errors instead of times")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    source = "cdam_cpu.cpp" if args.forward else "cdam_cpu_backward.cpp"
    mods = [_load(args.dir_a, source, "a"), _load(args.dir_b, source, "b")]
    if args.accuracy:
        _accuracy(mods)
        return 0
    for name, call in _calls(args.forward).items():
        outs = [call(m) for m in mods]
        diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*outs))
        times = [[], []]
        for _ in range(args.pairs):
            for k, m in enumerate(mods):
                t0 = time.perf_counter()
                call(m)
                times[k].append(time.perf_counter() - t0)
        ratios = [b / a for a, b in zip(*times)]
        (a0, a1), (b0, b1), (r0, r1) = _iqr(times[0]), _iqr(times[1]), _iqr(ratios)
        print(f"{name}: A {statistics.median(times[0]) * 1e3:.1f} ms (IQR {(a1 - a0) * 1e3:.1f}), "
              f"B {statistics.median(times[1]) * 1e3:.1f} ms (IQR {(b1 - b0) * 1e3:.1f}), B / A paired median "
              f"{statistics.median(ratios):.3f} (IQR {r0:.3f}-{r1:.3f}), {args.pairs} pairs; "
              f"max relative difference of the outputs {diff:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
