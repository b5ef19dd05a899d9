"""Image files in, label files out: the output files of `cdam-fast segment` (and of the Ray
script), and the checks made on image files before the model loads.

For an input named `photo` (see inputs.py: a file's stem, or its path below an input folder)
the outputs are `<out>/photo_labels.png` (class index per pixel, as a palette PNG whose colours
match the overlay), `<out>/photo_overlay.png` (colour overlay with a legend) and
`<out>/photo_classes.json` (which class each label value means, and how the map was made).
Writers put them under temporary names (`partial_paths`) and rename them into place
(`publish`), so an interrupted run leaves no half-written output; the run loop that does so,
with its manifest and resume, is bulk.py.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .images import image_size
from .inputs import InputImage, unique_names

#: What each image gets in the output folder: OUT/<name><suffix>, in OutputPaths order.
OUTPUT_SUFFIXES = {"labels": "_labels.png", "overlay": "_overlay.png", "classes": "_classes.json"}


@dataclass(frozen=True)
class OutputPaths:
    labels: Path
    overlay: Path
    classes: Path

    def __iter__(self):
        return iter(tuple(getattr(self, f.name) for f in fields(self)))


def output_paths(items, out) -> list:
    """OutputPaths per image (an InputImage, or a path named by its stem) in `out`; colliding
    names get -2, -3, ... in order."""
    out = Path(out)
    items = unique_names([it if isinstance(it, InputImage) else InputImage(os.fspath(it), Path(it).stem)
                          for it in items])
    return [OutputPaths(*(out / f"{it.name}{s}" for s in OUTPUT_SUFFIXES.values())) for it in items]


def partial_paths(paths: OutputPaths) -> OutputPaths:
    """Where `paths` are written before `publish` renames them into place: hidden names in the
    same folder (so the rename is atomic) that keep the suffix (writers pick the format by it)
    and are unique to the call (pid and a random token), so two writers never share one."""
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    return OutputPaths(*(p.with_name(f".{p.stem}.part{tag}{p.suffix}") for p in paths))


_PARTIAL = re.compile(r"^\.(?P<stem>.+)\.part\d+-[0-9a-f]{8}(?P<suffix>\.[^.]+)$")  # partial_paths' names


def stale_partials(groups) -> list:
    """The partial files (partial_paths) of these outputs (OutputPaths each) that writers killed
    mid-write left behind, one listing per folder. Deleting them is safe only while no writer of
    these outputs runs (bulk.py holds the folder's run lock)."""
    finals = {Path(p) for group in groups for p in group}
    found = []
    for folder in {p.parent for p in finals}:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            m = _PARTIAL.match(entry.name)
            if m and folder / f"{m['stem']}{m['suffix']}" in finals:
                found.append(folder / entry.name)
    return sorted(found)


def publish(partial: OutputPaths, paths: OutputPaths) -> None:
    """Rename each partial file onto its final name (os.replace: readers see the old file or the
    new one, never half of one)."""
    for tmp, final in zip(partial, paths):
        tmp.replace(final)


def discard(partial: OutputPaths) -> None:
    for tmp in partial:
        tmp.unlink(missing_ok=True)


def check_output_folder(out, option: str = "--out") -> None:
    """A CdamInputError naming `option` when the output folder `out` cannot be created or written
    (below a file, on a read-only or virtual file system), found by creating and removing a
    probe folder in its nearest existing ancestor, so that it fails before the model loads."""
    import tempfile

    from ..validation import CdamInputError

    path = Path(out).expanduser()
    base = path
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise CdamInputError(f"{option} {str(out)!r} cannot be created: {str(base)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cdam-probe-", dir=base))
    except OSError as e:
        raise CdamInputError(f"{option} {str(out)!r} cannot be created or written: {str(base)!r}: "
                             f"{e.strerror or e}") from None


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
    """The label PNG, the overlay and the class mapping of one image, at `paths` (callers pass
    partial_paths and publish them)."""
    from .visualize import overlay, save_labels

    H, W = labels.shape
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    overlay(np.asarray(image), labels, seg.class_names).save(paths.overlay, format="PNG")
    text = json.dumps(class_mapping(seg, source, (W, H)), indent=1)
    Path(paths.classes).write_text(text + "\n", encoding="utf-8")
    save_labels(labels, paths.labels, len(seg.classes), palette_colours=True)
