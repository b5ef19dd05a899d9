"""Sparse linear maps along one axis ("taps"), applied in a fixed order.

Native-resolution segmentation (native.py) resizes pixels and assembles window logits with
maps in which every output index reads a handful of input indices: bilinear weights, the
windows that overlap a pixel, a final resize. Stored densely (as windows.py's matrices are)
such a map is [H, n_windows * h_tok]: hundreds of MB for a 30000-row image, and a dense
matmul's float sums depend on its shape and blocking. Taps store each output's inputs in
ascending order with their weights, padded to a common count with weight 0, and `apply`
adds the terms one tap at a time with plain element-wise multiplies and adds. Every output
value is therefore the same float computation whether the map is applied to a whole image or
to a band of rows of it: the streamed assembler and the in-memory one agree to the bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Taps:
    """out[o] = sum_t weight[o, t] * x[index[o, t]] (t ascending); rows padded with weight 0."""
    index: torch.Tensor  # [out, T] int64, ascending per row (padding repeats the row's first index)
    weight: torch.Tensor  # [out, T] float64 (cast to the data's dtype where applied)
    inputs: int  # length of the input axis

    @property
    def size(self) -> int:
        return self.index.shape[0]

    def span(self, start: int = 0, stop: int | None = None) -> tuple:
        """[lo, hi): the input indices that outputs [start, stop) read."""
        idx = self.index[start:stop]
        return int(idx[:, 0].min()), int(idx.max()) + 1

    def last_reader(self, k: int) -> int:
        """The number of leading outputs that read only inputs < k (they are final once inputs
        [0, k) are known; outputs read ascending inputs as o grows)."""
        return int(torch.searchsorted(self.index.max(1).values.contiguous(), torch.tensor([k]), right=False)[0])

    def apply(self, x: torch.Tensor, dim: int, start: int = 0, stop: int | None = None,
              offset: int = 0) -> torch.Tensor:
        """Outputs [start, stop) along `dim` of x, whose index 0 along `dim` is input `offset`
        (x must hold every input the outputs read)."""
        idx = (self.index[start:stop] - offset).to(x.device)
        w = self.weight[start:stop].to(x.device, x.dtype)
        shape = [1] * x.dim()
        shape[dim] = -1
        out = None
        for t in range(idx.shape[1]):  # one tap at a time: mul then add, never a fused multiply-add
            term = x.index_select(dim, idx[:, t]) * w[:, t].reshape(shape)
            out = term if out is None else out.add_(term)
        return out


def from_entries(out: int, inputs: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> Taps:
    """Taps from (output, input, weight) entries; repeated (output, input) pairs are summed in
    float64, zero weights dropped (an output with no entry reads input 0 with weight 0)."""
    keep = weights != 0
    rows, cols, weights = rows[keep], cols[keep], weights[keep]
    key = rows.astype(np.int64) * inputs + cols
    uniq, inv = np.unique(key, return_inverse=True)  # sorted: by output, then input ascending
    summed = np.zeros(len(uniq), dtype=np.float64)
    np.add.at(summed, inv, weights)
    r, c = uniq // inputs, uniq % inputs
    counts = np.bincount(r, minlength=out)
    T = max(1, int(counts.max()) if len(counts) else 1)
    first = np.zeros(out, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    has = counts > 0
    first[has] = c[starts[has]]
    index = np.repeat(first[:, None], T, axis=1)
    weight = np.zeros((out, T), dtype=np.float64)
    slot = np.arange(len(uniq)) - np.repeat(starts, counts)
    index[r, slot] = c
    weight[r, slot] = summed
    return Taps(torch.from_numpy(index), torch.from_numpy(weight), inputs)


def identity_taps(n: int) -> Taps:
    ar = np.arange(n)
    return from_entries(n, n, ar, ar, np.ones(n))


def _bilinear_entries(out: int, inputs: int):
    """torch's 1-D linear interpolation (align_corners=False, no antialias) as entries."""
    o = np.arange(out)
    src = np.maximum((o + 0.5) * (inputs / out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), inputs - 1)
    i1 = np.minimum(i0 + 1, inputs - 1)
    l1 = src - i0
    return np.concatenate([o, o]), np.concatenate([i0, i1]), np.concatenate([1.0 - l1, l1])


def _antialias_entries(out: int, inputs: int):
    """A triangle filter as wide as the scale (torch's antialiased bilinear, PIL's BILINEAR)
    for shrinking: every input pixel contributes."""
    scale = inputs / out
    support = scale  # bilinear's support 1, stretched by the scale
    rows, cols, weights = [], [], []
    for o in range(out):
        centre = scale * (o + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), inputs)
        j = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((j - centre + 0.5) / scale))
        total = w.sum()
        rows.append(np.full(len(j), o)), cols.append(j), weights.append(w / total if total > 0 else w)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)


def resize_taps(out: int, inputs: int) -> Taps:
    """Resize one axis from `inputs` to `out` samples: identity, bilinear when enlarging,
    antialiased (triangle filter) when shrinking."""
    if out == inputs:
        return identity_taps(out)
    entries = _bilinear_entries(out, inputs) if out > inputs else _antialias_entries(out, inputs)
    return from_entries(out, inputs, *entries)


def assembly_taps(starts, window: int, tokens: int, resized: int, original: int) -> Taps:
    """The windows.axis_matrix map as taps: window token logits (inputs: window i's token t at
    i * tokens + t) -> upsampled to the window, placed, overlaps averaged -> resized to the
    original length (bilinear, as the protocol's final resize; antialiased when shrinking)."""
    up_r, up_c, up_w = _bilinear_entries(window, tokens)
    rows, cols, weights = [], [], []
    count = np.zeros(resized, dtype=np.float64)
    for i, s in enumerate(starts):
        rows.append(up_r + s), cols.append(up_c + i * tokens), weights.append(up_w)
        count[s:s + window] += 1
    rows, cols, weights = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)
    weights = weights / np.maximum(count[rows], 1)
    placed = from_entries(resized, len(starts) * tokens, rows, cols, weights)
    if original == resized:
        return placed
    return compose(resize_taps(original, resized), placed)


def compose(outer: Taps, inner: Taps) -> Taps:
    """outer after inner: out[o] = sum_j outer[o, j] * sum_k inner[j, k] x[k] (weights in float64)."""
    k = inner.index[outer.index]  # [out, T_outer, T_inner]
    w = outer.weight[:, :, None] * inner.weight[outer.index]
    rows = torch.arange(outer.size)[:, None, None].expand_as(k)
    return from_entries(outer.size, inner.inputs, rows.reshape(-1).numpy(), k.reshape(-1).numpy(),
                        w.reshape(-1).numpy())


def tile_side(max_tokens: int, patch: int) -> int:
    """Side in pixels of the largest square tile of whole patches with at most max_tokens tokens."""
    return max(1, math.isqrt(max_tokens)) * patch


__all__ = ["Taps", "assembly_taps", "compose", "from_entries", "identity_taps", "resize_taps", "tile_side"]
