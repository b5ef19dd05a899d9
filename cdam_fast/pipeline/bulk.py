"""`cdam-fast segment` over many images: resumable, streamed, sharded under torchrun.

The output folder holds `segment.json` (the configuration its outputs belong to; another
configuration is refused unless --overwrite) and a run manifest, one JSON-lines file per rank
(`manifest.rank<R>.jsonl`; cdam_fast.runstore), one record per image as it completes:
{"image", "name", "rank", "status": "done" | "failed", "outputs", "error", "seconds"}.

* Resume: an image whose outputs a "done" record lists and which all exist is skipped (unless
  --overwrite); failed and missing images are redone. Outputs are written under temporary names
  and renamed after their record is appended, so a crash leaves no half-written file that looks
  finished. Output files that exist but no record of this folder lists are someone else's: the
  run is refused unless --overwrite.
* Sharding (torchrun): every rank expands the same inputs, learns the images still to do from
  the folder (before anyone writes, then a barrier), and takes every K-th of them; a rank writes
  only its own images' outputs and its own manifest file. Ranks sum their counts through
  torch.distributed and rank 0 prints the summary.
* Each image is computed on its own (its windows batched together, never with another image's),
  so its labels do not depend on which other images share the run: 1 and K processes, and
  resumed runs, write byte-identical label PNGs.
* A bad image (unreadable, too small, ...) is recorded as failed with its error and the shard
  goes on; the exit status is 1 when some images failed, 2 when images failed and none was
  segmented (as for bad arguments). Per-image lines go to stdout, errors and the summary to
  stderr.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runstore import RunFolder
from ..validation import CdamInputError
from .inputs import InputImage, expand_inputs, unique_names

CONFIG_FILE = "segment.json"
MANIFEST_PREFIX = "manifest"
#: What each image gets in the output folder: OUT/<name><suffix>.
OUTPUT_SUFFIXES = ("_labels.png", "_overlay.png")
PREFETCH = 2  # images decoded ahead of the model
# segment options that do not change what is written (left out of segment.json; every other
# option is in it, so options added later count by default). The classes are stored resolved.
_NOT_CONFIG = frozenset({"images", "out", "overwrite", "func", "command", "backend", "device", "window_batch",
                         "classes", "classes_file", "cache_dir", "threads", "no_progress", "progress"})


def output_files(items, out) -> list[tuple]:
    """The output paths of each image (an InputImage, or a path named by its stem), in
    OUTPUT_SUFFIXES order."""
    out = Path(out)
    items = unique_names([it if isinstance(it, InputImage) else InputImage(os.fspath(it), Path(it).stem)
                          for it in items])
    return [tuple(out / f"{it.name}{s}" for s in OUTPUT_SUFFIXES) for it in items]


def check_not_inputs(images, files) -> None:
    """Refuse outputs that would replace one of the input images."""
    inputs = {os.path.realpath(getattr(i, "path", i)) for i in images}
    for group in files:
        for p in group:
            if os.path.realpath(p) in inputs:
                raise CdamInputError(f"output {str(p)!r} would replace an input image; choose another --out")


def run_config(args, classes) -> dict:
    """What the outputs depend on: every segment option but those in _NOT_CONFIG, and the
    class list itself (not how it was given)."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_CONFIG and not callable(v)}
    config["classes"] = [list(s) for s in classes.synonyms]
    config["outputs"] = list(OUTPUT_SUFFIXES)
    return config


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def _tmp(path: Path, rank: int) -> Path:
    # keeps the suffix, so writers that pick the format by extension still work
    return path.with_name(f".{path.stem}.part{rank}{path.suffix}")


@dataclass
class Plan:
    todo: list  # indices into the items still to segment (in input order)
    skipped: int  # finished by an earlier run
    ours: set  # output files (relative to the folder) that this folder's manifest lists


def plan(items, files, folder: RunFolder, overwrite: bool) -> Plan:
    """Which images are left, from the manifest and the files on disk."""
    done, ours = set(), set()
    if folder.configured:
        for r in folder.records():
            ours.update(r.get("outputs") or ())
            if r.get("status") == "done":
                done.add(r.get("name"))
    todo = [i for i, (it, group) in enumerate(zip(items, files))
            if overwrite or it.name not in done or not all(p.exists() for p in group)]
    return Plan(todo, len(items) - len(todo), ours)


def check_foreign(files, folder: RunFolder, left: Plan) -> None:
    """Refuse to replace files that are not this folder's recorded outputs (no --overwrite)."""
    out = folder.folder
    foreign = [p for i in left.todo for p in files[i] if _rel(p, out) not in left.ours and p.exists()]
    if not foreign:
        return
    if sys.stdin.isatty() and sys.stdout.isatty() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        answer = input(f"{len(foreign)} output file(s) exist (e.g. {foreign[0]}); overwrite? [y/N] ")
        if answer.strip().lower() in ("y", "yes"):
            return
    raise CdamInputError(f"{len(foreign)} output file(s) exist (e.g. {str(foreign[0])!r}) that no earlier run "
                         "into this folder recorded; pass --overwrite to replace them or choose another --out")


def _prefetched(load, items, ahead: int = PREFETCH):
    """(value, error) of load(item) per item in order, computed in a background thread up to
    `ahead` items early so that decoding overlaps with the model."""
    def safe(item):
        try:
            return load(item), None
        except Exception as e:  # reported per image by the caller
            return None, e

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(safe, it) for it in items[:ahead])
        for it in items[ahead:]:
            pending.append(pool.submit(safe, it))
            yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def error_message(e: Exception) -> str:
    """How a failed image's error is reported (input errors by their message, others with their type)."""
    return str(e) if isinstance(e, CdamInputError) else f"{type(e).__name__}: {e}"


def segment_one(seg, image, what: str) -> np.ndarray:
    """Labels of one image, computed on its own (independent of other images in the run)."""
    prepared = seg.preprocess(image, what)
    result = next(seg._run_group([prepared]))
    return seg.label_map(result)


@dataclass
class Counts:
    done: int = 0
    skipped: int = 0
    failed: int = 0


def run(args, *, make_segmenter, write, describe, prog: str = "cdam-fast segment") -> int:
    """The segment command over args.images (see the module doc).

    make_segmenter(classes, device) -> Segmenter; write(item, image, labels, seg, files) writes
    one image's outputs to the paths `files` (temporary names, in OUTPUT_SUFFIXES order);
    describe(item, labels, seg, files) -> the line printed per image. Returns the exit status:
    0, 1 when some images failed, 2 when images failed and none was segmented."""
    from tqdm.auto import tqdm

    from ..evaluation.distributed import distributed_context
    from .images import open_image
    from .text import parse_classes, read_class_file

    out = Path(args.out).expanduser()
    items = expand_inputs(args.images, exclude=out)
    classes = parse_classes(read_class_file(args.classes_file) if args.classes_file else args.classes)
    files = output_files(items, out)
    check_not_inputs(items, files)
    use_cuda = None if args.device is None else str(args.device).startswith("cuda")
    with distributed_context(use_cuda=use_cuda) as dist:
        folder = RunFolder(out, run_config(args, classes), dist.rank, config_file=CONFIG_FILE,
                           prefix=MANIFEST_PREFIX, option="--out")

        def check():  # before the (slow) model load, so that a refused folder fails at once
            folder.check(args.overwrite)
            if not args.overwrite:
                check_foreign(files, folder, plan(items, files, folder, False))

        _on_rank0(dist, check)
        # this rank's GPU under torchrun (a plain "cuda" would put every rank on one device)
        device = str(dist.device) if dist.device is not None and args.device in (None, "cuda") else args.device
        seg = make_segmenter(classes, device)
        _on_rank0(dist, lambda: folder.prepare(args.overwrite))
        left = plan(items, files, folder, args.overwrite)
        dist.barrier()  # every rank has its list before anyone writes
        mine = left.todo[dist.rank::dist.world_size]
        counts = Counts(skipped=left.skipped if dist.is_main else 0)
        start = time.perf_counter()
        bar = tqdm(total=len(mine), desc="segment", unit="image", disable=not dist.is_main or len(items) < 2)
        try:
            loaded = _prefetched(lambda i: open_image(items[i].path), mine)
            for i, (image, error) in zip(mine, loaded):
                ok, line = _segment_item(items[i], files[i], image, error, seg, folder, write, describe, dist.rank)
                counts.done += ok
                counts.failed += not ok
                tqdm.write(line if ok else f"{prog}: error: {line}", file=sys.stdout if ok else sys.stderr)
                bar.update(1)
        finally:
            bar.close()
            folder.close()
        total = dist.all_reduce_sum(np.array([counts.done, counts.skipped, counts.failed], dtype=np.int64))
        seconds = time.perf_counter() - start  # after the reduction: the slowest rank's time
        done, skipped, failed = (int(x) for x in total)
        if dist.is_main:
            rate = f", {done / seconds:.3f} images/s" if done and seconds > 0 else ""
            procs = f" on {dist.world_size} processes" if dist.world_size > 1 else ""
            print(f"{prog}: {len(items)} images: {done} done, {skipped} skipped (already done), {failed} failed"
                  f"{rate}{procs}; manifest: {out / (MANIFEST_PREFIX + '.rank*.jsonl')}", file=sys.stderr)
        return 0 if not failed else (1 if done or skipped else 2)


def _segment_item(item, group, image, error, seg, folder: RunFolder, write, describe, rank: int):
    """Segment and write one image, record it in the manifest: (True, its line) or (False, the error)."""
    t0 = time.perf_counter()
    record = {"image": item.path, "name": item.name, "rank": rank, "outputs": [_rel(p, folder.folder) for p in group]}
    try:
        if error is not None:
            raise error
        labels = segment_one(seg, image, f"image {item.path!r}")
        for p in group:
            p.parent.mkdir(parents=True, exist_ok=True)
        write(item, image, labels, seg, [_tmp(p, rank) for p in group])
    except Exception as e:  # one bad image never stops the shard
        for p in group:
            _tmp(p, rank).unlink(missing_ok=True)
        message = error_message(e)
        folder.append({**record, "status": "failed", "error": message, "seconds": round(time.perf_counter() - t0, 3)})
        return False, message if item.path in message else f"{item.path}: {message}"
    folder.append({**record, "status": "done", "error": None, "seconds": round(time.perf_counter() - t0, 3)})
    for p in group:  # after the record: a file the manifest lists is either complete or absent
        _tmp(p, rank).replace(p)
    return True, describe(item, labels, seg, group)


def _on_rank0(dist, fn) -> None:
    """Run fn on rank 0; every rank raises if it failed (the error itself on rank 0)."""
    error = None
    if dist.is_main:
        try:
            fn()
        except Exception as e:  # re-raised below, after the other ranks were told
            error = e
    ok = dist.broadcast_flag(error is None)
    if error is not None:
        raise error
    if not ok:
        raise CdamInputError("rank 0 could not use the output folder (its error is in rank 0's log)")


def read_manifest(out) -> list[dict]:
    """Every record of an output folder's manifest (all ranks, all runs, in order)."""
    folder = RunFolder(out, {}, config_file=CONFIG_FILE, prefix=MANIFEST_PREFIX)
    return list(folder.records())
