"""Image files in, label files out: the per-image work of `cdam-fast segment`, robust per image.

For an input `photo.jpg` the outputs are `<out>/photo_labels.png` (class index per pixel, as a
palette PNG whose colours match the overlay), `<out>/photo_overlay.png` (colour overlay with a
legend) and `<out>/photo_classes.json` (which class each label value means, and how the map
was made). Every file is written to a temporary name and renamed into place, so an
interrupted run leaves no half-written output. `segment_file` / `segment_files` return one
`ImageRecord` per image, with the error instead of raising: one bad image costs only itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..validation import CdamInputError
from .images import image_size, open_image

OUTPUT_KINDS = ("labels", "overlay", "classes")
_SUFFIX = {"labels": "_labels.png", "overlay": "_overlay.png", "classes": "_classes.json"}


@dataclass(frozen=True)
class OutputPaths:
    labels: Path
    overlay: Path
    classes: Path

    def __iter__(self):
        return iter((self.labels, self.overlay, self.classes))


@dataclass
class ImageRecord:
    """What happened to one input image."""
    source: str
    outputs: OutputPaths | None = None
    size: tuple | None = None  # (W, H) of the input as viewers show it
    error: str | None = None
    line: str = ""  # the one-line summary the CLI prints
    shares: list = field(default_factory=list)  # [(class index, name, fraction of pixels)]

    @property
    def ok(self) -> bool:
        return self.error is None


def output_paths(images, out) -> list:
    """OutputPaths per image in `out`; inputs with the same file stem get -2, -3, ..."""
    out = Path(out)
    seen, paths = {}, []
    for img in images:
        stem = Path(img).stem
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        name = stem if n == 1 else f"{stem}-{n}"
        paths.append(OutputPaths(*(out / f"{name}{_SUFFIX[k]}" for k in OUTPUT_KINDS)))
    return paths


def model_patch_size(model: str) -> tuple | None:
    """(ph, pw) of an open_clip model from its config, without building it (None if unknown)."""
    from .model import _open_clip

    cfg = _open_clip().get_model_config(model) if isinstance(model, str) else None
    patch = ((cfg or {}).get("vision_cfg") or {}).get("patch_size")
    if isinstance(patch, int):
        return (patch, patch)
    if isinstance(patch, (tuple, list)) and len(patch) == 2:
        return tuple(int(p) for p in patch)
    return None


def check_image_file(path, patch, plan) -> tuple:
    """(W, H) of an image file that can be segmented, else a CdamInputError naming it. Reads the
    header only; `plan(H, W, what)` applies the protocol's size rules (segmenter.plan_image)."""
    W, H = image_size(path)
    if patch is not None:
        plan(H, W, f"image {os.fspath(path)!r}")
    return W, H


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def class_mapping(seg, source: str, size: tuple) -> dict:
    """The JSON written beside a label map: label value -> class (name, synonyms, colour)."""
    from .visualize import palette

    colours = palette(len(seg.classes))
    return {
        "image": source,
        "size": {"width": size[0], "height": size[1]},
        "classes": [{"value": i, "name": syn[0], "synonyms": list(syn), "color": [int(c) for c in colours[i]]}
                    for i, syn in enumerate(seg.classes.synonyms)],
        "method": seg.method_name, "cdam": seg.cdam, "model": seg.backbone.name, "weights": seg.backbone.source,
        "mode": seg.mode, "background": seg.background,
    }


def summary_line(source: str, labels: np.ndarray, seg, paths: OutputPaths | None = None) -> str:
    from .visualize import class_shares

    shares = ", ".join(f"{n} {100 * s:.1f}%" for _, n, s in class_shares(labels, list(seg.class_names))[:6])
    H, W = labels.shape
    line = (f"{source}: {W}x{H}, {seg.method_name}{' + CDAM' if seg.cdam else ''}, "
            f"{seg.backbone.name} [{seg.backbone.source}]: {shares}")
    return line if paths is None else f"{line} -> {paths.labels}, {paths.overlay}"


def write_outputs(seg, source: str, image: np.ndarray, labels: np.ndarray, paths: OutputPaths) -> None:
    """The label PNG, the overlay and the class mapping of one image (each written atomically;
    the label map last, so that its presence means the image is done)."""
    from .visualize import overlay, save_labels

    H, W = labels.shape
    picture = overlay(image, labels, seg.class_names)
    _atomic_write(paths.overlay, lambda tmp: picture.save(tmp, format="PNG"))
    text = json.dumps(class_mapping(seg, source, (W, H)), indent=1)
    _atomic_write(paths.classes, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    _atomic_write(paths.labels, lambda tmp: save_labels(labels, tmp, palette_colours=True))


def _finish(seg, source: str, result, paths: OutputPaths) -> ImageRecord:
    from .visualize import class_shares

    labels = seg.label_map(result)
    H, W = labels.shape
    write_outputs(seg, source, np.asarray(open_image(source)), labels, paths)
    return ImageRecord(source, paths, (W, H), None, summary_line(source, labels, seg, paths),
                       class_shares(labels, list(seg.class_names)))


def _error_record(source: str, e: BaseException, paths=None) -> ImageRecord:
    message = str(e) if isinstance(e, (CdamInputError, OSError)) else f"{type(e).__name__}: {e}"
    return ImageRecord(source, paths, error=message, line=f"{source}: error: {message}")


def segment_files(seg, sources, paths) -> "iter[ImageRecord]":
    """Segment image files and write their outputs, one ImageRecord per file, in order, as each
    is done; windows of consecutive images share forward passes. Never raises for one image."""
    sources = [os.fspath(s) for s in sources]
    for i, result in seg.results_or_errors(sources):  # errors name each file
        if isinstance(result, Exception):
            yield _error_record(sources[i], result, paths[i])
            continue
        try:
            yield _finish(seg, sources[i], result, paths[i])
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: reported, the others go on
            yield _error_record(sources[i], e, paths[i])


def segment_file(seg, source, paths: OutputPaths) -> ImageRecord:
    """One image file -> its outputs; an ImageRecord with `error` set instead of an exception."""
    return next(iter(segment_files(seg, [source], [paths])))
