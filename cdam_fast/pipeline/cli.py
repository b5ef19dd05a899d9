"""`cdam-fast segment`: label maps and overlays for image files."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..dispatch import BACKENDS, BackendUnavailableError
from ..validation import CdamInputError
from . import cliper_options
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


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="segment images with CLIP + CDAM (label PNG and overlay per image)",
        description="Open-vocabulary segmentation of image files. For each IMAGE writes OUT/<name>_labels.png "
                    "(class index per pixel, one byte per pixel, input size) and OUT/<name>_overlay.png (colour "
                    "overlay with a legend), and prints one summary line.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--classes", help='comma-separated class names, synonyms joined by ";" '
                                       '(e.g. "background,cat,person; people")')
    src.add_argument("--classes-file", metavar="F", help="file with one class per line (synonyms joined by ';'), "
                                                         "or a packaged list: voc21, context60, coco_object, ...")
    p.add_argument("--method", default="maskclip", choices=tuple(METHODS) + ("cliper",),  # issue #14: + cliper
                   help="last-layer method, or cliper (CLIPer's early-layer fusion) (default maskclip)")
    p.add_argument("--no-cdam", action="store_true", help="the method alone, without the CDAM refinement")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip tag (downloaded on request), local checkpoint PATH, or 'none' for random "
                        "weights from a fixed seed (default openai)")
    p.add_argument("--mode", default=None, choices=("window", "global"),
                   help="sliding 448 windows (published protocol) or the whole image at once (default window; "
                        "global under CLIPer's protocol)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="CDAM op backend (default auto)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="autocast dtype on CUDA (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--background", default="auto", type=str,
                   help="auto (entropy threshold when the first class is 'background'), entropy, "
                        "entropy-per-window, none, or a fixed probability threshold")
    p.add_argument("--templates", default=None,
                   help="prompt templates: openai (the 80 ImageNet ones; default), single, or a file with one per line")
    p.add_argument("--window-batch", type=int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--short-side", type=int, default=None,
                   help=f"images are resized to this short side (default {SHORT_SIDE}; 336 under CLIPer's protocol)")
    p.add_argument("--long-side", type=int, default=LONG_SIDE_MAX,
                   help=f"... unless the long side would exceed this (default {LONG_SIDE_MAX})")
    p.add_argument("--crop", type=int, default=CROP, help=f"window size in window mode (default {CROP})")
    p.add_argument("--stride", type=int, default=STRIDE, help=f"window stride in window mode (default {STRIDE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights for --pretrained none")
    cliper_options.add_arguments(p)  # issue #14 hook: --cdam, --cdam-combine, --protocol, --compensation, --sd-weights
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files without asking")
    p.set_defaults(func=run)


def _output_paths(images, out: Path) -> list:
    """(labels path, overlay path) per image; inputs with the same file name get -2, -3, ..."""
    seen, paths = {}, []
    for img in images:
        stem = Path(img).stem
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        name = stem if n == 1 else f"{stem}-{n}"
        paths.append((out / f"{name}_labels.png", out / f"{name}_overlay.png"))
    return paths


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


def _summary(path, labels, names, method, cdam, files) -> str:
    from .visualize import class_shares

    shares = ", ".join(f"{n} {100 * s:.1f}%" for _, n, s in class_shares(labels, list(names))[:6])
    H, W = labels.shape
    return f"{path}: {W}x{H}, {method}{' + CDAM' if cdam else ''}: {shares} -> {files[0]}, {files[1]}"


def run(args) -> int:
    try:
        return _run(args)
    except (CdamInputError, BackendUnavailableError, FileNotFoundError) as e:
        print(f"cdam-fast segment: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"cdam-fast segment: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from .model import WeightsUnavailableError

        if isinstance(e, WeightsUnavailableError):
            print(f"cdam-fast segment: error: {e}", file=sys.stderr)
            return 1
        raise


def _run(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .images import open_image
    from .segmenter import Segmenter
    from .text import read_class_file
    from .visualize import overlay, save_labels

    for img in args.images:  # fail before the (slow) model load
        open_image(img)
    classes = read_class_file(args.classes_file) if args.classes_file else args.classes
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CdamInputError(f"--out {str(out)!r} exists and is not a folder")
    paths = _output_paths(args.images, out)
    _check_outputs(args.images, paths, args.overwrite)
    pretrained = None if args.pretrained.strip().lower() == "none" else args.pretrained
    # issue #14 hook: CLIPer's options ({} for the other methods); mode / templates / short side left
    # unset fall to the method's defaults (CLIPer's protocol presets choose their own)
    cliper = cliper_options.cliper_settings(args)
    unset = {k: getattr(args, k) for k in ("mode", "templates", "short_side") if getattr(args, k) is not None}
    seg = Segmenter(classes, model=args.model, pretrained=pretrained, method=args.method,
                    cdam=cliper_options.cdam_enabled(args), **cliper, **unset, backend=args.backend,
                    device=args.device, dtype=args.dtype, background=_background(args.background),
                    window_batch=args.window_batch, seed=args.seed, long_side=args.long_side, crop=args.crop,
                    stride=args.stride)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(args.images), desc="segment", unit="image", disable=len(args.images) < 2)
    for img, result, files in zip(args.images, seg.results(args.images), paths):
        labels = seg.label_map(result)
        save_labels(labels, files[0])
        overlay(np.asarray(open_image(img)), labels, seg.class_names).save(files[1])
        tqdm.write(_summary(img, labels, seg.class_names, args.method, seg.cdam, files))
        bar.update(1)
    bar.close()
    return 0
