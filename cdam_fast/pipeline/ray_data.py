"""CDAM segmentation as a Ray Data stage: `ray.data.Dataset.map_batches(RaySegmenter, ...)`.

    import ray
    from cdam_fast.pipeline.ray_data import RaySegmenter

    ds = ray.data.read_images("photos/", include_paths=True, mode="RGB")   # or from_items([{"path": p}, ...])
    ds = ds.map_batches(RaySegmenter, fn_constructor_kwargs={"classes": "background,cat,sofa", "shares": True},
                        batch_size=8, concurrency=2, num_gpus=1)         # as Ray expects; num_gpus=0 on CPU
    for row in ds.iter_rows(): ...   # row["path"], row["labels"] ([H, W] class indices), row["shares"], row["error"]

Ray builds one RaySegmenter per actor (`concurrency` actors), so the model and the text
embeddings are loaded once per actor, then called on batches in Ray Data's formats: a dict of
numpy arrays (the default; images stacked [B, H, W, 3] or, when sizes differ, an object array
of [H, W, 3] arrays) or a pandas DataFrame. Each row's image comes from `image_column` (uint8
or float [0, 1], [H, W] or [H, W, 1|3|4]) or, where that column is absent or None, is read
from the file in `path_column`.

Output columns (per row, in the input's order): `labels` ([H, W] class indices, uint8 up to
256 classes), `error` ("" for success, else the message of an image that failed: it gets an
empty [0, 0] label map and the batch goes on; a string column either way, since Ray turns an
all-None column into NaNs), optionally `shares` ([C] float32 fraction of pixels per
class, NaN for a failed image) and `overlay` ([H, W', 3] uint8 colour overlay with legend);
the other input columns (e.g. `path`) pass through, the image column is dropped unless
`keep_image`. Each image is computed on its own, so labels equal `Segmenter.predict`'s.

With `out=FOLDER` each actor also writes every image's files as `cdam-fast segment` does
(fileio.py: palette label PNG, overlay, class mapping JSON) to FOLDER/<name>_*, and returns
them in a `files` column (one string per row, the label PNG; "" for a failed row). Each file is
written under a temporary name unique to the writer in the same folder and renamed into place
(os.replace), so a reader never sees half a file. The name of a row's outputs is
`names[path]` where `names` gives one, else `output_name(path, root)`: the image's path
relative to `root`, folders kept and the file's extension too (`root="photos"`:
`photos/a/cat.jpg` -> FOLDER/a/cat.jpg_labels.png); without `root`, the whole path
(FOLDER/home/me/photos/a/cat.jpg_labels.png); a row read from a relative path (no image) is
named by that file's absolute path. Distinct files thus never share outputs,
whichever actor writes them (`a/cat.png` and `b/cat.png`, `cat.png` and `cat.jpg`).

This module does not import ray: it is the `[ray]` extra's entry point, and the core package
never imports it.
"""
from __future__ import annotations

import numpy as np

import os
from pathlib import Path

from ..validation import CdamInputError
from . import fileio
from .bulk import error_message
from .images import open_image
from .inputs import InputImage
from .visualize import overlay as draw_overlay

_EMPTY = np.zeros((0, 0), dtype=np.uint8)


class RaySegmenter:
    """A callable class for `Dataset.map_batches` (see the module doc).

    classes: as for Segmenter. image_column / path_column: where each row's image comes from.
    shares / overlay: add those columns. keep_image: pass the image column through. out / names /
    root: write each image's output files, named by names[path] or else output_name(path, root)
    (see the module doc).
    segmenter_options: any Segmenter keyword (model, pretrained, method, cdam, mode, backend,
    device, dtype, background, templates, window_batch, ...).
    """

    def __init__(self, classes, *, image_column: str = "image", path_column: str = "path", shares: bool = False,
                 overlay: bool = False, keep_image: bool = False, out=None, names: dict | None = None,
                 root=None, **segmenter_options):
        from .segmenter import Segmenter

        _check_distinct(names or {})  # before the model loads
        segmenter_options.setdefault("progress", False)
        self.segmenter = Segmenter(classes, **segmenter_options)
        self.image_column, self.path_column = image_column, path_column
        self.shares, self.overlay, self.keep_image = bool(shares), bool(overlay), bool(keep_image)
        self.out, self.names = (None if out is None else Path(out)), dict(names or {})
        self.root = root

    def __call__(self, batch):
        columns = _columns(batch)
        images, paths = columns.get(self.image_column), columns.get(self.path_column)
        if images is None and paths is None:
            raise KeyError(f"RaySegmenter: the batch has neither an {self.image_column!r} nor a {self.path_column!r} "
                           f"column (columns: {sorted(columns)})")
        n = len(images if images is not None else paths)
        labels, overlays = _objects(n), _objects(n)
        errors, files = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
        shares = np.full((n, len(self.segmenter.class_names)), np.nan, dtype=np.float32)
        for i in range(n):
            where = f"row {i}" if paths is None else f"image {str(paths[i])!r}"
            try:
                read_here = images is None or images[i] is None
                image = open_image(str(paths[i])) if read_here else images[i]
                image = _as_array(image)
                labels[i] = self.segmenter.predict(image, name=where)
                if self.out is not None:
                    files[i] = self._write(paths, i, image, labels[i], read_here)
                if self.shares:
                    shares[i] = np.bincount(labels[i].ravel(), minlength=shares.shape[1]) / max(labels[i].size, 1)
                if self.overlay:
                    overlays[i] = np.asarray(draw_overlay(_uint8_rgb(image), labels[i], self.segmenter.class_names))
            except Exception as e:  # reported in the row; the batch goes on
                labels[i], overlays[i] = _EMPTY, np.zeros((0, 0, 3), np.uint8)
                errors[i] = error_message(e)
        out = {k: v for k, v in columns.items() if k != self.image_column or self.keep_image}
        out["labels"], out["error"] = labels, errors
        if self.out is not None:
            out["files"] = files
        if self.shares:
            out["shares"] = shares
        if self.overlay:
            out["overlay"] = overlays
        return out


    def _write(self, paths, i: int, image, labels, read_here: bool) -> str:
        if paths is None:
            raise KeyError(f"RaySegmenter: writing files (out=...) needs the {self.path_column!r} column")
        source = str(paths[i])
        # A file read here was opened relative to this process's folder: named by its absolute
        # path, never by the absolute path of the same spelling (Ray's form, with its image).
        named = os.path.abspath(source) if read_here else source
        name = _checked_name(self.names[source]) if self.names.get(source) else output_name(named, self.root)
        target = fileio.output_paths([InputImage(source, name)], self.out)[0]
        partial = fileio.partial_paths(target)
        try:
            fileio.write_outputs(self.segmenter, source, _uint8_rgb(image), labels, partial)
            try:
                fileio.publish(partial, target)
            except BaseException:
                fileio.discard(target)  # none of a half-published image stays
                raise
        except BaseException:
            fileio.discard(partial)
            raise
        return str(target.labels)


def output_name(path, root=None) -> str:
    """The output name of the image at `path` (as a row carries it) when `names` gives none: its
    path relative to `root` (a folder; None: the file system's root), folders kept, extension
    kept, "/"-separated. Ray may report an absolute path without its leading "/"
    (`read_images`): both forms give the same name. A path outside `root` is an error."""
    text = os.fspath(path)
    if not text:
        raise CdamInputError("an empty image path has no output name")
    if root is None:
        norm = os.path.normpath(text)
        if os.path.isabs(norm) or ".." in Path(norm).parts:
            norm = os.path.abspath(norm)
        return _checked_name(Path(norm.lstrip(os.sep)).as_posix())
    base = os.path.abspath(os.fspath(root))
    candidates = [os.path.abspath(text)] + ([os.sep + text] if not os.path.isabs(text) else [])
    for candidate in candidates:
        rel = os.path.relpath(os.path.normpath(candidate), base)
        if rel != os.curdir and not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
            return _checked_name(Path(rel).as_posix())
    raise CdamInputError(f"image {text!r} is not below root {os.fspath(root)!r}: pass names= for it, or "
                         "another root")


def _check_distinct(names: dict) -> None:
    """names= must give each image its own outputs: one name for two files would let one
    image's files overwrite the other's. Spellings of one file (relative, absolute, Ray's
    absolute without its leading "/") may share a name, as scripts/ray_segment.py gives them."""
    seen = {}
    for path, name in names.items():
        if name and not _spellings(seen.setdefault(name, path)) & _spellings(path):
            raise CdamInputError(f"names= gives the output name {name!r} to both {str(seen[name])!r} and "
                                 f"{str(path)!r}: each image needs its own name")


def _spellings(path) -> set:
    """The absolute paths a row's path may stand for (itself, or Ray's form of an absolute one)."""
    text = os.fspath(path)
    return {os.path.abspath(text)} | (set() if os.path.isabs(text) else {os.path.normpath(os.sep + text)})


def _checked_name(name: str) -> str:
    """An output name that stays inside the output folder."""
    parts = Path(name).parts
    if not parts or os.path.isabs(name) or ".." in parts:
        raise CdamInputError(f"output name {name!r} would leave the output folder (names are relative, without "
                             "'..')")
    return name


def _objects(n: int) -> np.ndarray:
    return np.empty(n, dtype=object)


def _columns(batch) -> dict:
    """A dict of numpy columns from Ray's numpy (dict) or pandas batch formats."""
    if isinstance(batch, dict):
        return dict(batch)
    if hasattr(batch, "columns") and hasattr(batch, "to_numpy"):  # pandas.DataFrame
        return {c: batch[c].to_numpy() for c in batch.columns}
    raise TypeError(f"RaySegmenter takes Ray Data batches as dicts of numpy arrays or pandas DataFrames "
                    f"(batch_format='numpy' or 'pandas'), got {type(batch).__name__}")


def _as_array(image):
    """Ray's tensor columns may arrive as nested lists in pandas batches."""
    return np.asarray(image) if isinstance(image, (list, tuple)) else image


def _uint8_rgb(image) -> np.ndarray:
    from .images import to_tensor

    rgb = to_tensor(image).permute(1, 2, 0).cpu().numpy()
    return np.round(rgb * 255).astype(np.uint8)


__all__ = ["RaySegmenter", "output_name"]
