"""Grid bookkeeping shared by every multi-scale backend (spec section 2, steps 1, 2 and 4).

The per-scale preprocessing (resize the [C, h, w] similarity grid, softmax over classes) is
cheap and identical for every backend, so it lives here once; backends differ only in how
they evaluate the divergences and gather them back onto the full grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CDAM_SCALES = (1.0, 0.25, 0.37, 0.5, 0.63, 0.75, 0.87)


def scale_grid(h: int, w: int, s: float) -> tuple[int, int]:
    """Grid size at scale s: int(h*s) x int(w*s); s = 1 keeps h x w.

    Grids smaller than 4 patches a side would round to zero at s = 0.25; they are kept at
    one patch so every scale stays defined.
    """
    if s == 1.0:
        return h, w
    return max(1, int(h * s)), max(1, int(w * s))


def class_distributions(sim: torch.Tensor, hs: int, ws: int, tau: float) -> torch.Tensor:
    """[B, C, h, w] raw similarities -> [B, hs*ws, C] class distributions softmax(S_s / tau).

    Computed in float32 (float64 for float64 input) whatever the input dtype.
    """
    x = sim if sim.dtype == torch.float64 else sim.float()
    if (hs, ws) != tuple(x.shape[-2:]):
        # a masked class (-inf) stays a zero probability: torch's bilinear resize turns -inf taps
        # into NaN (0 * inf, inf - inf); the most negative finite value resizes to itself
        x = F.interpolate(x.clamp_min(torch.finfo(x.dtype).min), size=(hs, ws), mode="bilinear",
                          align_corners=False, antialias=False)
    logits = x.flatten(-2).transpose(-1, -2)
    # softmax((S - max S) / tau), not softmax(S / tau): the same distribution, but S / tau can
    # overflow to inf (inf - inf = NaN in softmax) for small tau, (S - max) / tau <= 0 cannot.
    return torch.softmax((logits - logits.amax(-1, keepdim=True)) / tau, dim=-1).contiguous()


def bilinear_taps_1d(out_size: int, in_size: int, device=None):
    """Source indices and weights of torch's bilinear upsampling (align_corners=False).

    Returns (i0, i1, w0, w1), each of length out_size, such that
    out[k] = w0[k] * in[i0[k]] + w1[k] * in[i1[k]].
    """
    scale = in_size / out_size
    dst = torch.arange(out_size, dtype=torch.float64, device=device)
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = src - i0
    return i0, i1, 1.0 - w1, w1


def bilinear_taps_2d(h: int, w: int, hs: int, ws: int, device=None):
    """For every cell of the full h x w grid, its four source cells on the hs x ws grid.

    Returns idx [h*w, 4] (int32, flat indices into the small grid) and weights [h*w, 4]
    (float32); the upsampled value at cell k is sum_t weights[k, t] * small[idx[k, t]].
    """
    y0, y1, wy0, wy1 = bilinear_taps_1d(h, hs, device)
    x0, x1, wx0, wx1 = bilinear_taps_1d(w, ws, device)
    ys, wys = torch.stack([y0, y0, y1, y1], -1), torch.stack([wy0, wy0, wy1, wy1], -1)
    xs, wxs = torch.stack([x0, x1, x0, x1], -1), torch.stack([wx0, wx1, wx0, wx1], -1)
    idx = ys[:, None, :] * ws + xs[None, :, :]
    wts = wys[:, None, :] * wxs[None, :, :]
    return idx.reshape(h * w, 4).to(torch.int32), wts.reshape(h * w, 4).to(torch.float32)
