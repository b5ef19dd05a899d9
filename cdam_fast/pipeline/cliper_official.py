"""The steps of CLIPer's public evaluation code around the network (pipeline="official").

CLIPer's presets follow its public code (github.com/linsun449/cliper.code, ovs/main_ovs.py and
modified_clip/model.py) step by step; the package's own choices (pipeline="package") are kept
beside them. What each function reproduces:

* `official_size`: the short side scaled to `short_side` in floating point, then each side
  rounded to whole patches as int(x / patch + 0.5) (halves up), with no long-side cap.
* `pil_resize`: PIL's Image.resize with BICUBIC on the 8-bit image, then / 255. PIL resamples
  separably (columns first, then rows, through an 8-bit intermediate image) with the Keys
  cubic (a = -0.5) whose support is widened by the scale factor when shrinking (antialiasing),
  weights normalised per output pixel and applied in 22-bit fixed point, each pass rounded and
  clipped to 0..255.
* `official_pos_table`: the patch part of the positional table resized bilinearly
  (align_corners=False) to the token grid, the class row prepended, and the whole table
  rounded to fp16 (.half(), on every device) before it is added to the fp32 tokens.
* `merge_windows`: the sliding-window variant: per window, the logits of every set (all
  prompts) and the head-mean fused map of its tokens; logits averaged where windows overlap,
  the fused maps placed block-diagonally and averaged per token pair (count + 1e-5), rows
  normalised, the averaged logits propagated once through that map.
* `combine_official`: the chosen set thresholded IN PLACE (the public code thresholds a view
  of the stacked sets, so the mean over the sets sees the thresholded set), propagated through
  the head-mean fused map, plus that mean.
* `direct_assembler`: the token-grid map resized bilinearly (align_corners=False) straight to
  the original image size, once.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..validation import CdamInputError
from .model import Grid, _layer_norm
from .windows import Assembler, _resize_matrix, window_starts

SLIDE_STRIDE = 112  # forward_slide's default stride, which its callers never change
_COUNT_EPS = 1e-5  # added to the per-pair window count of the merged fused map


def official_size(height: int, width: int, short_side: int, patch: int) -> tuple:
    """(H', W') of an H x W image: short side -> short_side, sides rounded to whole patches
    half up on the unrounded size (no cap). 300 x 436 at 336 -> 336 x 496."""
    ratio = short_side / min(height, width)
    return (int(height * ratio / patch + 0.5) * patch, int(width * ratio / patch + 0.5) * patch)


def pil_resize(pixels: torch.Tensor, size: tuple) -> torch.Tensor:
    """pixels [3, H, W] (uint8, or float in [0, 1]) -> float32 [3, *size] in [0, 1] (CPU).
    uint8: PIL bicubic on the RGB image, as CLIPer's loader does; float data (no 8-bit file
    behind it) is resized per channel in PIL's float mode, without 8-bit rounding."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    arr = pixels.detach().cpu()
    if arr.dtype == torch.uint8:
        im = Image.fromarray(np.ascontiguousarray(arr.permute(1, 2, 0).numpy()))  # RGB
        out = np.asarray(im.resize((w, h), Image.BICUBIC))
        return torch.from_numpy(out.copy()).permute(2, 0, 1).float() / 255.0
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(c.float().numpy())).resize((w, h), Image.BICUBIC))
             for c in arr]
    return torch.from_numpy(np.stack(chans)).float()


def official_pos_table(backbone, grid: Grid) -> torch.Tensor:
    """[1 + N, width] in fp16: the positional table for `grid`, as CLIPer's upsample_pos_emb."""
    pos = backbone.visual.positional_embedding.detach()
    g = backbone.native_grid
    patch = pos[1:].T.reshape(1, -1, g.h, g.w)
    patch = F.interpolate(patch, size=(grid.h, grid.w), mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], patch.reshape(pos.shape[1], -1).T]).half()


def official_embed(backbone, images: torch.Tensor, cache: dict | None = None):
    """Normalised images [B, 3, H, W] -> (tokens entering block 0, grid), with the fp16
    positional table of `official_pos_table` (cached per grid and device in `cache`)."""
    v = backbone.visual
    x = v.conv1(images)
    grid = Grid(x.shape[-2], x.shape[-1])
    key = (grid, x.device)
    table = None if cache is None else cache.get(key)
    if table is None:
        table = official_pos_table(backbone, grid)
        if cache is not None:
            cache[key] = table
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1) + table.to(x.dtype)
    return _layer_norm(v.ln_pre, x), grid


def slide_boxes(size: tuple, crop: int, stride: int = SLIDE_STRIDE) -> list:
    """(top, left) of every window over an image of `size`, row by row (the last one snapped
    to the border; one window per axis when the side is no longer than the crop)."""
    return [(y, x) for y in window_starts(size[0], crop, stride) for x in window_starts(size[1], crop, stride)]


def merge_windows(logits: torch.Tensor, attn: torch.Tensor, boxes: list, grid: tuple) -> torch.Tensor:
    """logits [n, L, K, hc, wc] and head-mean patch fused maps attn [n, hc * wc, hc * wc] of the
    n windows at token offsets `boxes` -> the propagated merged logits [L, K, h, w]."""
    n, L, K, hc, wc = logits.shape
    h, w = grid
    dev, dt = logits.device, logits.dtype
    preds = torch.zeros(L, K, h, w, device=dev, dtype=dt)
    count = torch.zeros(h, w, device=dev, dtype=dt)
    pairs = torch.zeros(h, w, h, w, device=dev, dtype=attn.dtype)
    pair_count = torch.zeros(h, w, h, w, device=dev, dtype=attn.dtype)
    for i, (y, x) in enumerate(boxes):
        preds[..., y:y + hc, x:x + wc] += logits[i]
        count[y:y + hc, x:x + wc] += 1
        pairs[y:y + hc, x:x + wc, y:y + hc, x:x + wc] += attn[i].reshape(hc, wc, hc, wc)
        pair_count[y:y + hc, x:x + wc, y:y + hc, x:x + wc] += 1
    preds /= count
    pairs /= pair_count + _COUNT_EPS
    A = pairs.reshape(h * w, h * w)
    A /= A.sum(-1, keepdim=True)
    return (preds.reshape(L, K, h * w) @ A.to(dt)).reshape(L, K, h, w)


def combine_official(probs: torch.Tensor, fused_mean: torch.Tensor, set_index: int, threshold: float,
                     fuse_sets: bool = True) -> torch.Tensor:
    """probs [L, C, N] (one image; modified in place, as the public code does), fused_mean
    [N, N] -> [C, N]: set `set_index` thresholded at `threshold` x its per-class maximum,
    propagated (map @ A), plus (fuse_sets) the mean over the sets INCLUDING the thresholded one."""
    s = probs[set_index]
    s[s < s.amax(-1, keepdim=True) * threshold] = 0
    return s @ fused_mean + probs.mean(0) if fuse_sets else s @ fused_mean


def direct_matrices(tokens: tuple, original: tuple):
    """(rows [H, h], cols [W, w]) float64: bilinear token grid -> original size in one step."""
    return _resize_matrix(original[0], tokens[0]), _resize_matrix(original[1], tokens[1])


@lru_cache(maxsize=64)
def direct_assembler(tokens: tuple, original: tuple, device) -> Assembler:
    """An Assembler (one window) whose upsampling is the public code's single bilinear resize."""
    rows, cols = direct_matrices(tokens, original)
    return Assembler(rows.to(device, torch.float32), cols.to(device, torch.float32), (1, 1))


def check_official_size(size: tuple, patch: int, what: str, short_side: int) -> None:
    if min(size) < patch:
        raise CdamInputError(f"{what}: short_side {short_side} rounds to {min(size) // patch} patches of {patch} "
                             f"pixels; raise short_side")


__all__ = ["SLIDE_STRIDE", "check_official_size", "combine_official", "direct_assembler",
           "merge_windows", "official_embed", "official_pos_table", "official_size", "pil_resize", "slide_boxes"]
