"""Native-resolution mode on large images: windows/s, pixels/s and peak RSS per image size.

    python -m cdam_fast.benchmarks.highres                                    # 4096^2, 8192^2, 16384^2, ViT-B/16
    python -m cdam_fast.benchmarks.highres --sizes 4096 --threads 2
    python -m cdam_fast.benchmarks.highres --sizes 8192 16384 --max-windows 148    # time the first 2 bands only
    python -m cdam_fast.benchmarks.highres --model tiny --sizes 4096 8192 16384   # full passes, RSS

Per size, a synthetic RGB image is written as a tiled, deflate-compressed TIFF into a
temporary folder (tile by tile, never whole; deleted afterwards), and a fresh subprocess
segments it with `streamed.segment_file` (random weights, --templates single, the 21 VOC
classes, crop / stride as given, on CPU): the bands (TIFF reading, network + CDAM, band
files), then the assembly (label TIFF, preview, class mapping). Reported: windows/s of the
band step, pixels/s of the whole pass, and the process's peak RSS (ru_maxrss: everything,
the model included). With --max-windows only the first bands holding that many windows run
(no assembly) and the RSS is that partial pass's, marked as such.

Comparison: on the same windows (the first --compare-windows windows, whole bands) the
ordinary window mode (`Segmenter` without scale, the strip given in memory, its protocol
size equal to the strip's so that the windows are the same) against the band step, timed
alternately (best of --rounds) in the same process.

`--model tiny` is a 2-block, width-64 ViT with 16-pixel patches (registered here): the
image-size-dependent memory (band logits, assembly, label rows) is the same as ViT-B/16's
for the same crop, so full passes of large images measure it in minutes on a CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TINY = "cdam-bench-tiny-vit"
_TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _model_name(name: str) -> str:
    if name != "tiny":
        return name
    import open_clip

    if TINY not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="cdam-bench-tiny-"))
        (folder / f"{TINY}.json").write_text(json.dumps(_TINY_CONFIG))
        open_clip.add_model_config(folder)
    return TINY


def write_image(path: Path, side: int, tile: int = 256, seed: int = 0) -> None:
    """A side x side RGB tiled TIFF of smooth blobs plus noise, written a tile at a time."""
    import tifffile

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (side // 512 + 2, side // 512 + 2, 3)).astype(np.float32)

    def tiles():
        yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32)
        for y in range(0, side, tile):
            for x in range(0, side, tile):
                fy, fx = (y + yy) / 512, (x + xx) / 512
                iy, ix = fy.astype(int), fx.astype(int)
                wy, wx = (fy - iy)[..., None], (fx - ix)[..., None]
                c = (colours[iy, ix] * (1 - wy) * (1 - wx) + colours[iy + 1, ix] * wy * (1 - wx)
                     + colours[iy, ix + 1] * (1 - wy) * wx + colours[iy + 1, ix + 1] * wy * wx)
                c += rng.normal(0, 8, c.shape)
                yield np.clip(c, 0, 255).astype(np.uint8)

    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                     photometric="rgb", bigtiff=side * side * 3 > (1 << 31), metadata=None)


def _segmenter(args, scale, model=None):
    from cdam_fast.pipeline import Segmenter
    from cdam_fast.pipeline.text import read_class_file

    model = model or _model_name(args.model)
    return Segmenter(read_class_file("voc21"), model=model, pretrained=None, templates="single",
                     device="cpu", crop=args.crop, stride=args.stride, window_batch=args.window_batch,
                     progress=False, cache_dir=False, scale=scale, long_side=1 << 20)


def _child(args) -> dict:
    """One size in this (fresh) process: the comparison (--compare-windows) or the streamed pass."""
    import shutil

    import torch

    from cdam_fast.pipeline import native, streamed
    from cdam_fast.pipeline.bandstore import BandStore
    from cdam_fast.pipeline.rasters import open_raster

    torch.set_num_threads(args.threads)
    seg = _segmenter(args, 1.0)
    raster = open_raster(args.image)
    p = native.plan(seg, raster.height, raster.width)
    per_band = len(p.layout.col_starts)
    out = Path(args.out)
    result = {"size": list(raster.size), "windows": p.windows, "bands": p.bands, "windows_per_band": per_band}

    if args.compare_windows:
        bands = max(1, min(p.bands, math.ceil(args.compare_windows / per_band)))
        y1 = p.band_rows(bands - 1)[1]
        strip = raster.read(0, y1).permute(1, 2, 0).numpy()  # the rows of those bands, in memory
        ordinary = _segmenter(args, None, seg.backbone)  # the same model
        ordinary.short_side = min(strip.shape[:2])  # protocol size == the strip's: the same windows
        assert ordinary.preprocess(strip).layout.count == bands * per_band
        ordinary.encode_windows(torch.zeros(1, 3, args.crop, args.crop))  # warm-up (ATP encoding, allocator)
        best = {"ordinary": math.inf, "streamed": math.inf}
        for _ in range(args.rounds):
            t = time.perf_counter()
            next(iter(ordinary.results([strip])))
            best["ordinary"] = min(best["ordinary"], time.perf_counter() - t)
            store = BandStore(out / "compare", {})
            store.prepare()
            t = time.perf_counter()
            streamed.compute_bands(seg, raster, p, store, range(bands))
            best["streamed"] = min(best["streamed"], time.perf_counter() - t)
            shutil.rmtree(out / "compare")
        n = bands * per_band
        result["compare"] = {"windows": n, "ordinary_windows_per_s": round(n / best["ordinary"], 3),
                             "streamed_windows_per_s": round(n / best["streamed"], 3),
                             "ratio": round(best["ordinary"] / best["streamed"], 3)}
        return result

    limit = p.bands if not args.max_windows else max(1, min(p.bands, math.ceil(args.max_windows / per_band)))
    store = BandStore.for_image(out, "image", {})
    store.prepare()
    t0 = time.perf_counter()
    streamed.compute_bands(seg, raster, p, store, range(limit))
    t1 = time.perf_counter()
    result.update(timed_windows=limit * per_band, band_seconds=round(t1 - t0, 2),
                  windows_per_s=round(limit * per_band / (t1 - t0), 3), full_pass=limit == p.bands)
    if limit == p.bands:
        paths = streamed.native_output_paths([args.image], out)[0]
        streamed.assemble(seg, raster, p, store, paths)
        t2 = time.perf_counter()
        H, W = raster.size
        result.update(assembly_seconds=round(t2 - t1, 2), total_seconds=round(t2 - t0, 2),
                      pixels_per_s=round(H * W / (t2 - t0)), label_tiff_bytes=paths.labels.stat().st_size)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cdam_fast.benchmarks.highres", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384], help="image sides in pixels")
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights), or 'tiny'")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--stride", type=int, default=224)
    ap.add_argument("--window-batch", dest="window_batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--max-windows", dest="max_windows", type=int, default=0,
                    help="time only the first bands holding this many windows (0: the full pass)")
    ap.add_argument("--compare-windows", dest="compare_windows", type=int, default=0,
                    help="windows (whole bands) timed in both modes, in a process of their own (default: one band)")
    ap.add_argument("--no-compare", dest="compare", action="store_false")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the comparison (best of)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    import torch

    records = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
    print(f"# highres: model {args.model} (random weights), crop {args.crop} stride {args.stride}, "
          f"window batch {args.window_batch}, {args.threads} threads, "
          f"CPU {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for side in args.sizes:
        with tempfile.TemporaryDirectory(prefix="cdam-highres-") as tmp:
            image = Path(tmp) / f"synthetic{side}.tif"
            write_image(image, side)
            compare = args.compare_windows or (math.ceil(side / args.stride) if args.compare else 0)
            record = {}
            for what in (["--compare-windows", str(compare)], []) if compare else ([],):
                cmd = [sys.executable, "-m", "cdam_fast.benchmarks.highres", "--child", "--image", str(image),
                       "--out", str(Path(tmp) / "out"), "--model", args.model, "--crop", str(args.crop), "--stride",
                       str(args.stride), "--window-batch", str(args.window_batch), "--threads", str(args.threads),
                       "--max-windows", str(args.max_windows), "--rounds", str(args.rounds), *what]
                load = os.getloadavg()[0]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)  # a fresh process each
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                record.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            record.update(side=side, model=args.model, load_average=(round(load, 1), round(os.getloadavg()[0], 1)))
            records.append(record)
            print(json.dumps(record), flush=True)
    if len(records) > 1 and all(r["full_pass"] for r in records):
        print(f"# peak RSS {records[-1]['side']}^2 / {records[0]['side']}^2: "
              f"{records[-1]['peak_rss_mib'] / records[0]['peak_rss_mib']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
