"""Bulk segmentation throughput: `cdam-fast segment FOLDER` under torchrun with 1, 2, ... processes.

    python -m cdam_fast.benchmarks.bulk_bench                       # CPU, gloo: 1 and 2 processes
    python -m cdam_fast.benchmarks.bulk_bench --procs 1,2,4 --device cuda --images 64 --pretrained none

Writes random images of one size into a temporary folder and runs the real command once per
process count (random weights unless --pretrained; timing does not depend on the weights). Per
run it reports the command's own images/s (the segmentation loop of all ranks, from after the
model load to the last rank's last image: decode, ViT forward, CDAM, label maps, PNG files) and
the wall time including start-up (interpreters, model load, text embeddings: paid once per
rank). On CPU each process gets --threads threads, so K processes use K x threads cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_RATE = re.compile(r"(\d+) done, (\d+) skipped \(already done\), (\d+) failed, ([0-9.]+) images/s")


def make_images(folder: Path, n: int, size: tuple, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{i:05d}.png")


def run_once(folder: Path, out: Path, procs: int, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "cdam_fast.cli", "segment", str(folder), "--out", str(out), "--classes-file", args.classes_file,
           "--model", args.model, "--pretrained", args.pretrained, "--templates", "single", "--mode", args.mode,
           "--device", args.device]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    load = (round(load_before, 1), round(os.getloadavg()[0], 1))  # 1-minute load average: before, after
    match = _RATE.search(proc.stderr)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"{procs} process(es) failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    done = int(match.group(1))
    return {"procs": procs, "threads_per_proc": args.threads, "images": done, "images_per_s": float(match.group(4)),
            "wall_s": round(wall, 1), "load_average": load}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2", help="process counts, comma-separated (default 1,2)")
    p.add_argument("--images", type=int, default=8, help="images per run (default 8)")
    p.add_argument("--size", default="480x640", help="H x W of the images (default 480x640, a VOC photo)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--mode", default="window", choices=("window", "global"))
    p.add_argument("--classes-file", default="voc21")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    results = []
    with tempfile.TemporaryDirectory(prefix="cdam_bulk_bench_") as tmp:
        folder = Path(tmp) / "images"
        make_images(folder, args.images, (h, w))
        for i, k in enumerate(int(v) for v in args.procs.split(",")):
            results.append(run_once(folder, Path(tmp) / f"out{i}", k, args))  # a fresh folder: nothing to resume
            print(json.dumps(results[-1]), flush=True)
    import torch

    info = {"device": args.device, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "model": args.model, "mode": args.mode, "size": f"{h}x{w}",
            "classes": args.classes_file}
    print(f"\nbulk segment, {args.model} {args.mode}, {h}x{w}, {args.classes_file}, {args.device}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    print("| processes | threads each | images | images/s (loop) | wall s (incl. start-up) | load avg before, after |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['procs']} | {r['threads_per_proc']} | {r['images']} | {r['images_per_s']:.3f} | {r['wall_s']} "
              f"| {r['load_average'][0]}, {r['load_average'][1]} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
