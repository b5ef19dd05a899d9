"""`cdam-fast segment` over many images: resumable, streamed, sharded under torchrun.

The output folder holds `segment.json` (the configuration its outputs belong to; another
configuration is refused unless --overwrite) and a run manifest, one JSON-lines file per rank
(`manifest.rank<R>.jsonl`; cdam_fast.runstore), one record per image as it completes:
{"image", "name", "rank", "status": "done" | "failed", "outputs", "error", "seconds", "run"}
("run": the run's number, so that an image's newest record wins whichever rank file holds it).

* One run at a time: rank 0 holds the folder's run lock (runstore.FolderLock) from before the
  configuration check to the end; a second run into the folder is refused at once, naming the
  running one's pid and host.
* Resume: an image whose newest record is "done" and whose outputs all exist is skipped (unless
  --overwrite); failed and missing images are redone. Outputs are written under temporary names
  unique to the process and renamed after their record is appended, so a crash leaves no
  half-written file that looks finished (the temporary files a killed run left are removed when
  the next one starts); a failed rename is that image's failure (recorded after the "done" one,
  its outputs removed). Output files that exist but no record of this folder
  lists are someone else's: the run is refused unless --overwrite.
* Sharding (torchrun): every rank expands the same inputs, learns the images still to do from
  the folder (every rank before anyone writes), and takes every K-th of them; a rank writes
  only its own images' outputs and its own manifest file. Ranks sum their counts through
  torch.distributed and rank 0 prints the summary.
* Each image is computed on its own (its windows batched together, never with another image's),
  so its labels do not depend on which other images share the run: 1 and K processes, and
  resumed runs, write byte-identical label PNGs.
* Every image of a rank's shard is checked from its file header (readable, large enough for
  the protocol) before the model loads: a bad one is named at once, recorded as failed and
  costs only itself; when no rank has an image left to segment, no model is loaded and nothing
  is written. An image that fails later (decoding, the model) is recorded the same way and the
  shard goes on. The exit status is 1 when some images failed, 2 when images failed and none
  was segmented (as for bad arguments). Per-image lines (W x H, method, model and weights,
  class shares) go to stdout; errors, the summary and the list of failures to stderr. A run
  that segments nothing leaves no output folder it created behind.
* The files of one image are fileio.py's (label PNG, overlay, class mapping).
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..prefetch import prefetched
from ..runstore import RunFolder, latest, next_run
from ..validation import CdamInputError
from . import fileio
from .inputs import expand_inputs

CONFIG_FILE = "segment.json"
MANIFEST_PREFIX = "manifest"
PREFETCH = 2  # images decoded ahead of the model
# segment options that do not change what is written (left out of segment.json; every other
# option is in it, so options added later count by default). The classes are stored resolved.
_NOT_CONFIG = frozenset({"images", "out", "overwrite", "func", "command", "backend", "device", "window_batch",
                         "classes", "classes_file", "cache_dir"})


def check_not_inputs(images, files) -> None:
    """Refuse outputs that would replace one of the input images."""
    inputs = {os.path.realpath(getattr(i, "path", i)) for i in images}
    for group in files:
        for p in group:
            if os.path.realpath(p) in inputs:
                raise CdamInputError(f"output {str(p)!r} would replace an input image; choose another --out")


def run_config(args, classes, settings=None) -> dict:
    """What the outputs depend on: every segment option but those in _NOT_CONFIG, the resolved
    Segmenter settings (a preset's or a method's defaults filled in), and the class list itself
    (not how it was given)."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_CONFIG and not callable(v)}
    config.update(settings or {})
    config["classes"] = [list(s) for s in classes.synonyms]
    config["outputs"] = list(fileio.OUTPUT_SUFFIXES.values())
    return config


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


@dataclass
class Plan:
    todo: list  # indices into the items still to segment (in input order)
    skipped: int  # finished by an earlier run
    ours: set  # output files (relative to the folder) that this folder's manifest lists
    run: int = 1  # the number of the run that starts (every rank computes the same before anyone writes)


def plan(items, files, folder: RunFolder, overwrite: bool) -> Plan:
    """Which images are left, from the manifest (each image's newest record) and the files on disk."""
    done, ours, run = set(), set(), 1
    if folder.configured:
        records = list(folder.records())
        for r in records:
            ours.update(r.get("outputs") or ())
        done = {name for name, r in latest(records, "name").items() if r.get("status") == "done"}
        run = next_run(records)
    todo = [i for i, (it, group) in enumerate(zip(items, files))
            if overwrite or it.name not in done or not all(p.exists() for p in group)]
    return Plan(todo, len(items) - len(todo), ours, run)


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


def _caught(load):
    """load, returning (value, None), or (None, the exception) for the caller to report per image."""
    def safe(item):
        try:
            return load(item), None
        except Exception as e:  # noqa: BLE001
            return None, e
    return safe


def error_message(e: Exception) -> str:
    """How a failed image's error is reported (input errors by their message, others with their type)."""
    return str(e) if isinstance(e, CdamInputError) else f"{type(e).__name__}: {e}"


def precheck(args, items, indices, sizes) -> dict:
    """{index: error message} of the images among items[indices] that cannot be segmented, from
    their file headers and the protocol's size rules (sizes: mode, short_side, long_side, crop,
    stride; no model needed)."""
    from .segmenter import plan_image

    patch = fileio.model_patch_size(args.model)

    def size_rules(H, W, what):
        return plan_image(H, W, patch, sizes["mode"], sizes["short_side"], sizes["long_side"], sizes["crop"],
                          sizes["stride"], what, args.model)

    bad = {}
    for i in indices:
        try:
            fileio.check_image_file(items[i].path, patch, size_rules)
        except Exception as e:  # noqa: BLE001 - any unreadable file is that image's failure
            bad[i] = error_message(e)
    return bad


def _line(path: str, message: str) -> str:
    return message if path in message else f"{path}: {message}"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the run: `done` images of this rank were finished (and recorded)."""

    def __init__(self, done: int):
        super().__init__(done)
        self.done = done


@dataclass
class Counts:
    done: int = 0
    skipped: int = 0
    failed: int = 0


def run(args, *, classes, settings, sizes, make_segmenter, prog: str = "cdam-fast segment") -> int:
    """The segment command over args.images (see the module doc); classes: parsed (text.Classes);
    settings: the resolved Segmenter protocol settings (stored with the run); sizes: the size
    settings for the pre-check.

    make_segmenter(classes, device) -> Segmenter. Returns the exit status: 0, 1 when some
    images failed, 2 when images failed and none was segmented."""
    from tqdm.auto import tqdm

    from ..distributed import distributed_context
    from .images import open_image

    out = Path(args.out).expanduser()
    items = expand_inputs(args.images, exclude=out)
    files = fileio.output_paths(items, out)
    check_not_inputs(items, files)
    use_cuda = None if args.device is None else str(args.device).startswith("cuda")
    with distributed_context(use_cuda=use_cuda) as dist, ExitStack() as on_exit:
        folder = RunFolder(out, run_config(args, classes, settings), dist.rank, config_file=CONFIG_FILE,
                           prefix=MANIFEST_PREFIX, option="--out")
        created = None  # rank 0: the outermost folder this run created

        def check():  # before the (slow) model load, so that a refused folder fails at once
            nonlocal created
            created = _first_missing(out)
            if created is not None:  # however the run ends, no empty folder of its own stays behind
                on_exit.callback(_remove_empty_folders, out, created)
            on_exit.callback(folder.lock().release)  # held for the run (rank 0 for every rank)
            folder.check(args.overwrite)
            if not args.overwrite:
                check_foreign(files, folder, plan(items, files, folder, False))

        dist.run_on_main(check, "use the output folder", CdamInputError)
        left = plan(items, files, folder, args.overwrite)
        folder.run = left.run
        mine = left.todo[dist.rank::dist.world_size]
        early = precheck(args, items, mine, sizes)
        for i in mine:
            if i in early:
                print(f"{prog}: error: {_line(items[i].path, early[i])}", file=sys.stderr)
        # also the point where every rank has its list, before anyone writes
        good = int(dist.all_reduce_sum(np.array([len(mine) - len(early)], dtype=np.int64))[0])
        counts = Counts(skipped=left.skipped if dist.is_main else 0)
        if not good:  # nothing any rank can segment: no model, nothing written
            counts.failed = len(early)
            total = dist.all_reduce_sum(np.array([0, counts.skipped, counts.failed], dtype=np.int64))
            failures = [(items[i].path, early[i]) for i in mine if i in early]
            return _report(prog, dist, len(items), total, 0.0, out if folder.configured else None, failures)
        # this rank's GPU under torchrun (a plain "cuda" would put every rank on one device)
        device = str(dist.device) if dist.device is not None and args.device in (None, "cuda") else args.device
        seg = make_segmenter(classes, device)

        def prepare():
            if args.overwrite:
                _discard_other_configuration(folder)
            folder.prepare(args.overwrite)
            fileio.discard(fileio.stale_partials(files))  # left by a killed run; the lock keeps writers out

        dist.run_on_main(prepare, "use the output folder", CdamInputError)  # the others wait before writing
        start = time.perf_counter()
        bar = tqdm(total=len(mine), desc="segment", unit="image", disable=not dist.is_main or len(items) < 2)

        def load(i):
            if i in early:
                raise CdamInputError(early[i])
            return open_image(items[i].path)

        try:
            for i, (image, error) in zip(mine, prefetched(_caught(load), mine, PREFETCH)):
                ok, line = _segment_item(items[i], files[i], image, error, seg, folder, dist.rank)
                counts.done += ok
                counts.failed += not ok
                if ok or i not in early:  # the pre-check already named its failures
                    tqdm.write(line if ok else f"{prog}: error: {line}", file=sys.stdout if ok else sys.stderr)
                bar.update(1)
        except KeyboardInterrupt:
            raise Interrupted(counts.done) from None
        finally:
            bar.close()
            folder.close()
        total = dist.all_reduce_sum(np.array([counts.done, counts.skipped, counts.failed], dtype=np.int64))
        seconds = time.perf_counter() - start  # after the reduction: the slowest rank's time
        failures = _failures(folder, items, left.todo) if dist.is_main and total[2] else []
        if dist.is_main and created is not None and not total[0] and not total[1]:
            _remove_run_folder(out, created)  # nothing segmented: leave no folder behind
            out = None
        return _report(prog, dist, len(items), total, seconds, out, failures)


def _report(prog, dist, n_items: int, total, seconds: float, out, failures) -> int:
    """Rank 0 prints the summary and the failures; every rank returns the exit status."""
    done, skipped, failed = (int(x) for x in total)
    if dist.is_main:
        rate = f", {done / seconds:.3f} images/s" if done and seconds > 0 else ""
        procs = f" on {dist.world_size} processes" if dist.world_size > 1 else ""
        where = f"; manifest: {out / (MANIFEST_PREFIX + '.rank*.jsonl')}" if out is not None else ""
        print(f"{prog}: {n_items} image{'' if n_items == 1 else 's'}: {done} done, {skipped} skipped (already done), {failed} failed"
              f"{rate}{procs}{where}", file=sys.stderr)
        if failed and not done and not skipped:
            print(f"{prog}: error: no image can be segmented", file=sys.stderr)
        if failed:
            print(f"{prog}: {failed} image(s) failed:", file=sys.stderr)
            for path, message in failures:
                print(f"  {_line(path, message)}", file=sys.stderr)
            if len(failures) < failed:  # only when nothing was written under several ranks
                print(f"  ... and {failed - len(failures)} on other ranks (named in their output above)",
                      file=sys.stderr)
    return 0 if not failed else (1 if done or skipped else 2)


def _failures(folder: RunFolder, items, todo) -> list:
    """(image, error) of this run's failed images, in input order, from every rank's manifest
    (each image's newest record: an earlier run's failure on another rank does not count)."""
    last = latest(folder.records(), "name")
    return [(last[items[i].name]["image"], last[items[i].name]["error"]) for i in todo
            if last.get(items[i].name, {}).get("status") == "failed"]


def _first_missing(path: Path):
    """The outermost folder of `path` (itself included) that does not exist yet, or None."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _remove_run_folder(out: Path, top: Path) -> None:
    """Remove what a run that segmented nothing wrote (its configuration and manifest, empty
    folders) up to `top`, the outermost folder it created; anything else stays."""
    for p in [out / CONFIG_FILE, *out.glob(f"{MANIFEST_PREFIX}.rank*.jsonl")]:
        p.unlink(missing_ok=True)
    for d in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _rmdir(d)
    _remove_empty_folders(out, top)


def _remove_empty_folders(out: Path, top: Path) -> None:
    """Remove `out` and its parents up to `top` while they are empty."""
    for d in (out, *out.parents):
        if not _rmdir(d) or d == top:
            break


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()  # only succeeds when empty
        return True
    except OSError:
        return False


def _segment_item(item, paths, image, error, seg, folder: RunFolder, rank: int):
    """Segment and write one image, record it in the manifest: (True, its line) or (False, the error)."""
    t0 = time.perf_counter()
    record = {"image": item.path, "name": item.name, "rank": rank, "outputs": [_rel(p, folder.folder) for p in paths]}
    partial = fileio.partial_paths(paths)
    try:
        if error is not None:
            raise error
        labels = seg.predict(image, name=f"image {item.path!r}")
        fileio.write_outputs(seg, item.path, np.asarray(image), labels, partial)
        publish_recorded(folder, record, partial, paths, round(time.perf_counter() - t0, 3))
    except Exception as e:  # one bad image never stops the shard (a newer "failed" record overrides "done")
        fileio.discard(partial)
        message = error_message(e)
        folder.append({**record, "status": "failed", "error": message, "seconds": round(time.perf_counter() - t0, 3)})
        return False, _line(item.path, message)
    return True, fileio.summary_line(item.path, labels, seg, paths)


def publish_recorded(folder: RunFolder, record: dict, partial, paths, seconds: float) -> None:
    """Record an image done, then rename its partial files into place (after the record: a file
    the manifest lists is either complete or absent). A failed rename removes the image's files,
    partial and listed (listed, so ours: none of a half-published image stays), and raises for
    the caller to record the failure (a newer "failed" record overrides "done")."""
    folder.append({**record, "status": "done", "error": None, "seconds": seconds})
    try:
        fileio.publish(partial, paths)
    except Exception:
        fileio.discard(partial)
        fileio.discard(paths)
        raise


def _discard_other_configuration(folder: RunFolder) -> None:
    """--overwrite over another configuration's results discards them, as the refusal says: the
    outputs its manifests list are deleted (prepare() then deletes the manifests), so the folder
    never mixes two configurations. Results of this configuration are only ever replaced."""
    if folder.configured or not (folder.folder / folder.config_file).exists():
        return
    for record in folder.records():
        for name in record.get("outputs") or ():
            (folder.folder / name).unlink(missing_ok=True)


def read_manifest(out) -> list[dict]:
    """Every record of an output folder's manifest (all ranks, all runs, in order)."""
    folder = RunFolder(out, {}, config_file=CONFIG_FILE, prefix=MANIFEST_PREFIX)
    return list(folder.records())
