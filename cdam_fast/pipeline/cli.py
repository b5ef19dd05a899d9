"""`cdam-fast segment`: label maps and overlays for image files."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..dispatch import BackendUnavailableError
from ..validation import CdamInputError
from . import cliper_options
from .options import add_model_options, add_protocol_options, model_options, segmenter_defaults, segmenter_options

DEFAULT_OUT = "cdam_segment_out"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="segment images with CLIP + CDAM (label PNG and overlay per image)",
        description="Open-vocabulary segmentation of image files. For each IMAGE writes OUT/<name>_labels.png "
                    "(class index per pixel, one byte per pixel, input size, a palette PNG coloured like the overlay), "
                    "OUT/<name>_overlay.png (colour overlay with a legend) and OUT/<name>_classes.json (label value "
                    "-> class), and prints one summary line. A bad image is reported and skipped; the exit status "
                    "is 1 when any image failed, 2 when nothing could be done.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--classes", help='comma-separated class names, synonyms joined by ";" '
                                       '(e.g. "background,cat,person; people")')
    src.add_argument("--classes-file", metavar="F", help="file with one class per line (synonyms joined by ';'), "
                                                         "or a packaged list: voc21, context60, coco_object, ...")
    add_model_options(p)  # the option set shared with `eval` and the published table (options.py)
    add_protocol_options(p)
    cliper_options.add_arguments(p)  # --method cliper's own options
    p.add_argument("--window-batch", type=int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files without asking")
    p.set_defaults(func=run)


def _output_paths(images, out: Path) -> list:
    """OutputPaths (labels, overlay, classes) per image; inputs with the same file name get -2, -3, ..."""
    from .fileio import output_paths

    return output_paths(images, out)


def _check_outputs(images, paths, overwrite: bool) -> None:
    inputs = {os.path.realpath(i) for i in images}
    flat = [p for pair in paths for p in pair]
    for p in flat:
        if os.path.realpath(p) in inputs:
            raise CdamInputError(f"output {str(p)!r} would replace an input image; choose another --out")
    existing = [p for p in flat if p.exists()]
    if not existing or overwrite:
        return
    if sys.stdin.isatty():
        answer = input(f"{len(existing)} output file(s) exist (e.g. {existing[0]}); overwrite? [y/N] ")
        if answer.strip().lower() in ("y", "yes"):
            return
    raise CdamInputError(f"{len(existing)} output file(s) exist (e.g. {str(existing[0])!r}); "
                         "pass --overwrite to replace them or choose another --out")


def _error(message) -> None:
    print(f"cdam-fast segment: error: {message}", file=sys.stderr)


def run(args) -> int:
    from .model import WeightsUnavailableError

    try:
        return _run(args)
    except (CdamInputError, BackendUnavailableError, FileNotFoundError) as e:
        _error(e)
        return 2
    except (ImportError, WeightsUnavailableError) as e:  # a missing extra, weights that cannot be had
        _error(e)
        return 1


def _precheck(args, protocol, paths) -> tuple:
    """(good [(image, paths)], failures [(image, message)]): every image's header and size
    checked before the (slow) model load, so a bad file is named at once and costs only itself."""
    from functools import partial

    from .fileio import check_image_file, model_patch_size
    from .segmenter import plan_image

    patch = model_patch_size(args.model)
    good, failures = [], []
    for img, files in zip(args.images, paths):
        # a segmenter method may leave sizes to its class (None): check with the general defaults
        sizes = {**segmenter_defaults(), **{k: v for k, v in protocol.items() if v is not None}}
        plan = partial(_plan, plan_image, patch, args.model, sizes)
        try:
            check_image_file(img, patch, plan)
        except CdamInputError as e:
            failures.append((img, str(e)))
            _error(e)
            continue
        good.append((img, files))
    return good, failures


def _plan(plan_image, patch, model, o, H, W, what):
    return plan_image(H, W, patch, o["mode"], o["short_side"], o["long_side"], o["crop"], o["stride"], what, model)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass


def _run(args) -> int:
    import warnings

    from tqdm.auto import tqdm

    from .fileio import segment_files
    from .segmenter import Segmenter
    from .text import read_class_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        classes = read_class_file(args.classes_file) if args.classes_file else args.classes
    for w in caught:
        print(f"cdam-fast segment: warning: {w.message}", file=sys.stderr)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CdamInputError(f"--out {str(out)!r} exists and is not a folder")
    paths = _output_paths(args.images, out)
    _check_outputs(args.images, paths, args.overwrite)
    protocol = segmenter_options(args)
    good, failures = _precheck(args, protocol, paths)
    if not good:
        raise CdamInputError("no image can be segmented" if len(failures) > 1 else failures[0][1])
    seg = Segmenter(classes, window_batch=args.window_batch, **model_options(args), **protocol,
                    **cliper_options.cliper_settings(args))
    created = not out.exists()
    bar = tqdm(total=len(good), desc="segment", unit="image", disable=len(good) < 2)
    try:
        for record in segment_files(seg, [g for g, _ in good], [p for _, p in good]):
            if record.ok:
                tqdm.write(record.line)
            else:
                failures.append((record.source, record.error))
                tqdm.write(f"cdam-fast segment: error: {record.error}", file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
        if created:
            _remove_if_empty(out)  # nothing written: leave no empty folder behind
    if failures:
        done = len(args.images) - len(failures)
        print(f"cdam-fast segment: {len(failures)} of {len(args.images)} image(s) failed ({done} segmented):",
              file=sys.stderr)
        for img, message in failures:
            print(f"  {message}" if str(img) in message else f"  {img}: {message}", file=sys.stderr)
        return 1
    return 0
