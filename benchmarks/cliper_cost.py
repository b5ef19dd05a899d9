"""CLIPer's cost beside MaskCLIP + CDAM, and CLIPer + CDAM with the CDAM map replacing vs
averaged with the fused map, side by side in one run on random ViT weights.

    python benchmarks/cliper_cost.py [--size 448] [--repeat 3] [--threads 2] [--device cpu]

Prints the median time of `Segmenter.encode_windows` on one crop per configuration, the
analytic size of the fused map (4 * heads * T^2 bytes per image, T = tokens + 1), and how far
the "average" variant's maps are from the "replace" ones (mean |difference| relative to the
mean map value, and the share of tokens whose arg-max class changes).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="ViT-B-16")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from cdam_fast.pipeline import Segmenter, load_clip
    from cdam_fast.pipeline.text import read_class_file

    bb = load_clip(args.model, None, args.device)
    classes = read_class_file("voc21")
    crops = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(bb.device)
    configs = [("maskclip + CDAM", dict(method="maskclip", cdam=True)),
               ("cliper", dict(method="cliper", cdam=False)),
               ("cliper + CDAM (replace)", dict(method="cliper", cdam=True, cdam_combine="replace")),
               ("cliper + CDAM (average)", dict(method="cliper", cdam=True, cdam_combine="average"))]
    maps = {}
    print(f"{args.model} random weights, {args.size}x{args.size} crop, device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, kw in configs:
        seg = Segmenter(classes, model=bb, templates="single", progress=False, **kw)
        seg.encode_windows(crops)  # warm-up (extension build, caches)
        times = []
        for _ in range(args.repeat):
            if bb.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            maps[name] = seg.encode_windows(crops)
            if bb.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(f"  {name:26s} median {statistics.median(times) * 1e3:8.1f} ms  (runs: "
              + ", ".join(f"{t * 1e3:.0f}" for t in times) + ")")
    T = (args.size // bb.patch_size[0]) * (args.size // bb.patch_size[1]) + 1
    print(f"  fused map per image: 4 * {bb.heads} * {T}^2 bytes = {4 * bb.heads * T * T / 2**20:.1f} MiB")
    a, r = maps["cliper + CDAM (average)"], maps["cliper + CDAM (replace)"]
    rel = float((a - r).abs().mean() / r.abs().mean())
    flips = float((a.argmax(1) != r.argmax(1)).float().mean())
    print(f"  average vs replace: mean |diff| / mean map = {rel:.3f}, arg-max changes at {100 * flips:.1f}% of tokens")


if __name__ == "__main__":
    main()
