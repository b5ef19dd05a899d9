"""`cdam-fast demo`: the ops on random class distributions, checked against the reference."""
from __future__ import annotations

import time

import torch


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the ops on random inputs and compare them with the reference",
                       description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--grid", type=int, nargs=2, default=(14, 14), metavar=("H", "W"), help="patch grid (default 14 14)")
    p.add_argument("--classes", type=int, default=101, help="C' = classes + 80 augmented prompts (default 101)")
    p.add_argument("--dim", type=int, default=64, help="value width D (default 64)")
    p.add_argument("--backend", default="auto", help="auto, triton, cuda, cpu or reference")
    p.set_defaults(func=run)


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t) * 1e3


def run(args) -> int:
    import cdam_fast as cf
    from cdam_fast import reference
    from cdam_fast.dispatch import resolve

    dev = torch.device(args.device)
    h, w = args.grid
    gen = torch.Generator().manual_seed(0)
    sim = (0.2 * torch.randn(1, args.classes, h, w, generator=gen)).to(dev)
    p = torch.softmax(sim.flatten(2).transpose(1, 2) / 0.1, dim=-1)
    v = torch.randn(1, h * w, args.dim, generator=gen).to(dev)
    chosen = resolve(args.backend, dev, torch.float32).name
    print(f"cdam-fast {cf.__version__}: N = {h * w} patches, C' = {args.classes}, D = {args.dim}, "
          f"device {dev}, backend {args.backend!r} -> {chosen}")
    cases = [
        ("pairwise_jsd(p)", lambda b: cf.pairwise_jsd(p, backend=b), lambda: reference.pairwise_jsd(p.double())),
        ("cdam_map(p)", lambda b: cf.cdam_map(p, backend=b), lambda: reference.cdam_map(p.double())),
        ("cdam_attention(p, v)", lambda b: cf.cdam_attention(p, v, backend=b),
         lambda: reference.cdam_attention(p.double(), v.double())),
        ("multiscale_cdam_attention(sim, v)", lambda b: cf.multiscale_cdam_attention(sim, v, backend=b),
         lambda: reference.multiscale_cdam_attention(sim.double(), v.double())),
        ("jsd_attention(p, v)", lambda b: cf.jsd_attention(p, v, backend=b),
         lambda: reference.jsd_attention(p.double(), v.double())),
    ]
    print(f"{'op':36s} {'shape':>16s} {'ms':>9s} {'max |err| vs float64 reference':>32s}")
    for name, fast, ref in cases:
        fast(args.backend)  # warm-up: compiles kernels / builds extensions
        out, ms = _timed(lambda: fast(args.backend))
        err = (out.double() - ref()).abs().max().item()
        print(f"{name:36s} {str(tuple(out.shape)):>16s} {ms:9.2f} {err:32.2e}")
    return 0
