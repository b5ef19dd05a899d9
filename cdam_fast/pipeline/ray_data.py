"""CDAM segmentation as a Ray Data stage: `ray.data.Dataset.map_batches(RaySegmenter, ...)`.

    import ray
    from cdam_fast.pipeline.ray_data import RaySegmenter

    ds = ray.data.read_images("photos/", include_paths=True, mode="RGB")   # or from_items([{"path": p}, ...])
    ds = ds.map_batches(RaySegmenter, fn_constructor_kwargs={"classes": "background,cat,sofa", "shares": True},
                        batch_size=8, concurrency=2, num_gpus=1)         # as Ray expects; num_gpus=0 on CPU
    for row in ds.iter_rows(): ...   # row["path"], row["labels"] ([H, W] uint8), row["shares"], row["error"]

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
(fileio.py: palette label PNG, overlay, class mapping JSON; written under temporary names and
renamed) to FOLDER/<name>_*, where `names` maps a row's path to its output name (default the
file's stem), and returns them in a `files` column (one string per row, the label PNG; "" for
a failed row).

This module does not import ray: it is the `[ray]` extra's entry point, and the core package
never imports it.
"""
from __future__ import annotations

import numpy as np

import os
from pathlib import Path

from . import fileio
from .bulk import error_message
from .images import open_image
from .inputs import InputImage
from .visualize import overlay as draw_overlay

_EMPTY = np.zeros((0, 0), dtype=np.uint8)


class RaySegmenter:
    """A callable class for `Dataset.map_batches` (see the module doc).

    classes: as for Segmenter. image_column / path_column: where each row's image comes from.
    shares / overlay: add those columns. keep_image: pass the image column through. out / names:
    write each image's output files (see the module doc).
    segmenter_options: any Segmenter keyword (model, pretrained, method, cdam, mode, backend,
    device, dtype, background, templates, window_batch, ...).
    """

    def __init__(self, classes, *, image_column: str = "image", path_column: str = "path", shares: bool = False,
                 overlay: bool = False, keep_image: bool = False, out=None, names: dict | None = None,
                 **segmenter_options):
        from .segmenter import Segmenter

        segmenter_options.setdefault("progress", False)
        self.segmenter = Segmenter(classes, **segmenter_options)
        self.image_column, self.path_column = image_column, path_column
        self.shares, self.overlay, self.keep_image = bool(shares), bool(overlay), bool(keep_image)
        self.out, self.names = (None if out is None else Path(out)), dict(names or {})

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
                image = images[i] if images is not None and images[i] is not None else open_image(paths[i])
                image = _as_array(image)
                labels[i] = self.segmenter.predict(image, name=where)
                if self.out is not None:
                    files[i] = self._write(paths, i, image, labels[i])
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


    def _write(self, paths, i: int, image, labels) -> str:
        if paths is None:
            raise KeyError(f"RaySegmenter: writing files (out=...) needs the {self.path_column!r} column")
        source = str(paths[i])
        name = self.names.get(source) or Path(source).stem
        target = fileio.output_paths([InputImage(source, name)], self.out)[0]
        partial = fileio.partial_paths(target)
        try:
            fileio.write_outputs(self.segmenter, source, _uint8_rgb(image), labels, partial)
            fileio.publish(partial, target)
        except BaseException:
            fileio.discard(partial)
            raise
        return str(target.labels)


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


__all__ = ["RaySegmenter"]
