"""Segmenting an image larger than memory, in native mode (native.py), in two steps.

1. Bands: every band (row of windows) is read from disk (rasters.py: the scaled rows its
   windows cover, never the whole image), its windows run through the network and CDAM, and
   its window token logits go to the band store (bandstore.py). Bands are the unit of resume
   and of sharding: under torchrun each rank computes every K-th band still missing.
2. Assembly (one process): the threshold is pooled over the bands (only the entropy rules
   read them for it); then rows of the label map are made chunk by chunk, each from the bands
   its taps read (at most ceil(crop / stride) + 1 bands' column-assembled logits
   [S, h_tok, W] are held, plus one chunk [S, rows, W], rows ~ 2^24 / (S W), and the PAMR
   halo when PAMR is on), and written out as soon as they are final: a tiled, deflate-
   compressed (Big)TIFF with the class palette and the input's GeoTIFF tags, a preview
   (labels over the image, long side `preview_side`) and the class mapping JSON with each
   class's share of the pixels.

Memory is therefore independent of the image's height, and linear in its width. The labels
equal `Segmenter(scale=...).predict` on the same image in memory, bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import fileio, native
from .bandstore import BandStore, identity_of
from .fileio import OutputPaths
from .inputs import InputImage, unique_names
from .rasters import GEO_TAGS, Raster, open_raster
from .visualize import PALETTE_CLASSES, label_dtype, overlay, palette

#: What each image gets in native mode: OUT/<name><suffix>, in OutputPaths order.
NATIVE_SUFFIXES = {"labels": "_labels.tif", "overlay": "_preview.png", "classes": "_classes.json"}
PREVIEW_SIDE = 2048  # long side of the preview, pixels
TILE = 256  # label TIFF tile side
_BIGTIFF_PIXELS = 1 << 31  # label maps this large are written as BigTIFF (over 4 GB possible)


def native_output_paths(items, out) -> list:
    out = Path(out)
    items = unique_names([it if isinstance(it, InputImage) else InputImage(str(it), Path(it).stem) for it in items])
    return [OutputPaths(*(out / f"{it.name}{s}" for s in NATIVE_SUFFIXES.values())) for it in items]


def store_config(seg, raster: Raster, p: native.NativePlan, run: dict | None = None) -> dict:
    """What a band's logits depend on (bands of another configuration are discarded). The
    device, backend and dtype are left out: a band computed elsewhere differs by rounding only."""
    import hashlib

    settings = {k: getattr(seg, k, None) for k in ("method_name", "cdam", "mode", "scale", "crop", "stride",
                                                    "global_tokens", "tau", "alpha", "scales", "pos_interp",
                                                    "synonyms", "window_batch", "threshold", "set_index",
                                                    "cdam_combine", "normalisation")}
    templates = hashlib.sha256("\n".join(seg._text_embedder.templates + ("",) + seg.atp).encode()).hexdigest()
    return {"input": identity_of(raster.path), "original": list(p.original), "size": list(p.size),
            "window": list(p.layout.window), "rows": list(p.layout.row_starts), "cols": list(p.layout.col_starts),
            "model": [seg.backbone.name, seg.backbone.source], "settings": settings, "prompts": templates,
            "classes": [list(s) for s in seg.classes.synonyms], "run": run or {}}


def plan_and_store(seg, raster: Raster, out, name: str, run: dict | None = None) -> tuple:
    """(plan, band store) of an open image for output folder `out`: every entry point (segment_file,
    the CLI, Ray's driver and its actors) plans and keys an image's bands through here, so they agree."""
    p = native.plan(seg, raster.height, raster.width, f"image {raster.path!r}")
    return p, BandStore.for_image(out, name, store_config(seg, raster, p, run))


# -- step 1: bands -----------------------------------------------------------------------------

def compute_bands(seg, raster: Raster, p: native.NativePlan, store: BandStore, bands, bar=None) -> None:
    """Compute and store the given bands (their windows, window_batch per forward pass)."""
    for r in bands:
        y0, y1 = p.band_rows(r)
        strip = native.normalise(seg, native.scaled_rows(p, raster.read, y0, y1, seg.device))
        logits = native.band_logits(seg, p, strip)
        store.save(r, logits.cpu().numpy())
        if bar is not None:
            bar.update(logits.shape[0])


# -- step 2: assembly --------------------------------------------------------------------------

class _Bands:
    """Column-assembled logits of the bands the current rows read; older ones dropped."""

    def __init__(self, seg, store: BandStore, asm: native.TapAssembler):
        self.seg, self.store, self.asm = seg, store, asm
        self.half: dict = {}

    def load(self, band: int) -> torch.Tensor:
        return torch.from_numpy(self.store.load(band)).to(self.seg.device)

    def rows(self, a: int, b: int) -> torch.Tensor:
        h = self.asm.tokens[0]
        lo, hi = self.asm.rows.span(a, b)
        r0, r1 = lo // h, (hi - 1) // h
        for r in [r for r in self.half if r < r0]:
            del self.half[r]
        for r in range(r0, r1 + 1):
            if r not in self.half:
                self.half[r] = self.asm.half_apply(self.load(r))
        half = self.half[r0] if r0 == r1 else torch.cat([self.half[r] for r in range(r0, r1 + 1)], dim=1)
        return self.asm.rows_apply(half, a, b, offset=r0 * h)


def _threshold(seg, bands: _Bands, count: int):
    pool = native.ThresholdPool(seg)
    if pool.rule == "entropy":
        for r in range(count):
            pool.add(bands.load(r))
    elif pool.rule == "entropy-per-window":
        pool.add(bands.load(count - 1))
    return pool.value()


def label_chunks(seg, raster: Raster, p: native.NativePlan, store: BandStore):
    """(a, b, labels [b - a, W] numpy) of the whole image, chunk by chunk, in order."""
    bands = _Bands(seg, store, p.assembler)
    threshold = _threshold(seg, bands, p.bands)
    H, W = p.original
    channels = int(np.load(store._path(0), mmap_mode="r").shape[1])
    pixels_fn = lambda a, b: native.original_rows(seg, raster.read, a, b)  # noqa: E731 - PAMR's image
    dtype = label_dtype(len(seg.classes), np.uint16)
    for a, b, logits in native.logit_chunks(seg, H, W, channels, bands.rows, pixels_fn):
        yield a, b, native.label_rows(seg, logits, threshold).cpu().numpy().astype(dtype)


class _Preview:
    """Nearest-neighbour samples of the labels and the image, long side <= side."""

    def __init__(self, raster: Raster, side: int):
        H, W = raster.size
        f = min(1.0, side / max(H, W))
        self.h, self.w = max(1, round(H * f)), max(1, round(W * f))
        self.ys = ((np.arange(self.h) + 0.5) * H / self.h).astype(np.int64)
        self.xs = ((np.arange(self.w) + 0.5) * W / self.w).astype(np.int64)
        self.raster = raster
        self.labels = np.zeros((self.h, self.w), dtype=np.int64)
        self.image = np.zeros((self.h, self.w, 3), dtype=np.uint8)

    def add(self, a: int, b: int, labels: np.ndarray) -> None:
        for i in np.nonzero((self.ys >= a) & (self.ys < b))[0]:
            y = int(self.ys[i])
            self.labels[i] = labels[y - a, self.xs]
            row = self.raster.read(y, y + 1)[:, 0, :]
            row = row if row.dtype == torch.uint8 else (row * 255).round().to(torch.uint8)
            self.image[i] = row[:, torch.from_numpy(self.xs)].T.numpy()


def _tiles(chunks, H: int, W: int, dtype, on_rows):
    """Tiles of TILE x TILE, row-major, from chunks of rows; on_rows(a, b, labels) sees each chunk."""
    buffer, filled, top = np.zeros((TILE, W), dtype=dtype), 0, 0
    for a, b, labels in chunks:
        on_rows(a, b, labels)
        pos = 0
        while pos < labels.shape[0]:
            take = min(TILE - filled, labels.shape[0] - pos)
            buffer[filled:filled + take] = labels[pos:pos + take]
            filled, pos = filled + take, pos + take
            if filled == TILE or top + filled == H:
                for x in range(0, W, TILE):
                    tile = np.zeros((TILE, TILE), dtype=dtype)
                    part = buffer[:filled, x:x + TILE]
                    tile[:part.shape[0], :part.shape[1]] = part
                    yield tile
                top, filled = top + filled, 0
                buffer[:] = 0


def write_labels_tiff(path, chunks, size: tuple, classes: int, geo: dict, on_rows) -> None:
    """The label map as a tiled, deflate-compressed TIFF (BigTIFF when large): palette colours
    (as the overlay's) up to 256 classes, else 16-bit grey; `geo`: tags to copy."""
    import tifffile

    H, W = size
    dtype = label_dtype(classes, np.uint16)
    options = {}
    if dtype == np.uint8:
        options = dict(photometric="palette", colormap=palette(PALETTE_CLASSES).T.astype(np.uint16) * 257)
    else:
        options = dict(photometric="minisblack")
    extratags = [(code, int(t), int(count), value, True) for code, (t, count, value) in sorted(geo.items())]
    tifffile.imwrite(path, _tiles(chunks, H, W, dtype, on_rows), shape=(H, W), dtype=dtype, tile=(TILE, TILE),
                     compression="zlib", bigtiff=H * W >= _BIGTIFF_PIXELS, extratags=extratags, metadata=None,
                     **options)


def assemble(seg, raster: Raster, p: native.NativePlan, store: BandStore, paths: OutputPaths, *,
             preview_side: int = PREVIEW_SIDE, progress: bool = False) -> np.ndarray:
    """Step 2: write paths.labels (TIFF), paths.overlay (the preview PNG) and paths.classes;
    returns the pixel count of every class."""
    H, W = p.original
    counts = np.zeros(max(len(seg.classes), 1), dtype=np.int64)
    preview = _Preview(raster, preview_side)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=H, desc="rows", unit="row", leave=False)

    def on_rows(a, b, labels):
        counts[:] += np.bincount(labels.ravel(), minlength=len(counts))[:len(counts)]
        preview.add(a, b, labels)
        if bar is not None:
            bar.update(b - a)

    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_labels_tiff(paths.labels, label_chunks(seg, raster, p, store), (H, W), len(seg.classes), raster.geo,
                          on_rows)
    finally:
        if bar is not None:
            bar.close()
    overlay(preview.image, preview.labels, seg.class_names, counts=counts).save(paths.overlay, format="PNG")
    mapping = fileio.class_mapping(seg, raster.path, (W, H))
    for entry, n in zip(mapping["classes"], counts):
        entry["share"] = float(n) / (H * W)
    mapping.update(scale=seg.scale, crop=seg.crop, stride=seg.stride, windows=p.windows, bands=p.bands,
                   global_tokens=seg.global_tokens if seg.mode == "global" else None,
                   preview={"width": preview.w, "height": preview.h},
                   georeference=[GEO_TAGS[c] for c in sorted(raster.geo)], gdal=raster.gdal)
    Path(paths.classes).write_text(json.dumps(mapping, indent=1) + "\n", encoding="utf-8")
    return counts


def summary_line(source: str, counts: np.ndarray, seg, size: tuple, paths: OutputPaths | None = None) -> str:
    H, W = size
    order = np.argsort(-counts, kind="stable")
    shares = ", ".join(f"{seg.class_names[i]} {100 * counts[i] / (H * W):.1f}%" for i in order[:6] if counts[i])
    line = (f"{source}: {W}x{H} at scale {seg.scale:g}, {seg.method_name}{' + CDAM' if seg.cdam else ''}, "
            f"{seg.backbone.name} [{seg.backbone.source}]: {shares}")
    return line if paths is None else f"{line} -> {paths.labels}, {paths.overlay}"


def segment_image(seg, raster: Raster, paths: OutputPaths, store: BandStore, dist=None, *,
                  preview_side: int = PREVIEW_SIDE, progress: bool = False) -> np.ndarray | None:
    """Both steps for one image, its bands sharded over dist's ranks (every rank calls this;
    rank 0 assembles and writes partial_paths(paths), for the caller to publish).
    Returns (class pixel counts, the partial paths) on rank 0, None elsewhere; raises on
    every rank when any rank failed."""
    from ..distributed import DistContext
    from ..validation import CdamInputError

    dist = dist or DistContext()
    p = native.plan(seg, raster.height, raster.width, f"image {raster.path!r}")
    dist.run_on_main(store.prepare, "prepare the band store", CdamInputError)
    todo = store.missing(p.bands)
    dist.barrier()  # every rank has its list before anyone writes a band
    mine = todo[dist.rank::dist.world_size]
    error, bar = None, None
    if progress and dist.is_main and mine:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine) * len(p.layout.col_starts), desc="windows", unit="window", leave=False)
    try:
        compute_bands(seg, raster, p, store, mine, bar)
    except Exception as e:  # noqa: BLE001 - every rank must reach the reduction below
        error = e
    finally:
        if bar is not None:
            bar.close()
    failed = int(dist.all_reduce_sum(np.array([error is not None], dtype=np.int64))[0])
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("a band of this image failed on another rank (its error is in that rank's output)")
    if not dist.is_main:
        return None
    partial = fileio.partial_paths(paths)
    try:
        counts = assemble(seg, raster, p, store, partial, preview_side=preview_side, progress=progress)
    except BaseException:
        fileio.discard(partial)
        raise
    return counts, partial


def segment_file(seg, source, out, name: str | None = None, *, max_pixels: int | None = None,
                 preview_side: int = PREVIEW_SIDE, keep_bands: bool = False, progress: bool | None = None):
    """Segment one image file (or Raster) in native mode into folder `out` (single process;
    `cdam-fast segment --native` adds manifests, resume across images and torchrun):
    OUT/<name>_labels.tif, _preview.png, _classes.json. Rerun after an interruption, it
    resumes from the bands already stored. Returns (OutputPaths, class pixel counts)."""
    if seg.scale is None:
        from ..validation import CdamInputError

        raise CdamInputError("segment_file needs a segmenter in native mode: Segmenter(..., scale=1.0)")
    from .bulk import check_not_inputs

    fileio.check_output_folder(out, "out")
    raster = source if isinstance(source, Raster) else open_raster(source, max_pixels)
    try:
        name = name or Path(raster.path).stem
        paths = native_output_paths([InputImage(raster.path, name)], out)[0]
        check_not_inputs([raster.path], [paths])
        _, store = plan_and_store(seg, raster, out, name)
        counts, partial = segment_image(seg, raster, paths, store, preview_side=preview_side,
                                        progress=seg.progress if progress is None else progress)
        fileio.publish(partial, paths)
        if not keep_bands:
            store.remove()
        return paths, counts
    finally:
        if raster is not source:
            raster.close()


__all__ = ["NATIVE_SUFFIXES", "PREVIEW_SIDE", "assemble", "compute_bands", "label_chunks", "native_output_paths",
           "plan_and_store", "segment_file", "segment_image", "summary_line", "write_labels_tiff"]
