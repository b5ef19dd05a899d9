"""`cdam-fast segment`: label maps and overlays for image files."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..dispatch import BACKENDS, BackendUnavailableError
from ..validation import CdamInputError
from .methods import METHODS
from .windows import CROP, LONG_SIDE_MAX, SHORT_SIDE, STRIDE

DEFAULT_OUT = "cdam_segment_out"


def _background(text: str):
    if text.lower() == "none":
        return None
    if text in ("auto", "entropy", "entropy-per-window"):
        return text
    try:
        return float(text)
    except ValueError:
        raise CdamInputError(f"--background must be auto, entropy, entropy-per-window, none or a number, "
                             f"got {text!r}") from None


def add_weights_arguments(p) -> None:
    """--quick-gelu / --no-quick-gelu and --cache-dir (shared by segment and eval)."""
    import argparse

    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="QuickGELU activations (OpenAI CLIP checkpoints use them; default: follow the weights tag, "
                        "or the model's 'openai' tag for a local file)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="disk cache of text embeddings ('off' to disable; default $CDAM_FAST_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/cdam_fast or ~/.cache/cdam_fast)")


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
    p.add_argument("--method", default="maskclip", choices=tuple(METHODS), help="last-layer method (default maskclip)")
    p.add_argument("--no-cdam", action="store_true", help="the method alone, without the CDAM refinement")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip tag (downloaded on request), local checkpoint PATH, or 'none' for random "
                        "weights from a fixed seed (default openai)")
    p.add_argument("--mode", default="window", choices=("window", "global"),
                   help="sliding 448 windows (published protocol) or the whole image at once (default window)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="CDAM op backend (default auto)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="autocast dtype on CUDA (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--background", default="auto", type=str,
                   help="auto (entropy threshold when the first class is 'background'), entropy, "
                        "entropy-per-window, none, or a fixed probability threshold")
    p.add_argument("--templates", default="openai", metavar="openai|single|FILE",
                   help="prompt templates: openai (the 80 ImageNet ones), single, or a file with one per line")
    add_weights_arguments(p)
    p.add_argument("--window-batch", type=int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--short-side", type=int, default=SHORT_SIDE,
                   help=f"images are resized to this short side (default {SHORT_SIDE})")
    p.add_argument("--long-side", type=int, default=LONG_SIDE_MAX,
                   help=f"... unless the long side would exceed this (default {LONG_SIDE_MAX})")
    p.add_argument("--crop", type=int, default=CROP, help=f"window size in window mode (default {CROP})")
    p.add_argument("--stride", type=int, default=STRIDE, help=f"window stride in window mode (default {STRIDE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights for --pretrained none")
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


def _precheck(args, paths) -> tuple:
    """(good [(image, paths)], failures [(image, message)]): every image's header and size
    checked before the (slow) model load, so a bad file is named at once and costs only itself."""
    from functools import partial

    from .fileio import check_image_file, model_patch_size
    from .segmenter import plan_image

    patch = model_patch_size(args.model)
    good, failures = [], []
    for img, files in zip(args.images, paths):
        plan = partial(_plan, plan_image, patch, args)
        try:
            check_image_file(img, patch, plan)
        except CdamInputError as e:
            failures.append((img, str(e)))
            _error(e)
            continue
        good.append((img, files))
    return good, failures


def _plan(plan_image, patch, args, H, W, what):
    return plan_image(H, W, patch, args.mode, args.short_side, args.long_side, args.crop, args.stride, what,
                      args.model)


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
    good, failures = _precheck(args, paths)
    if not good:
        raise CdamInputError("no image can be segmented" if len(failures) > 1 else failures[0][1])
    pretrained = None if args.pretrained.strip().lower() == "none" else args.pretrained
    seg = Segmenter(classes, model=args.model, pretrained=pretrained, method=args.method, cdam=not args.no_cdam,
                    mode=args.mode, backend=args.backend, device=args.device, dtype=args.dtype,
                    background=_background(args.background), templates=args.templates,
                    window_batch=args.window_batch, seed=args.seed, short_side=args.short_side,
                    long_side=args.long_side, crop=args.crop, stride=args.stride, quick_gelu=args.quick_gelu,
                    cache_dir=args.cache_dir)
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
