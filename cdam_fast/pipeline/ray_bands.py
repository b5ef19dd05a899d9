"""The bands of large images as Ray Data rows: many actors share one huge image.

    import ray
    from cdam_fast.pipeline import Segmenter
    from cdam_fast.pipeline.ray_bands import RayBandSegmenter, band_tasks
    from cdam_fast.pipeline.streamed import segment_file

    options = dict(model="ViT-B-16", pretrained="openai", scale=1.0, crop=224, stride=224, templates="single")
    seg = Segmenter("background,building,road", **options)          # on the driver: plans and assembly
    rows = band_tasks(seg, ["scene.tif"], "labels/")                  # prepares the band stores
    ray.data.from_items(rows).map_batches(
        RayBandSegmenter, fn_constructor_kwargs={"classes": "background,building,road", **options},
        batch_size=4, concurrency=8, num_gpus=1).materialize()       # the bands, spread over 8 actors
    for path in ["scene.tif"]:
        segment_file(seg, path, "labels/")                            # assembles from the stored bands

Each row is one band of one image ({"path", "name", "band"}); an actor computes it exactly as
`segment_file` would (the same window batches), and stores it in the band store under OUT, so
the labels equal a one-process run's to the bit. A band that fails is reported in the row's
`error` column; `segment_file` recomputes whatever is missing. Actors must get the driver's
Segmenter options: an actor whose options (or input file) differ from those band_tasks prepared
the store for reports its rows as failed, naming what differs, and adds no band. This module does not import ray.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .rasters import open_raster
from .streamed import plan_and_store


def band_tasks(seg, paths, out, names=None, max_pixels=None) -> list:
    """Prepare each image's band store in `out` (discarding stale bands) and return one row per
    band still missing: {"path", "name", "band"} (run this once, on the driver, before the actors).
    An image that cannot be segmented gets no rows and a warning saying why; the others go on."""
    from .bulk import _line, error_message
    from .fileio import check_output_folder

    check_output_folder(out, "out")
    rows = []
    for path in paths:
        name = (names or {}).get(str(path)) or Path(path).stem
        try:
            with open_raster(path, max_pixels) as raster:
                p, store = plan_and_store(seg, raster, out, name)
            store.prepare()
        except Exception as e:  # noqa: BLE001 - one bad image never costs the others
            warnings.warn(f"{_line(str(path), error_message(e))}; no band tasks for it", stacklevel=2)
            continue
        rows += [{"path": str(path), "name": name, "band": r} for r in store.missing(p.bands)]
    return rows


class RayBandSegmenter:
    """A callable class for `Dataset.map_batches` over band_tasks rows (see the module doc).
    out: the output folder given to band_tasks; max_pixels: as for open_raster;
    segmenter_options: the Segmenter's (scale included), as on the driver."""

    def __init__(self, classes, *, out, max_pixels=None, **segmenter_options):
        from .segmenter import Segmenter

        segmenter_options.setdefault("progress", False)
        self.segmenter = Segmenter(classes, **segmenter_options)
        self.out, self.max_pixels = Path(out), max_pixels
        self._open = None  # (path, raster, plan, store) of the image of the last row

    def _image(self, path: str, name: str):
        if self._open is None or self._open[0] != path:
            if self._open is not None:
                self._open[1].close()
                self._open = None  # closed: an image that fails to open below must not leave it in use
            raster = open_raster(path, self.max_pixels)
            try:
                p, store = plan_and_store(self.segmenter, raster, self.out, name)
                store.check()  # the store band_tasks prepared on the driver, for these very options
            except BaseException:
                raster.close()
                raise
            self._open = (path, raster, p, store)
        return self._open[1:]

    def __call__(self, batch):
        from .bulk import error_message
        from .streamed import compute_bands

        paths, names, bands = (list(np.asarray(batch[k]).tolist()) for k in ("path", "name", "band"))
        errors = np.full(len(paths), "", dtype=object)
        for i, (path, name, band) in enumerate(zip(paths, names, bands)):
            try:
                raster, p, store = self._image(path, name)
                compute_bands(self.segmenter, raster, p, store, [int(band)])
            except Exception as e:  # noqa: BLE001 - reported in the row; the batch goes on
                errors[i] = error_message(e)
        return {"path": np.array(paths, dtype=object), "name": np.array(names, dtype=object),
                "band": np.array(bands, dtype=np.int64), "error": errors}


__all__ = ["RayBandSegmenter", "band_tasks"]
