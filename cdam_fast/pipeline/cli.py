"""`cdam-fast segment`: label maps and overlays for image files."""
from __future__ import annotations

import sys

from ..dispatch import BackendUnavailableError
from ..runstore import StoreError
from ..validation import CdamInputError
from . import cliper_options, native_cli
from .options import add_model_options, add_protocol_options, model_options, segmenter_defaults, segmenter_options

DEFAULT_OUT = "cdam_segment_out"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="segment images with CLIP + CDAM (label PNG and overlay per image)",
        description="Open-vocabulary segmentation of image files. For each image writes OUT/<name>_labels.png "
                    "(class index per pixel, one byte per pixel (two beyond 256 classes), input size, a palette PNG coloured "
                    "like the overlay), "
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
    add_model_options(p)  # the option set shared with `eval` and the published table (options.py)
    add_protocol_options(p)
    cliper_options.add_arguments(p)  # --method cliper's own options
    native_cli.add_arguments(p)  # --native / --scale: large images at their own resolution
    p.add_argument("--window-batch", type=int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files without asking, and redo the images an earlier run into "
                        "--out finished (default: skip them)")
    p.set_defaults(func=run)


def _error(message) -> None:
    print(f"cdam-fast segment: error: {message}", file=sys.stderr)


def run(args) -> int:
    from .bulk import Interrupted
    from .model import WeightsUnavailableError

    try:
        return _run(args)
    except (CdamInputError, BackendUnavailableError, FileNotFoundError, StoreError) as e:
        _error(e)
        return 2
    except (ImportError, WeightsUnavailableError) as e:  # a missing extra, weights that cannot be had
        _error(e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: what is finished is recorded, a rerun resumes
        done = e.done if isinstance(e, Interrupted) else 0
        print(f"cdam-fast segment: interrupted after {done} image{'' if done == 1 else 's'}; rerun to resume",
              file=sys.stderr)
        return 130


def check_backend(backend: str, device) -> None:
    """A BackendUnavailableError when an explicit --backend cannot run on the run's device."""
    import torch

    from ..dispatch import unavailable_reason

    if backend == "auto":
        return
    why = unavailable_reason(backend, device, torch.float32)
    if why is not None:
        raise BackendUnavailableError(f"--backend {backend} cannot run on {device.type}: {why}")


def check_crop(model: str, sizes: dict) -> None:
    """A CdamInputError when the windows are smaller than one patch of the model."""
    from .fileio import model_patch_size

    patch, crop = model_patch_size(model), sizes.get("crop")
    if patch is None or sizes.get("mode") != "window" or crop is None or crop >= max(patch):
        return
    raise CdamInputError(f"--crop {crop} is smaller than one {patch[1]}x{patch[0]} patch of {model}")


def _segmenter(args, classes, device, protocol, cliper):
    from .segmenter import Segmenter

    return Segmenter(classes, window_batch=args.window_batch, **{**model_options(args), "device": device},
                     **protocol, **cliper)


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
    from .fileio import check_output_folder
    from .model import check_device
    from .segmenter import resolve_dtype

    device = check_device(args.device)
    resolve_dtype(args.dtype, device)  # before torchrun's process group and the model load
    check_backend(args.backend, device)
    check_output_folder(args.out)
    protocol, cliper = segmenter_options(args), cliper_options.cliper_settings(args)
    # a segmenter method may leave sizes to its class (None): the pre-check uses the general defaults
    sizes = {**segmenter_defaults(), **{k: v for k, v in protocol.items() if v is not None}}
    check_crop(args.model, sizes)
    if native_cli.requested(args):
        scaled = {**protocol, **native_cli.segmenter_options(args)}
        return native_cli.run(args, classes=_classes(args), settings={**scaled, **cliper},
                              make_segmenter=lambda classes, device: _segmenter(args, classes, device, scaled, cliper))
    return bulk.run(args, classes=_classes(args), settings={**protocol, **cliper}, sizes=sizes,
                    make_segmenter=lambda classes, device: _segmenter(args, classes, device, protocol, cliper))
