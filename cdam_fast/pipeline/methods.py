"""Training-free last-layer variants (spec section 7) and the CDAM re-run (spec section 3).

A method runs the last block(s) of the image tower on the cached tokens with its own
attention and its own residual / MLP choices; the result is the baseline's output, from which
S is computed. With CDAM on top the last block is run again on the same cached input with the
method's attention output replaced by the CDAM map times the values: only the patch tokens are
recomputed, since the map's CLS row and column are zero and every later operation is per token.
Attention tensors are [B, heads, T, head_dim]; token tensors [B, T, width], CLS first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..validation import CdamInputError

NACLIP_STD = 5.0  # patches: std of NACLIP's Gaussian neighbourhood prior
GEM_DEPTH = 6  # GEM's parallel path spans the last 6 blocks


@dataclass
class FirstPass:
    """What the first pass leaves for the re-run (x_L1 and friends are cached here)."""
    out: torch.Tensor  # tokens after the method's last block (before ln_post), [B, 1+N, width]
    residual: torch.Tensor | None  # stream the last block's attention output is added to; None: no residual
    v: torch.Tensor  # the last block's values, heads concatenated, [B, 1+N, width]


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, W = t.shape
    return t.reshape(B, T, heads, W // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    B, H, T, d = t.shape
    return t.transpose(1, 2).reshape(B, T, H * d)


class LastLayerMethod:
    """A last-layer variant: `attend` gives the per-head attention output; `residual` and `mlp`
    say whether the block keeps its residual connection and its MLP."""
    name = "?"
    residual = True
    mlp = True
    depth = 1  # blocks at the end of the tower the method computes itself

    def attend(self, q, k, v, grid, x_ln) -> torch.Tensor:
        raise NotImplementedError

    def finish_block(self, backbone, residual, heads_out: torch.Tensor) -> torch.Tensor:
        """The last block's output from its attention output (heads concatenated)."""
        x = backbone.attention_residual(heads_out)
        if residual is not None:
            x = residual + x
        if self.mlp:
            x = x + backbone.mlp_residual(x)
        return x

    def first_pass(self, backbone, x_last: torch.Tensor, grid) -> FirstPass:
        """x_last: tokens entering block L - depth (for depth 1, x_L1)."""
        q, k, v = backbone.qkv(x_last)
        H = backbone.heads
        heads_out = merge_heads(self.attend(split_heads(q, H), split_heads(k, H), split_heads(v, H), grid,
                                            backbone.ln_1(x_last)))
        residual = x_last if self.residual else None
        return FirstPass(self.finish_block(backbone, residual, heads_out), residual, v)

    def rerun(self, backbone, first: FirstPass, patch_heads_out: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, width] of the last block re-run with attention output
        patch_heads_out = A @ v (the CDAM map times the patch values)."""
        residual = None if first.residual is None else first.residual[:, 1:]
        return self.finish_block(backbone, residual, patch_heads_out.to(first.v.dtype))


class Vanilla(LastLayerMethod):
    """CLIP's own attention (not a segmentation method; used to check the functional block)."""
    name = "clip"

    def attend(self, q, k, v, grid, x_ln):
        return F.scaled_dot_product_attention(q, k, v)


class MaskClip(LastLayerMethod):
    """Identity attention: the values pass straight through W_o; residual and MLP kept."""
    name = "maskclip"

    def attend(self, q, k, v, grid, x_ln):
        return v


class SClip(LastLayerMethod):
    """softmax(q q^T / sqrt d) + softmax(k k^T / sqrt d); residual and MLP kept."""
    name = "sclip"

    def attend(self, q, k, v, grid, x_ln):
        return F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)


class ClearClip(LastLayerMethod):
    """softmax(q q^T / sqrt d); no residual, no MLP."""
    name = "clearclip"
    residual = False
    mlp = False

    def attend(self, q, k, v, grid, x_ln):
        return F.scaled_dot_product_attention(q, q, v)


def gaussian_prior(grid, std: float, device, dtype) -> torch.Tensor:
    """[1+N, 1+N] additive attention bias: exp(-|pos_i - pos_j|^2 / (2 std^2)) between patches
    (grid distance in patches), 0 in the CLS row and column."""
    ys, xs = torch.meshgrid(torch.arange(grid.h, device=device), torch.arange(grid.w, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], -1).to(torch.float32)
    d2 = (pos[:, None, :] - pos[None, :, :]).square().sum(-1)
    bias = torch.zeros(grid.n + 1, grid.n + 1, device=device)
    bias[1:, 1:] = torch.exp(-d2 / (2 * std * std))
    return bias.to(dtype)


class NaClip(LastLayerMethod):
    """softmax(k k^T / sqrt d + G), G a Gaussian neighbourhood prior; no residual, no MLP."""
    name = "naclip"
    residual = False
    mlp = False

    def __init__(self, std: float = NACLIP_STD):
        self.std = std
        self._priors: dict = {}

    def attend(self, q, k, v, grid, x_ln):
        key = (grid, k.device, k.dtype)
        if key not in self._priors:
            self._priors[key] = gaussian_prior(grid, self.std, k.device, k.dtype)
        return F.scaled_dot_product_attention(k, k, v, attn_mask=self._priors[key])


def _self_self(t: torch.Tensor, values: torch.Tensor, inv_temp: torch.Tensor) -> torch.Tensor:
    """softmax(t t^T * inv_temp) @ values for L2-normalised t; inv_temp per image [B, 1, 1, 1]."""
    t = F.normalize(t, dim=-1)
    return F.scaled_dot_product_attention(t * inv_temp, t, values, scale=1.0)


class Gem(LastLayerMethod):
    """GEM: self-self attention over q, k and v (one refinement round, inverse temperature
    = mean token norm of ln_1(x) / sqrt d), the three outputs averaged. It runs as a parallel
    path over the last 6 blocks: the path adds each block's GEM attention output to its own
    stream, with no MLP, while q, k, v come from the unmodified tower."""
    name = "gem"
    residual = True
    mlp = False
    depth = GEM_DEPTH

    def attend(self, q, k, v, grid, x_ln):
        inv_temp = x_ln.float().norm(dim=-1).mean(-1).reshape(-1, 1, 1, 1) / math.sqrt(q.shape[-1])
        inv_temp = inv_temp.to(q.dtype)
        outs = []
        for t in (q, k, v):
            refined = _self_self(t, F.normalize(t, dim=-1), inv_temp)  # the one refinement round
            outs.append(_self_self(refined, v, inv_temp))
        return (outs[0] + outs[1] + outs[2]) / 3

    def first_pass(self, backbone, x_last, grid):
        L, H = backbone.depth, backbone.heads
        depth = min(self.depth, L)
        x, path = x_last, x_last
        for i in range(L - depth, L):
            q, k, v = backbone.qkv(x, i)
            heads_out = merge_heads(self.attend(split_heads(q, H), split_heads(k, H), split_heads(v, H), grid,
                                                backbone.ln_1(x, i)))
            if i == L - 1:
                residual, v_last = path, v
            path = path + backbone.attention_residual(heads_out, i)
            if i < L - 1:
                x = backbone.run_blocks(x, i, i + 1)
        return FirstPass(path, residual, v_last)


# The one method registry: the Segmenter, the reference pipeline, evaluation and every CLI
# choice list read it. A new method subclasses LastLayerMethod and calls register_method.
METHODS: dict = {}


def register_method(cls):
    """Add a LastLayerMethod subclass under cls.name (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, LastLayerMethod)) or not isinstance(cls.name, str) \
            or cls.name != cls.name.lower() or cls.name in ("?", ""):
        raise TypeError(f"register_method needs a LastLayerMethod subclass with a lower-case name, got {cls!r}")
    METHODS[cls.name] = cls
    return cls


for _cls in (MaskClip, SClip, ClearClip, NaClip, Gem):
    register_method(_cls)


# Methods that are whole segmenters rather than a last-layer attention (a Segmenter subclass,
# "module:Class", imported when asked for): Segmenter(method=name) builds that class.
SEGMENTER_METHODS = {"cliper": "cdam_fast.pipeline.cliper:CliperSegmenter"}


def method_names() -> tuple:
    """Every method name, in registration order (CLI choices): last-layer methods, then the
    segmenter methods."""
    return tuple(METHODS) + tuple(SEGMENTER_METHODS)


def segmenter_class(name):
    """The Segmenter subclass that runs method `name`, or None for a last-layer method."""
    if not isinstance(name, str) or name.lower() not in SEGMENTER_METHODS:
        return None
    import importlib

    module, cls = SEGMENTER_METHODS[name.lower()].split(":")
    return getattr(importlib.import_module(module), cls)


def get_method(name: str) -> LastLayerMethod:
    if not isinstance(name, str) or name.lower() not in METHODS:
        raise CdamInputError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name.lower()]()
