"""Sliding-window and whole-image layouts, and putting window logits back together.

The published protocol (spec section 4): resize so the short side is 448 (the long side
capped at 2048), cut 448 x 448 windows at stride 224 with the last window snapped to the
border, upsample each window's token logits bilinearly to the window, average overlapping
windows, and resize the result bilinearly to the original image.

Every step after the network is linear and separable along the two axes, and the windows form
a grid, so the overlap count factorises too. The whole chain therefore collapses into one
matrix per axis: logits = My @ G @ Mx^T with G the window token logits laid side by side
([C, rows * h_tok, cols * w_tok]). Window logits are accumulated at token resolution and
upsampled once, and the result equals the per-window published order up to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHORT_SIDE = 448
LONG_SIDE_MAX = 2048
CROP = 448
STRIDE = 224


def protocol_size(height: int, width: int, short_side: int = SHORT_SIDE, long_side_max: int = LONG_SIDE_MAX):
    """(H', W'): scaled so the short side is short_side unless the long side would exceed
    long_side_max (aspect ratio kept, sizes rounded to the nearest pixel)."""
    scale = min(short_side / min(height, width), long_side_max / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def global_size(height: int, width: int, patch: tuple, short_side: int = SHORT_SIDE,
                long_side_max: int = LONG_SIDE_MAX):
    """Whole-image mode: the protocol size rounded to whole patches (at least one)."""
    h, w = protocol_size(height, width, short_side, long_side_max)
    return max(patch[0], round(h / patch[0]) * patch[0]), max(patch[1], round(w / patch[1]) * patch[1])


def window_starts(length: int, crop: int, stride: int) -> list:
    """Start offsets along one axis: stride apart, the last one snapped so that its window
    ends at the border; a single window when the image is no longer than the crop."""
    if length <= crop:
        return [0]
    count = (length - crop + stride - 1) // stride + 1
    return [min(i * stride, length - crop) for i in range(count)]


@dataclass(frozen=True)
class WindowLayout:
    """The windows of one (resized) image: a grid of row starts x column starts."""
    size: tuple  # (H', W'): the resized image the windows are cut from
    window: tuple  # (h, w) of every window, in pixels
    row_starts: tuple
    col_starts: tuple

    @property
    def count(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def boxes(self):
        """(top, left) of each window, row by row (the published loop order)."""
        return [(y, x) for y in self.row_starts for x in self.col_starts]


def sliding_layout(size: tuple, crop: int = CROP, stride: int = STRIDE) -> WindowLayout:
    H, W = size
    return WindowLayout(size, (min(crop, H), min(crop, W)), tuple(window_starts(H, crop, stride)),
                        tuple(window_starts(W, crop, stride)))


def whole_layout(size: tuple) -> WindowLayout:
    return WindowLayout(size, tuple(size), (0,), (0,))


def _resize_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """[out, in]: torch's 1-D bilinear resize (align_corners=False) as a matrix."""
    eye = torch.eye(in_size, dtype=torch.float64)[None]  # [1, in (channels), in (length)]
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].T


def axis_matrix(starts: tuple, window: int, tokens: int, resized: int, original: int) -> torch.Tensor:
    """[original, len(starts) * tokens]: window token logits along one axis -> logits of the
    original image along that axis (upsample to the window, place, average the overlaps,
    resize to the original size). Float64 on the CPU; cast it where it is used."""
    up = _resize_matrix(window, tokens)  # [window, tokens]
    placed = torch.zeros(resized, len(starts) * tokens, dtype=torch.float64)
    for i, s in enumerate(starts):
        placed[s:s + window, i * tokens:(i + 1) * tokens] = up
    count = torch.zeros(resized, 1, dtype=torch.float64)  # windows covering each pixel
    for s in starts:
        count[s:s + window] += 1
    return _resize_matrix(original, resized) @ (placed / count.clamp_min(1))


@dataclass
class Assembler:
    """Turns the window token logits of one image into its logits at the original size."""
    rows: torch.Tensor  # [H, n_rows * h_tok]
    cols: torch.Tensor  # [W, n_cols * w_tok]
    grid: tuple  # (n_rows, n_cols)

    @classmethod
    def build(cls, layout: WindowLayout, tokens: tuple, original: tuple, device, dtype=torch.float32):
        rows = axis_matrix(layout.row_starts, layout.window[0], tokens[0], layout.size[0], original[0])
        cols = axis_matrix(layout.col_starts, layout.window[1], tokens[1], layout.size[1], original[1])
        return cls(rows.to(device, dtype), cols.to(device, dtype), (len(layout.row_starts), len(layout.col_starts)))

    def token_canvas(self, window_logits: torch.Tensor) -> torch.Tensor:
        """[n_windows, C, h, w] (row-major window order) -> [C, n_rows * h, n_cols * w]."""
        n, C, h, w = window_logits.shape
        r, c = self.grid
        return window_logits.reshape(r, c, C, h, w).permute(2, 0, 3, 1, 4).reshape(C, r * h, c * w)

    def half_apply(self, window_logits: torch.Tensor) -> torch.Tensor:
        """[C, n_rows * h_tok, W]: the column direction done (small); rows stay at token resolution."""
        return self.token_canvas(window_logits.to(self.cols.dtype)) @ self.cols.T

    def rows_apply(self, half: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """[C, stop - start, W]: original-image rows [start, stop) of the logits."""
        return self.rows[start:stop] @ half

    def __call__(self, window_logits: torch.Tensor) -> torch.Tensor:
        """[n_windows, C, h_tok, w_tok] -> [C, H, W] logits at the original size."""
        return self.rows_apply(self.half_apply(window_logits))
