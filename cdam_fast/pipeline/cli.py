"""`cdam-fast segment`: label maps and overlays for image files."""
from __future__ import annotations

import sys

from ..dispatch import BACKENDS, BackendUnavailableError
from ..runstore import StoreError
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
        description="Open-vocabulary segmentation of image files. For each image writes OUT/<name>_labels.png "
                    "(class index per pixel, one byte per pixel, input size, a palette PNG coloured like the overlay), "
                    "OUT/<name>_overlay.png (colour overlay with a legend) and OUT/<name>_classes.json (label value "
                    "-> class), and prints one line per image. Resumable: the folder keeps a manifest, and a rerun "
                    "skips the images it finished. A bad image is reported and skipped; the exit status is 1 "
                    "when any image failed, 2 when nothing could be done. Shards the images over processes "
                    "under torchrun.")
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive), globs ('photos/**/*.jpg') or .txt/.lst files listing "
                        "image paths; images whose outputs an earlier run into --out recorded are skipped")
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files without asking, and redo the images an earlier run into "
                        "--out finished (default: skip them)")
    p.set_defaults(func=run)


def _error(message) -> None:
    print(f"cdam-fast segment: error: {message}", file=sys.stderr)


def run(args) -> int:
    from .model import WeightsUnavailableError

    try:
        return _run(args)
    except (CdamInputError, BackendUnavailableError, FileNotFoundError, StoreError) as e:
        _error(e)
        return 2
    except (ImportError, WeightsUnavailableError) as e:  # a missing extra, weights that cannot be had
        _error(e)
        return 1


def _segmenter(args, classes, device):
    from .segmenter import Segmenter

    pretrained = None if args.pretrained.strip().lower() == "none" else args.pretrained
    return Segmenter(classes, model=args.model, pretrained=pretrained, method=args.method, cdam=not args.no_cdam,
                     mode=args.mode, backend=args.backend, device=device, dtype=args.dtype,
                     background=_background(args.background), templates=args.templates,
                     window_batch=args.window_batch, seed=args.seed, short_side=args.short_side,
                     long_side=args.long_side, crop=args.crop, stride=args.stride, quick_gelu=args.quick_gelu,
                     cache_dir=args.cache_dir)


def _classes(args):
    """The parsed class list; a class file's warnings (e.g. commas in a line) printed as such."""
    import warnings

    from .text import parse_classes, read_class_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        classes = read_class_file(args.classes_file) if args.classes_file else args.classes
    for w in caught:
        print(f"cdam-fast segment: warning: {w.message}", file=sys.stderr)
    return parse_classes(classes)


def _run(args) -> int:
    from . import bulk

    return bulk.run(args, classes=_classes(args),
                    make_segmenter=lambda classes, device: _segmenter(args, classes, device))
