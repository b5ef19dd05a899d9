"""Native-resolution mode: `Segmenter(..., scale=1.0)` (or any scale factor).

The published protocol resizes every image to a short side of 448 first. With `scale` set the
image is used at its own resolution times `scale` instead: sliding windows of `crop` pixels at
`stride` over the scaled image, the same methods, CDAM, background rules; labels at the
input's size. This module holds what that mode computes, shared by the in-memory path
(`Segmenter.predict` on an array) and the streamed one (streamed.py: images larger than
memory, read and assembled a band of rows at a time), so that both give the same labels to
the bit:

* pixels at the scale: a separable resize (taps.py; antialiased when shrinking), rows first;
* window batches: the windows of one row of windows ("band"), `window_batch` at a time,
  never mixed with another band's (a band's logits do not depend on which process ran it);
* assembly: taps.assembly_taps per axis, the column direction per band, the row direction
  per output row with its own fixed taps;
* labels in chunks of rows; PAMR (when on) runs per chunk on a halo of steps x max(dilation)
  rows each side, beyond which a row cannot influence the chunk, so it equals whole-image
  PAMR up to rounding while memory stays bounded.

Global mode at this scale (`mode="global"`): CDAM across every token of a 10^8-pixel image
would need an N x N map with N ~ 4 * 10^5. Here "global" means global within a tile: the
image is cut into abutting square tiles of at most `global_tokens` tokens (default 4096, a
1024-pixel tile of ViT-B/16), and CDAM runs across all tokens of each tile.

CLIPer runs in this mode with its "mmseg" protocol (class maps as pseudo-logits, the
background rules above); its own protocols (whole image at short side 336, image-level class
scores) and SD compensation are whole-image methods and are refused.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..validation import CdamInputError
from . import background as bg
from .pamr import pamr
from .taps import assembly_taps, resize_taps, tile_side
from .windows import WindowLayout, window_starts

#: Tokens of one tile in native global mode (CDAM across all of them): 64 x 64 patches.
DEFAULT_GLOBAL_TOKENS = 4096
MAX_SCALED_SIDE = 1 << 21  # pixels a side of the image at its scale: the plan's taps grow with it
_LABEL_CHUNK = 1 << 22  # logits elements materialised at once while labelling (more for PAMR's halo)
_CHUNK_ROWS = 256  # ... and at most this many rows (a tile row of the label TIFF)


def check_scale(scale):
    """None (the published protocol) or a positive finite float."""
    if scale is None:
        return None
    if isinstance(scale, numbers.Real) and not isinstance(scale, (int, float, bool)):
        scale = float(scale)  # numpy scalars and other real number types
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise CdamInputError(f"scale must be a positive number (1.0: native resolution) or None, got {scale!r}")
    return float(scale)


def check_global_tokens(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CdamInputError(f"global_tokens must be an integer >= 1, got {value!r}")
    return value


def native_size(height: int, width: int, scale: float) -> tuple:
    """(H', W') of an image used at `scale` (rounded to the nearest pixel, at least 1)."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def native_layout(size: tuple, patch: tuple, mode: str, crop: int, stride: int, global_tokens: int) -> WindowLayout:
    """Sliding windows (window mode), or abutting tiles of at most global_tokens tokens (global)."""
    H, W = size
    if mode == "global":
        th, tw = tile_side(global_tokens, patch[0]), tile_side(global_tokens, patch[1])
        return WindowLayout(size, (min(th, H), min(tw, W)), tuple(window_starts(H, th, th)),
                            tuple(window_starts(W, tw, tw)))
    return WindowLayout(size, (min(crop, H), min(crop, W)), tuple(window_starts(H, crop, stride)),
                        tuple(window_starts(W, crop, stride)))


@dataclass
class TapAssembler:
    """windows.Assembler's interface with taps (exact per row, see the module doc)."""
    rows: object  # Taps: original rows <- token-canvas rows
    cols: object  # Taps: original columns <- token-canvas columns
    grid: tuple  # (n_rows, n_cols) of windows
    tokens: tuple  # (h_tok, w_tok) of a window

    def token_canvas(self, window_logits: torch.Tensor) -> torch.Tensor:
        """[n_windows, C, h, w] (row-major window order) -> [C, n_rows * h, n_cols * w]."""
        n, C, h, w = window_logits.shape
        r = n // self.grid[1]
        return window_logits.reshape(r, self.grid[1], C, h, w).permute(2, 0, 3, 1, 4).reshape(C, r * h, -1)

    def half_apply(self, window_logits: torch.Tensor) -> torch.Tensor:
        """[C, n * h_tok, W]: the column direction of whole rows of windows (all, or one band)."""
        return self.cols.apply(self.token_canvas(window_logits.float()), 2)

    def rows_apply(self, half: torch.Tensor, start: int = 0, stop: int | None = None, offset: int = 0):
        """[C, stop - start, W]: output rows [start, stop); half's first token row is `offset`."""
        return self.rows.apply(half, 1, start, stop, offset)

    def __call__(self, window_logits: torch.Tensor) -> torch.Tensor:
        return self.rows_apply(self.half_apply(window_logits))


@dataclass(frozen=True)
class NativePlan:
    original: tuple  # (H, W) of the input
    size: tuple  # (H', W') at the scale
    layout: WindowLayout
    tokens: tuple  # (h_tok, w_tok) per window
    pixel_rows: object  # Taps (scaled rows <- input rows), None at scale 1
    pixel_cols: object
    assembler: TapAssembler

    @property
    def bands(self) -> int:
        return len(self.layout.row_starts)

    @property
    def windows(self) -> int:
        return self.layout.count

    def band_rows(self, band: int) -> tuple:
        """[y0, y1): rows of the scaled image that band `band`'s windows cover."""
        y = self.layout.row_starts[band]
        return y, y + self.layout.window[0]


@lru_cache(maxsize=16)
def _plan(original, patch, mode, scale, crop, stride, global_tokens) -> NativePlan:
    H, W = original
    size = native_size(H, W, scale)
    layout = native_layout(size, patch, mode, crop, stride, global_tokens)
    tokens = (layout.window[0] // patch[0], layout.window[1] // patch[1])
    asm = TapAssembler(assembly_taps(layout.row_starts, layout.window[0], tokens[0], size[0], H),
                       assembly_taps(layout.col_starts, layout.window[1], tokens[1], size[1], W),
                       (len(layout.row_starts), len(layout.col_starts)), tokens)
    scaled = size != (H, W)
    return NativePlan((H, W), size, layout, tokens, resize_taps(size[0], H) if scaled else None,
                      resize_taps(size[1], W) if scaled else None, asm)


def check_size(height: int, width: int, patch: tuple, scale: float, what: str = "image", model: str = "") -> None:
    """A CdamInputError unless the image holds one patch, at its size and at the scale (no model
    needed: the CLI checks file headers with it before the model loads)."""
    ph, pw = patch
    if height < ph or width < pw:
        raise CdamInputError(f"{what} is {width}x{height} pixels (W x H), smaller than one {pw}x{ph} patch"
                             + (f" of {model}" if model else ""))
    if max(height, width) * scale + 0.5 >= MAX_SCALED_SIDE + 1:  # in floats: the sizes may pass any int
        raise CdamInputError(f"{what} ({width}x{height}, W x H) at scale {scale:g} would be "
                             f"{width * scale:.4g}x{height * scale:.4g}: more than {MAX_SCALED_SIDE} pixels a side; "
                             "use a smaller scale")
    h, w = native_size(height, width, scale)
    if h < ph or w < pw:
        raise CdamInputError(f"{what} ({width}x{height}, W x H) at scale {scale:g} is {w}x{h}: smaller than one "
                             f"{pw}x{ph} patch; use a larger scale")


def plan(seg, height: int, width: int, what: str = "image") -> NativePlan:
    """The native plan of an H x W image for segmenter `seg`, or a CdamInputError."""
    check_supported(seg)
    ph, pw = seg.backbone.patch_size
    check_size(height, width, (ph, pw), seg.scale, what, seg.backbone.name)
    p = _plan((height, width), (ph, pw), seg.mode, seg.scale, seg.crop, seg.stride, seg.global_tokens)
    if p.layout.window[0] < ph or p.layout.window[1] < pw:
        raise CdamInputError(f"{what} ({width}x{height}, W x H) at scale {seg.scale:g} is {p.size[1]}x{p.size[0]}: "
                             f"smaller than one {pw}x{ph} patch; use a larger scale")
    return p


def check_supported(seg) -> None:
    """Refuse the whole-image methods that native mode cannot run (see the module doc)."""
    if seg.method_name == "cliper" and (getattr(seg, "protocol", None) is not None
                                        or getattr(seg, "compensation", None) is not None):
        raise CdamInputError("scale / native mode runs CLIPer with protocol 'mmseg' and without SD compensation "
                             "(its own protocols and the compensation are whole-image methods)")


def scaled_rows(p: NativePlan, read, start: int, stop: int, device) -> torch.Tensor:
    """Float [3, stop - start, W'] in [0, 1]: rows [start, stop) of the image at the scale.
    read(a, b) gives input rows [a, b) as images.to_pixels does (uint8 or float [3, b - a, W])."""
    if p.pixel_rows is None:
        x = read(start, stop).to(device)
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    lo, hi = p.pixel_rows.span(start, stop)
    x = read(lo, hi).to(device)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return p.pixel_cols.apply(p.pixel_rows.apply(x, 1, start, stop, offset=lo), 2)


def normalise(seg, x: torch.Tensor) -> torch.Tensor:
    return (x - seg._mean) / seg._std


def original_rows(seg, read, start: int, stop: int) -> torch.Tensor:
    """The normalised input rows [start, stop) at their own resolution (PAMR's image)."""
    x = read(start, stop).to(seg.device)
    return normalise(seg, x.float() / 255.0 if x.dtype == torch.uint8 else x.float())


def band_logits(seg, p: NativePlan, strip: torch.Tensor) -> torch.Tensor:
    """Window logits [n_cols, S, h_tok, w_tok] of one band from its normalised strip
    [3, h, W'], window_batch windows per forward pass (the in-memory path batches alike)."""
    h, w = p.layout.window
    crops = [strip[:, :h, x:x + w] for x in p.layout.col_starts]
    out = [seg.encode_windows(torch.stack(crops[j:j + seg.window_batch]))
           for j in range(0, len(crops), seg.window_batch)]
    return torch.cat(out)


# -- labelling, shared by the in-memory and the streamed path ---------------------------------

def _is_cliper(seg) -> bool:
    return seg.method_name == "cliper"


def pamr_halo(seg) -> int:
    """Rows beyond which PAMR cannot reach a row: each step looks max(dilation) rows away."""
    steps = 0 if _is_cliper(seg) else seg.pamr_steps  # CLIPer's labelling has no PAMR step
    return steps * max(seg.pamr_dilations) if steps else 0


def chunks(seg, height: int, width: int, channels: int) -> list:
    """The row chunks [a, b) labels are computed in (a function of the sizes only, so the
    streamed and in-memory paths cut alike)."""
    rows = max(8, min(_CHUNK_ROWS, _LABEL_CHUNK // max(1, channels * width)), 2 * pamr_halo(seg))
    return [(a, min(height, a + rows)) for a in range(0, height, rows)]


def logit_chunks(seg, height: int, width: int, channels: int, rows_fn, pixels_fn=None):
    """(a, b, logits [S, b - a, W]) per chunk, PAMR applied when on. rows_fn(a, b): assembled
    logits of output rows [a, b); pixels_fn(a, b): the normalised input rows (PAMR only)."""
    halo = pamr_halo(seg)
    for a, b in chunks(seg, height, width, channels):
        if not halo:
            yield a, b, rows_fn(a, b)
            continue
        a0, b0 = max(0, a - halo), min(height, b + halo)
        refined = pamr(pixels_fn(a0, b0), rows_fn(a0, b0), seg.pamr_steps, seg.pamr_dilations)
        yield a, b, refined[:, a - a0:b - a0]


def label_rows(seg, logits: torch.Tensor, threshold) -> torch.Tensor:
    """Labels of assembled logits rows [S, r, W], as the segmenter's label_map makes them."""
    if _is_cliper(seg):
        return bg.label(seg._pseudo_logits(logits, 0), threshold, seg.logit_scale)
    return bg.label(logits, threshold, seg.logit_scale, seg.owner)


class ThresholdPool:
    """The background threshold of an image, pooled one band of window logits at a time;
    equal to the segmenter's own over all windows at once (entropy: min and max are exact)."""

    def __init__(self, seg):
        self.seg, self.rule = seg, seg.background
        self.low = self.high = self.last = None

    def _tokens(self, window_logits):
        seg = self.seg
        if _is_cliper(seg):
            window_logits = seg._pseudo_logits(window_logits, 1)
        return bg.class_logits(window_logits.transpose(0, 1), seg.owner, len(seg.classes)).movedim(0, -1)

    def add(self, window_logits: torch.Tensor) -> None:
        if self.rule == "entropy":
            lo, hi = bg.entropy_range(self._tokens(window_logits), self.seg.logit_scale)
            self.low = lo if self.low is None else torch.minimum(self.low, lo)
            self.high = hi if self.high is None else torch.maximum(self.high, hi)
        elif self.rule == "entropy-per-window":
            self.last = window_logits[-1:]

    def value(self):
        if self.rule == "entropy":
            return bg.threshold_of_range(self.low, self.high)
        if self.rule == "entropy-per-window":
            return bg.entropy_threshold(self._tokens(self.last), self.seg.logit_scale)
        return self.rule


# -- the in-memory path (Segmenter with scale set) --------------------------------------------

def prepare(seg, image, what: str, prepared_cls):
    """Segmenter.preprocess in native mode: the image at the scale, normalised, and its plan."""
    from .images import to_pixels

    pixels = to_pixels(image, what)
    H, W = pixels.shape[-2:]
    p = plan(seg, H, W, what)
    read = lambda a, b: pixels[:, a:b]  # noqa: E731
    x = normalise(seg, scaled_rows(p, read, 0, p.size[0], seg.device))
    pamr_pixels = None
    if pamr_halo(seg):
        pamr_pixels = x if p.pixel_rows is None else original_rows(seg, read, 0, H)
    return prepared_cls(x, (H, W), p.layout, p.tokens, assembler=p.assembler, pamr_pixels=pamr_pixels)


def _in_memory(seg, result):
    asm = result.assembler
    half = asm.half_apply(result.window_logits)
    H, W = result.original
    rows_fn = lambda a, b: asm.rows_apply(half, a, b)  # noqa: E731
    pixels_fn = (lambda a, b: result.pixels[:, a:b]) if result.pixels is not None else None  # noqa: E731
    return logit_chunks(seg, H, W, half.shape[0], rows_fn, pixels_fn)


def label_map(seg, result) -> torch.Tensor:
    """[H, W] int64 labels of an in-memory native result (the streamed path's chunks)."""
    return torch.cat([label_rows(seg, lg, result.threshold) for _, _, lg in _in_memory(seg, result)])


def full_logits(seg, result) -> torch.Tensor:
    """[S, H, W] logits of an in-memory native result (PAMR applied when on)."""
    return torch.cat([lg for _, _, lg in _in_memory(seg, result)], dim=1)


__all__ = ["DEFAULT_GLOBAL_TOKENS", "NativePlan", "TapAssembler", "ThresholdPool", "band_logits", "check_scale",
           "check_size", "label_map", "native_layout", "native_size", "plan"]
