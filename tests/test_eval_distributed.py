"""torchrun with two CPU processes (gloo) gives exactly the single-process numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from cdam_fast.cli import main
from test_eval_support import build_dataset, expected_confusion

TESTS = Path(__file__).resolve().parent


def _torchrun(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cdam_fast.cli", *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_two_process_torchrun_equals_single_process(tmp_path):
    root = tmp_path / "voc"
    pairs = build_dataset("voc21", root, n=7, seed=11)  # odd count: the shards differ in size
    fake = ["--predictor", "test_eval_support:channel_predictor", "--no-progress"]
    base = ["eval", "--dataset", "voc21", "--root", str(root), *fake]

    assert main([*base, "--output", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    np.testing.assert_array_equal(np.array(single["confusion"]), expected_confusion("voc21", pairs))

    # A fresh two-process run, and one that continues a single-process partial run (3 images).
    assert main([*base, "--limit", "3", "--output", str(tmp_path / "resumed")]) == 0
    proc = _torchrun([*base, "--output", str(tmp_path / "dist")], tmp_path)
    _torchrun([*base, "--output", str(tmp_path / "resumed")], tmp_path)

    for name in ("dist", "resumed"):
        result = json.loads((tmp_path / name / "result.json").read_text())
        assert result["confusion"] == single["confusion"], name
        assert result["mIoU"] == single["mIoU"] and result["per_class"] == single["per_class"], name
        assert result["num_images"] == 7
    # each rank scored its own shard: rank 0 gets images 0, 2, 4, 6 and rank 1 gets 1, 3, 5
    assert (_lines(tmp_path / "dist" / "images.rank0.jsonl"), _lines(tmp_path / "dist" / "images.rank1.jsonl")) == (4, 3)
    # resumed: images 0..2 came from the single-process run; rank 0 added 4, 6 and rank 1 added 3, 5
    assert (_lines(tmp_path / "resumed" / "images.rank0.jsonl"), _lines(tmp_path / "resumed" / "images.rank1.jsonl")) == (5, 2)
    assert proc.stdout.count("mIoU") == 1  # only rank 0 reports
