"""What computing each image on its own costs: images/s of `Segmenter.predict_batch` (each
image's windows in forward passes of their own) against the former batching, which packed the
windows of consecutive images into full forward passes of `window_batch` (reproduced here on
the same segmenter, so both variants share the model, the images and the thread setting).
The variants alternate, repeat by repeat, so that load on a shared machine hits both alike.

    python -m cdam_fast.benchmarks.batch_invariance --threads 2 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch


def sample_photos(scale: int = 2) -> list:
    """scikit-image's chelsea, astronaut, coffee and rocket at 1/scale size (uint8 RGB)."""
    from PIL import Image
    from skimage import data

    out = []
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        im = Image.fromarray(getattr(data, name)())
        out.append(np.asarray(im.resize((im.width // scale, im.height // scale), Image.BILINEAR)))
    return out


def packed_labels(seg, images) -> list:
    """Label maps with the windows of all images packed into forward passes of window_batch
    (the former batching: a window's neighbours in a pass may belong to other images)."""
    items = [seg.preprocess(im) for im in images]
    crops, owners = [], []
    for ii, it in enumerate(items):
        h, w = it.layout.window
        for wi, (y, x) in enumerate(it.layout.boxes()):
            crops.append(it.pixels[:, y:y + h, x:x + w])
            owners.append((ii, wi))
    outs = [[None] * it.layout.count for it in items]
    shapes = {}
    for k, c in enumerate(crops):
        shapes.setdefault(tuple(c.shape), []).append(k)
    for ks in shapes.values():
        for j in range(0, len(ks), seg.window_batch):
            chunk = ks[j:j + seg.window_batch]
            logits = seg.encode_windows(torch.stack([crops[k] for k in chunk]))
            for k, lg in zip(chunk, logits):
                ii, wi = owners[k]
                outs[ii][wi] = lg
    from cdam_fast.pipeline.segmenter import ImageResult, _assembler

    labels = []
    for it, o in zip(items, outs):
        wl = torch.stack(o)
        result = ImageResult(wl, seg._threshold(wl), _assembler(it.layout, it.tokens, it.original, seg.device),
                             it.original)
        labels.append(seg.label_map(result))
    return labels


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window-batch", type=int, default=16)
    p.add_argument("--scale", type=int, default=2, help="photos at 1/scale size (default half size)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import open_clip

    from cdam_fast.pipeline import Segmenter

    photos = sample_photos(args.scale)
    seg = Segmenter("background,cat,person,rocket,cup", model=args.model, pretrained=None, device=args.device,
                    templates="single", background=None, window_batch=args.window_batch, progress=False,
                    cache_dir=False)
    windows = [seg.preprocess(p).layout.count for p in photos]
    variants = {"per image (now)": seg.predict_batch, "packed (former)": lambda ims: packed_labels(seg, ims)}
    for fn in variants.values():  # warm-up
        fn(photos[:1])
    times = {k: [] for k in variants}
    same = True
    for _ in range(args.repeats):
        for name, fn in variants.items():
            if seg.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            maps = fn(photos)
            if seg.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            if name.startswith("per image"):
                reference = maps
            else:
                same = same and all(a.tobytes() == b.tobytes() for a, b in zip(reference, maps))
    report = {
        "command": "python -m cdam_fast.benchmarks.batch_invariance " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {args.device}, {args.threads} threads",
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                     "python": platform.python_version()},
        "model": args.model, "photos": [list(p.shape[:2]) for p in photos], "windows": windows,
        "window_batch": args.window_batch,
        "images_per_s": {k: len(photos) / statistics.median(v) for k, v in times.items()},
        "seconds": times, "labels_identical_here": same,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
