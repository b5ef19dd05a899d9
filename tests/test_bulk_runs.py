"""Runs that share an output folder: one run at a time (a second one, in another process, is
refused at once; a run killed with kill -9 leaves no lock behind), unique temporary names, a
failed rename costs only its image, and after a resume with another process count each image's
newest record counts."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdam_fast.cli import main
from cdam_fast.pipeline import fileio
from cdam_fast.pipeline.bulk import read_manifest
from cdam_fast import runstore

from test_bulk_segment import ARGS, _image

# A `cdam-fast segment` run that stops inside its first image until the file named by argv[1]
# exists, after touching argv[2]: a run in progress, holding its output folder.
PAUSED_RUN = """
import sys, time
from pathlib import Path
from cdam_fast.pipeline import Segmenter
from cdam_fast.cli import main
real, go, ready = Segmenter.predict, Path(sys.argv[1]), Path(sys.argv[2])
def paused(self, *a, **k):
    ready.touch()
    while not go.exists():
        time.sleep(0.05)
    return real(self, *a, **k)
Segmenter.predict = paused
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "in"
    for seed, name in enumerate(["a.png", "b.png", "c.png"]):
        _image(root / name, (40, 44), seed)
    return root


def _start_paused(tmp_path, args):
    go, ready = tmp_path / "go", tmp_path / "ready"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(go), str(ready), "segment", *args],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the first run did not start segmenting: {err[-3000:]}")
        time.sleep(0.1)
    return proc, go


def test_second_run_refused_while_one_runs_and_kill_9_leaves_no_lock(images, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    run = [str(images / "a.png"), str(images / "b.png"), *ARGS, "--out", str(out)]
    first, go = _start_paused(tmp_path, run)
    try:
        # the same configuration (would segment the same images into the same files) and another
        # one (would replace segment.json): both refused at once, naming the running process
        for extra in ([], ["--method", "sclip"]):
            t0 = time.monotonic()
            assert main(["segment", *run, *extra]) == 2
            err = capsys.readouterr().err
            assert f"output folder {str(out)!r} is in use by another run (pid {first.pid} on " \
                   f"{socket.gethostname()}" in err, err
            assert time.monotonic() - t0 < 30  # refused before any model loads
        assert not list(out.glob("manifest.rank*.jsonl"))  # the refused runs wrote nothing
        assert json.loads((out / "segment.json").read_text())["method"] == "maskclip"
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock, as a crashed run does
        first.communicate(timeout=60)
    assert (out / runstore.LOCK_FILE).exists()  # the dead run's file stays, unlocked
    # as a run killed while writing leaves them: a temporary file of ours, and a file of the user's
    (out / ".a_labels.part4242-0123abcd.png").write_bytes(b"half a png")
    (out / ".notes.part1-0123abcd.png").write_bytes(b"not ours")
    # the next run is not blocked: it resumes (nothing was finished) and ends cleanly
    assert main(["segment", *run]) == 0
    assert "2 images: 2 done, 0 skipped (already done), 0 failed" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        ".notes.part1-0123abcd.png", "a_classes.json", "a_labels.png", "a_overlay.png", "b_classes.json",
        "b_labels.png", "b_overlay.png", "manifest.rank0.jsonl", "segment.json"]  # no lock file, no temporary files


def test_two_runs_after_one_another_and_lock_waits(tmp_path):
    a, b = runstore.FolderLock(tmp_path / "f"), runstore.FolderLock(tmp_path / "f", option="--output")
    a.acquire()
    with pytest.raises(runstore.StoreError, match=r"in use by another run \(pid %d on .*; wait for it to finish or choose "
                                         r"another --output" % os.getpid()):
        b.acquire()
    t0 = time.monotonic()
    with pytest.raises(runstore.StoreError):
        b.acquire(wait_s=0.5)
    assert time.monotonic() - t0 >= 0.5
    a.release()
    assert not (tmp_path / "f" / runstore.LOCK_FILE).exists()
    b.acquire()
    assert b.held and json.loads((tmp_path / "f" / runstore.LOCK_FILE).read_text())["pid"] == os.getpid()
    b.release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(runstore.StoreError, match="cannot create output folder"):
        runstore.FolderLock(tmp_path / "file" / "sub").acquire()


def test_partial_names_are_unique_to_each_writer(tmp_path):
    paths = fileio.output_paths([tmp_path / "x.png"], tmp_path / "out")[0]
    one, two = fileio.partial_paths(paths), fileio.partial_paths(paths)
    for p, q, final in zip(one, two, paths):
        assert p != q and p.parent == q.parent == final.parent and p.suffix == final.suffix
        assert p.name.startswith(".x_") and f".part{os.getpid()}-" in p.name
    # what a writer killed mid-write leaves is found again (and nothing else)
    (tmp_path / "out").mkdir()
    for p in one:
        p.write_bytes(b"")
    (tmp_path / "out" / ".y_labels.part1-0123abcd.png").write_bytes(b"")
    assert fileio.stale_partials([paths]) == sorted(one)
    # and in another process
    code = ("import sys; from pathlib import Path; from cdam_fast.pipeline import fileio; "
            f"print(fileio.partial_paths(fileio.output_paths([Path({str(tmp_path / 'x.png')!r})], "
            f"Path({str(tmp_path / 'out')!r}))[0]).labels)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    assert other and other not in {str(one.labels), str(two.labels)}


def test_failed_rename_costs_only_its_image(images, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "out"
    real = fileio.publish

    def disk_full_on_b(partial, paths):
        if paths.labels.name == "b_labels.png":
            partial.labels.replace(paths.labels)  # the first rename went through, the next did not
            raise OSError(28, "No space left on device")
        real(partial, paths)

    monkeypatch.setattr(fileio, "publish", disk_full_on_b)
    run = ["segment", str(images), *ARGS, "--out", str(out)]
    assert main(run) == 1
    err = capsys.readouterr().err
    assert "3 images: 2 done, 0 skipped (already done), 1 failed" in err
    assert "b.png: OSError: [Errno 28] No space left on device" in err
    assert not list(out.glob("b_*")) and not list(out.glob(".*part*"))  # nothing half published
    assert [(r["name"], r["status"]) for r in read_manifest(out)] == [
        ("a", "done"), ("b", "done"), ("b", "failed"), ("c", "done")]
    monkeypatch.setattr(fileio, "publish", real)
    assert main(run) == 0  # the resume redoes b only
    assert "3 images: 1 done, 2 skipped (already done), 0 failed" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("b_*")) == ["b_classes.json", "b_labels.png", "b_overlay.png"]


def test_resume_with_another_process_count_reports_only_this_runs_failures(images, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    (images / "b.png").write_bytes(b"not an image")
    assert main(["segment", str(images / "a.png"), str(images / "b.png"), *ARGS, "--out", str(out)]) == 1
    # as a 2-process run records it: a on rank 0, b (failed) on rank 1
    a, b = (out / "manifest.rank0.jsonl").read_text().splitlines()
    (out / "manifest.rank0.jsonl").write_text(a + "\n")
    (out / "manifest.rank1.jsonl").write_text(b + "\n")
    assert json.loads(b)["status"] == "failed"
    # b is repaired, c breaks; one process resumes
    shutil.copy(images / "c.png", images / "b.png")
    (images / "c.png").write_bytes(b"not an image either")
    capsys.readouterr()
    assert main(["segment", str(images), *ARGS, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "3 images: 1 done, 1 skipped (already done), 1 failed" in err
    listed = err.split("1 image(s) failed:")[1]
    assert "c.png" in listed and "b.png" not in listed, err  # b's old failure on rank 1 is not this run's
    assert (out / "b_labels.png").exists()
    newest = runstore.latest(read_manifest(out), "name")
    assert {n: r["status"] for n, r in newest.items()} == {"a": "done", "b": "done", "c": "failed"}
    assert {n: r["run"] for n, r in newest.items()} == {"a": 1, "b": 2, "c": 2}
    # and a third run redoes only c
    assert main(["segment", str(images), *ARGS, "--out", str(out)]) == 1
    assert "3 images: 0 done, 2 skipped (already done), 1 failed" in capsys.readouterr().err


def test_latest_orders_by_run_not_by_file():
    rank0 = [{"name": "x", "status": "done", "run": 2}, {"name": "y", "status": "failed", "run": 1}]
    rank1 = [{"name": "x", "status": "failed", "run": 1}, {"name": "y", "status": "done", "run": 1},
             {"name": "y", "status": "failed", "run": 1}]
    newest = runstore.latest(rank0 + rank1, "name")
    assert newest["x"]["status"] == "done" and newest["y"]["status"] == "failed"
    assert runstore.next_run(rank0 + rank1) == 3 and runstore.next_run([]) == 1
    # items named by several fields (e.g. one image's bands)
    bands = [{"name": "x", "band": 0, "status": "done", "run": 1}, {"name": "x", "band": 1, "status": "failed", "run": 1},
             {"name": "x", "band": 1, "status": "done", "run": 2}, {"name": "x", "status": "done", "run": 3}]
    assert {k: r["status"] for k, r in runstore.latest(bands, ("name", "band")).items()} == {
        ("x", 0): "done", ("x", 1): "done"}
    # records written before runs were numbered: file order, as before
    assert runstore.latest([{"name": "x", "status": "failed"}, {"name": "x", "status": "done"}], "name")["x"]["status"] == "done"


def test_eval_output_folder_is_locked_too(tmp_path, capsys, monkeypatch):
    import test_eval_support
    from test_eval_support import build_dataset

    build_dataset("voc21", tmp_path / "voc", n=2, seed=3)
    loaded = []
    real = test_eval_support.channel_predictor
    monkeypatch.setattr(test_eval_support, "channel_predictor", lambda d: loaded.append(1) or real(d))
    out = tmp_path / "eval"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from cdam_fast.runstore import FolderLock; "
                               "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    run = ["eval", "--dataset", "voc21", "--root", str(tmp_path / "voc"), "--predictor",
           "test_eval_support:channel_predictor", "--no-progress", "--output", str(out)]
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(run) == 2
        assert f"is in use by another run (pid {holder.pid} on " in capsys.readouterr().err
        assert not (out / "run.json").exists() and not loaded  # refused before the model loads
    finally:
        holder.communicate("", timeout=60)  # the holder ends: its lock goes with it
    assert main(run) == 0 and (out / "result.json").exists() and not (out / runstore.LOCK_FILE).exists()
    assert loaded == [1]
