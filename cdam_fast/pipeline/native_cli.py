"""`cdam-fast segment --native` / `--scale F`: large images at their own resolution.

Same inputs, output folder, configuration file, manifest and resume rules as bulk.py, with
two differences: each image's outputs are streamed.py's (tiled label TIFF, preview, class
mapping), and under torchrun the *bands* of every image are sharded over the ranks (rank 0
assembles and writes), instead of whole images; a killed run resumes from the bands it had
stored (bandstore.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..runstore import RunFolder
from ..validation import CdamInputError
from . import bulk, native
from .inputs import IMAGE_EXTENSIONS, expand_inputs
from .streamed import NATIVE_SUFFIXES, PREVIEW_SIDE, native_output_paths, plan_and_store, segment_image, summary_line

# native options that do not change what is written (left out of segment.json)
_NOT_CONFIG = ("max_pixels", "keep_bands")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("native resolution (large, aerial, slide images; see docs/native-resolution.md)")
    g.add_argument("--native", action="store_true",
                   help="no protocol resize: windows of --crop at --stride over the image at its own resolution, read "
                        "from disk a band at a time; writes OUT/<name>_labels.tif (tiled, palette, GeoTIFF tags "
                        "copied), _preview.png and _classes.json (same as --scale 1)")
    g.add_argument("--scale", type=float, default=None, metavar="F",
                   help="like --native with the image scaled by F first (0.5: half the resolution, e.g. to reach "
                        "a ground resolution the model suits); labels stay at the input's size")
    g.add_argument("--global-tokens", dest="global_tokens", type=int, default=native.DEFAULT_GLOBAL_TOKENS,
                   metavar="N", help="with --mode global: CDAM runs across the tokens of tiles of at most N tokens "
                                     f"(default {native.DEFAULT_GLOBAL_TOKENS})")
    g.add_argument("--max-pixels", dest="max_pixels", type=int, default=None, metavar="N",
                   help="decoding limit for PNG / JPEG (decoded whole by Pillow): refuse larger images "
                        "(default: Pillow's decompression-bomb limit, about 89.5 megapixels)")
    g.add_argument("--preview-size", dest="preview_size", type=int, default=PREVIEW_SIDE, metavar="PX",
                   help=f"long side of the preview overlay (default {PREVIEW_SIDE})")
    g.add_argument("--keep-bands", dest="keep_bands", action="store_true",
                   help="keep the stored window logits (OUT/.bands/) after an image is done")


def requested(args) -> bool:
    return bool(getattr(args, "native", False)) or getattr(args, "scale", None) is not None


def segmenter_options(args) -> dict:
    """Segmenter keywords of the native options (checked before the model loads)."""
    if args.native and args.scale not in (None, 1.0):
        raise CdamInputError(f"--native means --scale 1; got --scale {args.scale:g} too")
    for flag, value in (("--preview-size", args.preview_size), ("--max-pixels", args.max_pixels)):
        if value is not None and value < 1:
            raise CdamInputError(f"{flag} must be a positive integer, got {value}")
    scale = native.check_scale(1.0 if args.scale is None else args.scale)
    return {"scale": scale, "global_tokens": native.check_global_tokens(args.global_tokens)}


def _header_check(path: str, max_pixels, patch, scale: float) -> None:
    """Readable, within the decoding limit and at least one patch at the scale, from the header
    (no model)."""
    from .images import image_size
    from .rasters import NPY_EXTENSIONS, TIFF_EXTENSIONS, _too_large, decoding_limit, open_raster, pillow_limit

    if path.lower().endswith(TIFF_EXTENSIONS + NPY_EXTENSIONS):
        with open_raster(path) as r:
            H, W = r.size
    else:
        limit = pillow_limit() if max_pixels is None else max_pixels
        with decoding_limit(path, limit):  # --max-pixels raises Pillow's guard for the header too
            W, H = image_size(path)
        if W * H > limit:
            raise CdamInputError(_too_large(path, W, H, limit))
    if patch is not None:
        native.check_size(H, W, patch, scale, f"image {path!r}")


def run(args, *, classes, settings, make_segmenter, prog: str = "cdam-fast segment") -> int:
    from tqdm.auto import tqdm

    from ..distributed import distributed_context
    from . import fileio
    from .rasters import NPY_EXTENSIONS, open_raster

    out = Path(args.out).expanduser()
    items = expand_inputs(args.images, exclude=out, extensions=IMAGE_EXTENSIONS + NPY_EXTENSIONS)
    files = native_output_paths(items, out)
    bulk.check_not_inputs(items, files)
    config = bulk.run_config(args, classes, settings)
    for key in _NOT_CONFIG:
        config.pop(key, None)
    config["outputs"] = list(NATIVE_SUFFIXES.values())
    use_cuda = None if args.device is None else str(args.device).startswith("cuda")
    with distributed_context(use_cuda=use_cuda) as dist, ExitStack() as on_exit:
        folder = RunFolder(out, config, dist.rank, config_file=bulk.CONFIG_FILE, prefix=bulk.MANIFEST_PREFIX,
                           option="--out")

        def check():  # rank 0 holds the folder's run lock for the run, as bulk.run does
            on_exit.callback(folder.lock().release)
            folder.check(args.overwrite)
            if not args.overwrite:
                bulk.check_foreign(files, folder, bulk.plan(items, files, folder, False))

        dist.run_on_main(check, "use the output folder", CdamInputError)
        left = bulk.plan(items, files, folder, args.overwrite)
        folder.run = left.run
        patch = fileio.model_patch_size(args.model)
        early = {}
        for i in left.todo:
            try:
                _header_check(items[i].path, args.max_pixels, patch, settings["scale"])
            except Exception as e:  # noqa: BLE001
                early[i] = bulk.error_message(e)
        counts = bulk.Counts(skipped=left.skipped if dist.is_main else 0)
        if dist.is_main:
            for i, message in early.items():
                print(f"{prog}: error: {bulk._line(items[i].path, message)}", file=sys.stderr)
        if len(early) == len(left.todo):  # the same on every rank: nothing to segment, no model
            counts.failed = len(early) if dist.is_main else 0
            total = dist.all_reduce_sum(np.array([0, counts.skipped, counts.failed], dtype=np.int64))
            failures = [(items[i].path, early[i]) for i in left.todo] if dist.is_main else []
            return bulk._report(prog, dist, len(items), total, 0.0, out if folder.configured else None, failures)
        device = str(dist.device) if dist.device is not None and args.device in (None, "cuda") else args.device
        seg = make_segmenter(classes, device)

        def prepare():
            if args.overwrite:
                bulk._discard_other_configuration(folder)
            folder.prepare(args.overwrite)
            fileio.discard(fileio.stale_partials(files))  # left by a killed run; the lock keeps writers out

        dist.run_on_main(prepare, "use the output folder", CdamInputError)
        start = time.perf_counter()
        try:
            for i in left.todo:
                item, paths = items[i], files[i]
                record = {"image": item.path, "name": item.name, "rank": dist.rank,
                          "outputs": [bulk._rel(q, out) for q in paths]}
                t0 = time.perf_counter()
                error, result, raster = early.get(i), None, None
                if error is None:
                    try:
                        raster = open_raster(item.path, args.max_pixels)
                        _, store = plan_and_store(seg, raster, out, item.name, config)
                    except Exception as e:  # noqa: BLE001
                        error = bulk.error_message(e)
                    # every rank must agree before the collective steps of segment_image
                    if int(dist.all_reduce_sum(np.array([error is not None], dtype=np.int64))[0]) and error is None:
                        error = "failed to open on another rank (its error is in that rank's output)"
                    if error is None:
                        try:
                            result = segment_image(seg, raster, paths, store, dist, preview_side=args.preview_size,
                                                   progress=dist.is_main)
                        except Exception as e:  # noqa: BLE001 - one bad image never stops the run
                            error = bulk.error_message(e)
                    if raster is not None:
                        raster.close()
                if not dist.is_main:
                    continue
                seconds = round(time.perf_counter() - t0, 3)
                if error is None:
                    class_counts, partial = result
                    try:
                        bulk.publish_recorded(folder, record, partial, paths, seconds)
                    except Exception as e:  # noqa: BLE001 - a failed rename costs only this image
                        error = bulk.error_message(e)
                if error is not None:
                    counts.failed += 1
                    folder.append({**record, "status": "failed", "error": error, "seconds": seconds})
                    if i not in early:
                        tqdm.write(f"{prog}: error: {bulk._line(item.path, error)}", file=sys.stderr)
                    continue
                if not args.keep_bands:
                    store.remove()
                counts.done += 1
                tqdm.write(summary_line(item.path, class_counts, seg, (raster.height, raster.width), paths),
                           file=sys.stdout)
        except KeyboardInterrupt:
            raise bulk.Interrupted(counts.done) from None
        finally:
            folder.close()
        total = dist.all_reduce_sum(np.array([counts.done, counts.skipped, counts.failed], dtype=np.int64))
        seconds = time.perf_counter() - start
        failures = bulk._failures(folder, items, left.todo) if dist.is_main and total[2] else []
        return bulk._report(prog, dist, len(items), total, seconds, out, failures)


__all__ = ["add_arguments", "requested", "run", "segmenter_options"]
