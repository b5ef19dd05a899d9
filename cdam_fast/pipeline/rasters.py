"""Large images read a band of rows at a time: tiled or striped TIFF / BigTIFF (GeoTIFF
included), numpy arrays on disk (.npy, memory-mapped), and PNG / JPEG / other Pillow formats.

`open_raster(path)` gives a `Raster`: its size, `read(a, b)` (rows [a, b) as images.to_pixels
makes them: uint8 [3, b - a, W], 16-bit data scaled to 8 bits, grey expanded, alpha dropped,
float data in [0, 1]) and the georeferencing tags to carry to the outputs.

* TIFF (needs `tifffile`, the `highres` extra): only the tiles or strips that hold the rows
  are read and decoded (the last row of segments is kept, since consecutive bands overlap).
  Uncompressed, deflate and PackBits TIFFs need nothing more; LZW, JPEG, JPEG2000, ZSTD or
  WebP compression needs `imagecodecs` too (the `highres-codecs` extra). The first page is
  read (the full-resolution level of a pyramid); planar-separate files are refused.
* .npy: memory-mapped, [H, W] or [H, W, 1|3|4], uint8, uint16 or float in [0, 1].
* Anything else goes through Pillow, which decodes a PNG or JPEG whole: about 3 bytes per
  pixel in memory. Pillow refuses images above its decompression-bomb limit
  (PIL.Image.MAX_IMAGE_PIXELS, 89.5 megapixels by default) as a guard against malicious
  files; here that limit is an explicit argument (`max_pixels`, CLI `--max-pixels`) that is
  raised on purpose, never switched off. Convert such images to tiled TIFF to stream them.
"""
from __future__ import annotations

import numbers
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..validation import CdamInputError
from .images import check_dtype, to_pixels

#: GeoTIFF georeferencing tags (code -> name) copied onto the label map.
GEO_TAGS = {33550: "ModelPixelScale", 33922: "ModelTiepoint", 34264: "ModelTransformation",
            34735: "GeoKeyDirectory", 34736: "GeoDoubleParams", 34737: "GeoAsciiParams"}
#: What GeoTIFF specifies for each: (TIFF type, in words, the value counts allowed); a tag that
#: breaks it is refused (copied, it would misplace or break the label map in GIS tools).
_GEO_FORMAT = {33550: (12, "3 doubles", lambda n, v: n == 3),
               33922: (12, "6 K doubles", lambda n, v: n > 0 and n % 6 == 0),
               34264: (12, "16 doubles", lambda n, v: n == 16),
               34735: (3, "4 (1 + its key count) shorts", lambda n, v: n >= 4 and n % 4 == 0 and n >= 4 * (1 + v[3])),
               34736: (12, "doubles", lambda n, v: n > 0),
               34737: (2, "ASCII text", lambda n, v: True)}
#: GDAL's tags: recorded in the class mapping, not copied (the input's nodata value and band
#: metadata describe the image's pixels, not class indices: nodata 0 would mask class 0).
GDAL_TAGS = {42112: "GDAL_METADATA", 42113: "GDAL_NODATA"}
TIFF_EXTENSIONS = (".tif", ".tiff")
NPY_EXTENSIONS = (".npy",)
_HIGHRES_EXTRA = "pip install 'cdam-fast[highres]' (tifffile)"
_SEGMENT_WARN_BYTES = 256 << 20  # decoded bytes of one strip (not read by rows) above which open warns
_CODECS_HINT = ("LZW, JPEG, JPEG2000, ZSTD and WebP TIFFs need imagecodecs: pip install "
                "'cdam-fast[highres-codecs]'")


def check_format(path: str, dtype, samples: int) -> None:
    """Refuse, when a file is opened, pixels that read() would refuse band by band: the sample
    type (images.check_dtype) and the samples per pixel (1: grey, 3: RGB, 4: RGBA)."""
    what = f"image file {path!r}"
    if samples not in (1, 3, 4):
        raise CdamInputError(f"{what} has {samples} samples per pixel; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    check_dtype(dtype, what)


def _name(code) -> str:
    """A TIFF enum's name; tifffile keeps codes it does not know as plain ints."""
    return getattr(code, "name", str(code))


def _text(value) -> str:
    """A GDAL tag's text (bytes when tifffile could not parse it, e.g. stored as BYTE)."""
    return (value.decode("latin-1") if isinstance(value, bytes) else str(value)).strip("\x00 ")


def pillow_limit() -> int:
    """Pillow's own decompression-bomb limit (the default of max_pixels)."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 0) or (1 << 62)


@dataclass
class Raster:
    """An image read in bands of rows. Subclasses implement _rows(a, b) -> [b - a, W(, C)]."""
    path: str
    height: int
    width: int
    geo: dict = field(default_factory=dict)  # tag code -> (TIFF type, count, value), copied to outputs
    gdal: dict = field(default_factory=dict)  # GDAL tag name -> text, recorded only

    @property
    def size(self) -> tuple:
        return self.height, self.width

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as images.to_pixels makes them ([3, stop - start, W])."""
        if not 0 <= start < stop <= self.height:
            raise ValueError(f"rows [{start}, {stop}) outside the image's {self.height}")
        return to_pixels(np.asarray(self._rows(start, stop)), f"image {self.path!r} (rows {start}-{stop})")

    def _rows(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArrayRaster(Raster):
    """An array already in memory (numpy [H, W(, C)] channels last), e.g. for tests."""

    def __init__(self, array: np.ndarray, path: str = "<array>"):
        if array.ndim not in (2, 3):
            raise CdamInputError(f"{path}: expected [H, W] or [H, W, C], got shape {array.shape}")
        check_format(path, array.dtype, array.shape[2] if array.ndim == 3 else 1)
        super().__init__(path, int(array.shape[0]), int(array.shape[1]))
        self.array = array

    def _rows(self, start, stop):
        return self.array[start:stop]


class NpyRaster(ArrayRaster):
    def __init__(self, path: str):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CdamInputError(f"cannot read image file {path!r}: {e}") from e
        super().__init__(array, path)


class PillowRaster(ArrayRaster):
    """A Pillow-readable file, decoded whole under an explicit pixel limit."""

    def __init__(self, path: str, max_pixels: int | None = None):
        from PIL import Image, ImageOps, UnidentifiedImageError

        from .images import _to_rgb

        limit = pillow_limit() if max_pixels is None else int(max_pixels)
        try:
            with decoding_limit(path, limit), Image.open(path) as im:
                w, h = im.size
                if w * h > limit:
                    raise CdamInputError(_too_large(path, w, h, limit))
                array = np.asarray(_to_rgb(ImageOps.exif_transpose(im), path))
        except CdamInputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise CdamInputError(f"cannot read image file {path!r}: {e}") from e
        super().__init__(array, path)


@contextmanager
def decoding_limit(path: str, limit: int):
    """Pillow's decompression-bomb guard at `limit` pixels within the block, restored after; its
    refusal (Pillow's own, or images.py's message wrapping it) becomes _too_large's message."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller checks the limit
            yield
    except Exception as e:
        if isinstance(e, Image.DecompressionBombError) or isinstance(e.__cause__, Image.DecompressionBombError):
            raise CdamInputError(_too_large(path, None, None, limit)) from e
        raise
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _too_large(path, w, h, limit) -> str:
    size = f"{w}x{h} = {w * h:,} pixels" if w else f"more than {2 * limit:,} pixels"
    return (f"image file {path!r} has {size}, more than the decoding limit of {limit:,} (Pillow decodes PNG / JPEG "
            f"whole, about 3 bytes per pixel, and guards against decompression bombs): raise it with --max-pixels N "
            f"(Python: max_pixels=N) if you trust the file, or convert it to a tiled TIFF, which is streamed")


class TiffRaster(Raster):
    """The first page of a TIFF, decoded tile row (or strip) by tile row."""

    def __init__(self, path: str):
        try:
            import tifffile
        except ImportError as e:
            raise CdamInputError(f"reading TIFF image {path!r} a band at a time needs tifffile: "
                                 f"{_HIGHRES_EXTRA}") from e
        try:
            self._tf = tifffile.TiffFile(path)
            page = self._tf.pages[0]
        except Exception as e:  # noqa: BLE001 - any parse failure is this file's
            raise CdamInputError(f"cannot read TIFF file {path!r}: {e}") from e
        try:
            self._open(path, page, tifffile.TIFF)
        except BaseException:
            self._tf.close()
            raise
        self._cache = {}  # segment row -> decoded [seg_h, W(, S)]: the last one (bands go down the image)

    def _open(self, path: str, page, TIFF) -> None:
        """The page's size and layout, checked as far as that needs no decoding (a bad file is
        refused here, not after its first bands were computed)."""
        if page.imagedepth != 1 or (page.samplesperpixel > 1 and page.planarconfig != 1):
            raise CdamInputError(f"TIFF file {path!r}: planar-separate or volumetric images are not supported; "
                                 "rewrite it with interleaved (contiguous) samples")
        H, W = int(page.imagelength), int(page.imagewidth)
        if H < 1 or W < 1:
            raise CdamInputError(f"TIFF file {path!r} has no pixels ({W}x{H}, W x H)")
        if page.dtype is None:
            raise CdamInputError(f"TIFF file {path!r}: samples of {page.bitspersample} bits in sample format "
                                 f"{int(page.sampleformat)} are not supported")
        check_format(path, page.dtype, int(page.samplesperpixel))
        photometric = int(page.photometric) if 262 in page.tags else 1  # no PhotometricInterpretation: as stored
        if photometric not in (1, 2, 3) and not (photometric == 6 and int(page.compression) in (6, 7)):
            raise CdamInputError(f"TIFF file {path!r}: photometric interpretation {_name(page.photometric)} is not "
                                 "supported (grey, RGB, palette and JPEG's YCbCr are); convert it to RGB or greyscale")
        orientation = int(page.tags[274].value) if 274 in page.tags else 1
        if orientation != 1:  # rows read as stored would be flipped or rotated against the labels' placement
            raise CdamInputError(f"TIFF file {path!r} has Orientation {orientation} (1 = rows top to bottom, "
                                 "left to right is supported): rewrite it upright first")
        self._palette = None  # a palette TIFF's colours [N, 3] uint8, as Pillow maps them
        if photometric == 3:
            cmap = page.colormap
            if page.samplesperpixel != 1 or cmap is None or np.ndim(cmap) != 2 or np.shape(cmap) != \
                    (3, 2 ** page.bitspersample):
                raise CdamInputError(f"TIFF file {path!r} is corrupt: a palette image needs one sample per pixel "
                                     f"and a colour map of 3 x {2 ** page.bitspersample} entries")
            self._palette = np.ascontiguousarray(np.asarray(page.colormap).T // 256).astype(np.uint8)
        if page.compression not in TIFF.DECOMPRESSORS:
            raise CdamInputError(f"TIFF file {path!r} uses {_name(page.compression)} compression: {_CODECS_HINT}")
        self._page = page
        tags = {t.code: t for t in page.tags.values()}
        geo = {c: (tags[c].dtype, tags[c].count, tags[c].value) for c in GEO_TAGS if c in tags}
        for code, (dtype, count, value) in geo.items():
            kind, expected, ok = _GEO_FORMAT[code]
            if int(dtype) != kind or not ok(count, value):
                raise CdamInputError(f"TIFF file {path!r}: its GeoTIFF tag {GEO_TAGS[code]} is malformed ({count} "
                                     f"value(s) of TIFF type {getattr(dtype, 'name', dtype)}; GeoTIFF specifies "
                                     f"{expected}); repair or remove the tag (it is copied onto the label map)")
        gdal = {name: _text(tags[c].value) for c, name in GDAL_TAGS.items() if c in tags}
        super().__init__(path, H, W, geo, gdal)
        if page.is_tiled:
            self._seg_h, self._seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self._seg_h, self._seg_w = int(page.rowsperstrip), W
        self._seg_h = min(self._seg_h, H)
        self._check_segments(page)
        # Uncompressed strips are read a row range at a time, straight from the file, so that a file
        # stored as one huge strip is never decoded whole; any other segment is decoded whole.
        self._row_bytes = None
        if not page.is_tiled and int(page.compression) == 1 and page.bitspersample in (8, 16, 32, 64) \
                and int(page.predictor) == 1 and int(page.fillorder) == 1:
            self._row_bytes = W * page.samplesperpixel * page.bitspersample // 8
        segment_bytes = self._seg_h * W * page.samplesperpixel * np.dtype(page.dtype).itemsize
        if self._row_bytes is None and not page.is_tiled and segment_bytes > _SEGMENT_WARN_BYTES:
            warnings.warn(f"TIFF file {path!r} is stored in strips of {self._seg_h} rows, each decoded "
                          f"whole: {segment_bytes / 2**20:,.0f} MiB in memory at a time; rewrite it as a tiled TIFF "
                          "(e.g. 256 x 256 tiles) to bound that", stacklevel=4)

    def _check_segments(self, page) -> None:
        """The tile / strip table against the image size and the file's length (truncated files)."""
        kind = "tile" if page.is_tiled else "strip"
        if self._seg_h < 1 or self._seg_w < 1:
            raise CdamInputError(f"TIFF file {self.path!r} is corrupt: {kind}s of {self._seg_w}x{self._seg_h} pixels")
        self._across = -(-self.width // self._seg_w)
        needed = -(-self.height // self._seg_h) * self._across
        offsets, counts = np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64)
        if min(len(offsets), len(counts)) < needed:
            raise CdamInputError(f"TIFF file {self.path!r} is corrupt: it lists {min(len(offsets), len(counts))} "
                                 f"{kind}s where a {self.width}x{self.height} image in {kind}s of "
                                 f"{self._seg_w}x{self._seg_h} needs {needed}")
        offsets, counts = offsets[:needed], counts[:needed]
        end, size = int((offsets + counts)[counts > 0].max(initial=0)), int(self._tf.filehandle.size)
        if end > size:
            raise CdamInputError(f"TIFF file {self.path!r} is truncated: its pixel data runs to byte {end:,} but the "
                                 f"file has {size:,} bytes")
        if int(page.compression) == 1:  # uncompressed: each segment's size is known
            rows = np.full(needed, self._seg_h, np.int64)
            if not page.is_tiled:  # the last strip may be shorter
                rows = np.minimum(rows, self.height - np.arange(needed) * self._seg_h)
            need = rows * ((self._seg_w * page.samplesperpixel * page.bitspersample + 7) // 8)
            short = np.nonzero((counts > 0) & (counts < need))[0]
            if len(short):
                i = int(short[0])
                raise CdamInputError(f"TIFF file {self.path!r} is corrupt: uncompressed {kind} {i} holds "
                                     f"{int(counts[i]):,} bytes where its {int(rows[i])} rows need {int(need[i]):,}")

    def _segment_row(self, sr: int) -> np.ndarray:
        if sr in self._cache:
            return self._cache[sr]
        page, fh = self._page, self._tf.filehandle
        y0 = sr * self._seg_h
        h = min(self._seg_h, self.height - y0)
        samples = page.samplesperpixel
        out = np.zeros((h, self.width, samples) if samples > 1 else (h, self.width), dtype=page.dtype)
        for tx in range(self._across):
            index = sr * self._across + tx
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            if not count:
                continue  # a sparse (empty) segment: zeros
            fh.seek(offset)
            try:
                segment, _, _ = page.decode(fh.read(count), index, jpegtables=page.jpegtables,
                                            jpegheader=page.jpegheader)
            except Exception as e:  # noqa: BLE001 - corrupt data, or a codec that needs imagecodecs
                why = _CODECS_HINT if isinstance(e, (KeyError, ImportError)) else "the file is corrupt"
                raise CdamInputError(f"cannot decode TIFF file {self.path!r} ({_name(page.compression)} compression, "
                                     f"segment {index}): {e}; {why}") from e
            segment = segment.reshape(segment.shape[-3:]) if samples > 1 else segment.reshape(segment.shape[-3:-1])
            x0 = tx * self._seg_w
            w = min(self._seg_w, self.width - x0)
            out[:, x0:x0 + w] = segment[:h, :w]
        self._cache.clear()
        self._cache[sr] = out
        return out

    def _direct_rows(self, start, stop) -> np.ndarray:
        """Rows [start, stop) of an uncompressed striped file, read from their byte offsets."""
        page, fh = self._page, self._tf.filehandle
        stored = np.dtype(page.dtype).newbyteorder(self._tf.byteorder)
        samples = page.samplesperpixel
        tail = (self.width, samples) if samples > 1 else (self.width,)
        out = np.zeros((stop - start, *tail), dtype=page.dtype)
        y = start
        while y < stop:
            strip = y // self._seg_h
            end = min(stop, (strip + 1) * self._seg_h)
            if page.databytecounts[strip]:  # else a sparse (empty) strip: zeros
                fh.seek(page.dataoffsets[strip] + (y - strip * self._seg_h) * self._row_bytes)
                rows = np.frombuffer(fh.read((end - y) * self._row_bytes), dtype=stored)
                out[y - start:end - start] = rows.reshape(end - y, *tail)
            y = end
        return out

    def _rows(self, start, stop):
        if self._row_bytes is not None:
            block = self._direct_rows(start, stop)
        else:
            first, last = start // self._seg_h, (stop - 1) // self._seg_h
            parts = [self._segment_row(sr) for sr in range(first, last + 1)]
            block = parts[0] if len(parts) == 1 else np.concatenate(parts)
            offset = first * self._seg_h
            block = block[start - offset:stop - offset]
        return block if self._palette is None else np.take(self._palette, block, axis=0, mode="clip")

    def close(self):
        self._tf.close()


def open_raster(path, max_pixels: int | None = None) -> Raster:
    """A Raster of an image file (see the module doc), or a CdamInputError naming it."""
    path = os.fspath(path)
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral)
                                   or max_pixels < 1):
        raise CdamInputError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    if not os.path.exists(path):
        raise CdamInputError(f"image file {path!r} does not exist")
    if not os.path.isfile(path):
        raise CdamInputError(f"image path {path!r} is not a file")
    lower = path.lower()
    if lower.endswith(NPY_EXTENSIONS):
        return NpyRaster(path)
    if lower.endswith(TIFF_EXTENSIONS):
        return TiffRaster(path)
    return PillowRaster(path, max_pixels)


__all__ = ["ArrayRaster", "GEO_TAGS", "NpyRaster", "PillowRaster", "Raster", "TiffRaster", "check_format",
           "decoding_limit", "open_raster", "pillow_limit"]
