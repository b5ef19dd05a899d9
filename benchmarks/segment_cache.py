"""Wall time of two identical `cdam-fast segment` runs on CPU: the first fills the text-embedding
disk cache (80 templates x (classes + 80 augmented prompts)), the second reads it.

    python benchmarks/segment_cache.py [--threads 2] [--classes-file voc21] [--keep-cache]

Each run is a fresh process (model load included), with a fresh cache folder for the pair;
random ViT-B/16 weights (no download). Prints both times and their ratio; the target is a
second run taking at most 25% of the first.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _photo(folder: Path) -> Path:
    from PIL import Image
    from skimage import data

    path = folder / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: the CLI's choice)")
    ap.add_argument("--classes-file", default="voc21", help="class list (default voc21)")
    ap.add_argument("--extra", default="", help="further segment arguments, e.g. --extra=--no-cdam")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cdam-cache-bench-") as tmp:
        tmp = Path(tmp)
        image = _photo(tmp)
        env = dict(os.environ, CDAM_FAST_CACHE_DIR=str(tmp / "cache"))
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, "-m", "cdam_fast.cli", "segment", str(image), "--classes-file", args.classes_file,
               "--pretrained", "none", "--device", "cpu", "--overwrite", "--out", str(tmp / "out"),
               *args.extra.split()]
        print("command:", " ".join(cmd[2:]), f"(OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')})")
        times = []
        for run in ("first (empty cache)", "second (cache filled)"):
            t = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            if done.returncode != 0:
                print(done.stdout, done.stderr, file=sys.stderr)
                return done.returncode
            print(f"{run}: {times[-1]:.1f} s  | {done.stdout.strip().splitlines()[-1][:100]}")
    print(f"second / first = {times[1] / times[0]:.3f} (target <= 0.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
