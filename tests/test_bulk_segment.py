"""`cdam-fast segment` over folders, globs and lists: resume, manifest, bad images, and torchrun
sharding (2 gloo processes on CPU) with byte-identical label PNGs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdam_fast.cli import main
from cdam_fast.pipeline import Segmenter
from cdam_fast.pipeline.bulk import read_manifest
from cdam_fast.pipeline.inputs import expand_inputs
from cdam_fast.validation import CdamInputError

# the smallest ViT that open_clip builds, random weights, 32-px windows: seconds per run on CPU
ARGS = ["--classes", "background,cat,sofa", "--model", "ViT-S-16", "--pretrained", "none", "--templates", "single",
        "--background", "none", "--device", "cpu", "--short-side", "48", "--long-side", "96", "--crop", "32",
        "--stride", "16", "--window-batch", "4"]
SIZES = {"a.png": (40, 56), "b.jpg": (36, 30), "sub/c.png": (48, 48), "sub/d.png": (33, 61), "sub/e.png": (50, 40)}


def _image(path: Path, hw, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for seed, (name, hw) in enumerate(SIZES.items()):
        _image(root / name, hw, seed)
    (root / "sub" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _image(root / ".hidden" / "x.png", (40, 40), 9)  # hidden folders are skipped
    (root / "notes.md").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def reference(photos):
    """Each good image's labels from the Python API (one image per call), with one thread as in the
    CLI runs compared with it (other thread counts may sum floats in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seg = Segmenter("background,cat,sofa", model="ViT-S-16", pretrained=None, templates="single",
                        background=None, device="cpu", short_side=48, long_side=96, crop=32, stride=16,
                        window_batch=4, progress=False)
        return {Path(n).with_suffix("").as_posix(): seg.predict(photos / n) for n in SIZES}
    finally:
        torch.set_num_threads(threads)


def _labels(out: Path) -> dict:
    return {p.relative_to(out).as_posix()[:-len("_labels.png")]: p.read_bytes() for p in out.rglob("*_labels.png")}


def test_inputs_folders_globs_lists(photos, tmp_path):
    items = expand_inputs([photos])
    assert [i.name for i in items] == ["a", "b", "sub/bad", "sub/c", "sub/d", "sub/e"]  # recursive, sorted
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{photos / 'sub/d.png'}\n\n../{tmp_path.name}/x/a.png\n")
    _image(tmp_path / "x" / "a.png", (20, 20), 1)
    items = expand_inputs([str(photos / "*.png"), listing, photos / "a.png", str(photos / "**" / "c.png")])
    assert [(Path(i.path).resolve(), i.name) for i in items] == [
        (photos / "a.png", "a"), (photos / "sub/d.png", "d"), (tmp_path / "x/a.png", "a-2"), (photos / "sub/c.png", "c")]
    # a missing image file is an image that will fail on its own, not a bad argument
    assert [i.name for i in expand_inputs([tmp_path / "x" / "none.png"])] == ["none"]
    for args, message in [([tmp_path / "no.txt"], "list of images .*no.txt' does not exist"),
                          ([str(tmp_path / "*.jpg")], "matches no image files")]:
        with pytest.raises(CdamInputError, match=message):
            expand_inputs(args)
    # an output folder inside an input folder is not read back as input
    assert [i.name for i in expand_inputs([photos], exclude=photos / "sub")] == ["a", "b"]
    assert [i.name for i in expand_inputs([photos / "sub" / "c.png"], exclude=photos / "sub")] == ["c"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CdamInputError, match="holds no image files"):
        expand_inputs([tmp_path / "empty"])


def test_resume_after_crash_and_bad_image(photos, reference, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "out"
    real = Segmenter.predict
    calls = []

    def crash_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies mid-run (not an error of the image)
        return real(*a, **k)

    monkeypatch.setattr(Segmenter, "predict", crash_on_third)
    assert main(["segment", str(photos), *ARGS, "--out", str(out)]) == 130  # Ctrl-C: no traceback
    assert "interrupted after 2 images; rerun to resume" in capsys.readouterr().err
    monkeypatch.setattr(Segmenter, "predict", real)
    first = read_manifest(out)
    # a, b done; sub/bad failed (its decode error is recorded, the shard went on); crash on sub/c
    assert [(r["name"], r["status"]) for r in first] == [("a", "done"), ("b", "done"), ("sub/bad", "failed")]
    assert "cannot read image file" in first[2]["error"] and "bad.png" in first[2]["error"]
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert sorted(p.relative_to(out).as_posix() for p in kept) == ["a_labels.png", "a_overlay.png", "b_labels.png",
                                                                   "b_overlay.png"]
    with open(out / "manifest.rank0.jsonl", "a") as f:
        f.write('{"image": "cut short by the cra')  # a record the crash interrupted
    capsys.readouterr()

    assert main(["segment", str(photos), *ARGS, "--out", str(out)]) == 1  # bad.png fails again
    err = capsys.readouterr().err
    assert "6 images: 3 done, 2 skipped (already done), 1 failed" in err and "bad.png" in err
    second = read_manifest(out)[3:]
    assert [(r["name"], r["status"]) for r in second] == [("sub/bad", "failed"), ("sub/c", "done"), ("sub/d", "done"),
                                                          ("sub/e", "done")]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished images were not redone
    assert not list(out.rglob(".*part*"))  # no temporary files left
    assert json.loads((out / "sub" / "c_classes.json").read_text())["classes"][1]["name"] == "cat"
    labels = _labels(out)
    assert sorted(labels) == sorted(reference)
    for name, data in labels.items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}_labels.png")), reference[name], name)

    # a third run has nothing left but the bad image; another configuration is refused
    assert main(["segment", str(photos / "a.png"), *ARGS, "--out", str(out)]) == 0
    assert "1 image: 0 done, 1 skipped" in capsys.readouterr().err
    assert main(["segment", str(photos / "a.png"), *ARGS, "--out", str(out), "--method", "sclip"]) == 2
    assert "method: 'maskclip' there, 'sclip' now" in capsys.readouterr().err
    assert main(["segment", str(photos / "a.png"), *ARGS, "--out", str(out), "--method", "sclip", "--overwrite"]) == 0
    assert read_manifest(out)[0]["name"] == "a" and len(read_manifest(out)) == 1  # the old records went
    assert json.loads((out / "segment.json").read_text())["method"] == "sclip"


def test_torchrun_two_processes_equal_one(photos, reference, tmp_path, one_thread):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cdam_fast.cli",
           "segment", str(photos / "*.*"), str(photos / "sub"), *ARGS, "--out", str(tmp_path / "dist")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, "the bad image must make the run fail"
    assert proc.stderr.count("6 images: 5 done, 0 skipped (already done), 1 failed") == 1, proc.stderr[-3000:]
    assert "on 2 processes" in proc.stderr
    records = read_manifest(tmp_path / "dist")
    # the shards: every other image of the input order, each recorded by its own rank only
    order = ["a", "b", "bad", "c", "d", "e"]
    assert sorted((r["name"], r["rank"]) for r in records) == sorted((n, i % 2) for i, n in enumerate(order))
    for rank in (0, 1):
        assert {r["rank"] for r in map(json.loads, (tmp_path / "dist" / f"manifest.rank{rank}.jsonl").open())} == {rank}
    assert [r["status"] for r in records if r["name"] == "bad"] == ["failed"]

    # single process, same thread count: byte-identical label files
    assert main(["segment", str(photos), *ARGS, "--out", str(tmp_path / "one")]) == 1
    one = _labels(tmp_path / "one")
    assert _labels(tmp_path / "dist") == {n.split("/")[-1]: v for n, v in one.items()}
    for name, data in one.items():
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one" / f"{name}_labels.png")), reference[name])
