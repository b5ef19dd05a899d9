"""Loading an open_clip model and using its image tower for dense (per-patch) prediction.

`load_clip` builds the model (pretrained tag, local checkpoint or seeded random weights) and
wraps it in a `ClipBackbone`, which exposes the pieces the last-layer methods need: token
embedding at any input size (positional embeddings interpolated per grid and cached), the
blocks before the last, and the last block's parts computed functionally from the block's own
weights (layer norms, qkv / output projections, layer scales, MLP), so that the pipeline does
not depend on how a given open_clip version writes a block's forward.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..validation import CdamInputError
from .weights import WeightsUnavailableError, check_checkpoint_file, check_download

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
#: Seed of the random weights drawn for pretrained=None (repeatable offline runs and tests).
RANDOM_WEIGHTS_SEED = 0
_NO_WEIGHTS = ("none", "random", "")
# Loaded backbones, kept while some Segmenter uses them: building the same model twice
# returns the same object (and its text-embedding cache) instead of a second copy.
_SHARED: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # the CLIP pipeline is an optional extra
        raise ImportError("the CLIP pipeline needs open_clip_torch: pip install 'cdam-fast[clip]'") from e
    return open_clip


def _check_model_name(open_clip, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise CdamInputError(f"model must be an open_clip model name such as 'ViT-B-16', got {name!r}")
    if name.startswith(("hf-hub:", "local-dir:")):
        return  # resolved by open_clip itself
    known = open_clip.list_models()
    if name not in known:
        close = [m for m in known if name.lower().replace("/", "-") in m.lower()][:8]
        hint = f" Similar names: {', '.join(close)}." if close else " See open_clip.list_models()."
        raise CdamInputError(f"model: unknown open_clip model name {name!r}.{hint}")


def check_device(device) -> torch.device:
    """The torch device to run on (None: CUDA when available), or a CdamInputError naming `device`."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CdamInputError(f"device: {device!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CdamInputError("device: CUDA was requested but no CUDA device is available")
    return device


def _is_weights_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.startswith("~") or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".npz"))


def load_clip(model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, device=None,
              seed: int = RANDOM_WEIGHTS_SEED, quick_gelu: bool | None = None, cache_dir: str | None = None,
              share: bool = True) -> "ClipBackbone":
    """Build an open_clip model and wrap it for dense prediction.

    pretrained: an open_clip tag ("openai", "laion2b_s34b_b88k", ...; downloaded on request),
    a local checkpoint path, or None / "none" for random weights drawn from `seed` (the global
    torch RNG is left untouched). quick_gelu: None follows the tag's training setting; for a
    local file it follows the model's "openai" tag (OpenAI CLIP weights), pass False for others.
    share: reuse a backbone already loaded with the same arguments while it is alive.
    """
    device = check_device(device)
    key = (model, pretrained if pretrained is None else str(pretrained), str(device), seed, quick_gelu, cache_dir)
    if share and key in _SHARED:
        return _SHARED[key]
    backbone = _load(model, pretrained, device, seed, quick_gelu, cache_dir)
    if share:
        _SHARED[key] = backbone
    return backbone


def _load(model, pretrained, device, seed, quick_gelu, cache_dir) -> "ClipBackbone":
    open_clip = _open_clip()
    _check_model_name(open_clip, model)
    base = model.replace("/", "-")
    kwargs = {}
    if pretrained is None or (isinstance(pretrained, str) and pretrained.strip().lower() in _NO_WEIGHTS):
        if quick_gelu:
            kwargs["force_quick_gelu"] = True
        with torch.random.fork_rng(devices=[]):  # repeatable weights without disturbing the caller's RNG
            torch.manual_seed(seed)
            clip = open_clip.create_model(model, pretrained=None, **kwargs)
        source = f"random weights (seed {seed})"
    elif not isinstance(pretrained, str):
        raise CdamInputError(f"pretrained must be a tag, a file path or None, got {pretrained!r}")
    else:
        path = os.path.expanduser(pretrained)
        tags = open_clip.list_pretrained_tags_by_model(base)
        if os.path.exists(path):
            if not os.path.isfile(path):
                raise CdamInputError(f"pretrained: {pretrained!r} is a directory, not a checkpoint file")
            if quick_gelu is None:
                quick_gelu = bool((open_clip.get_pretrained_cfg(base, "openai") or {}).get("quick_gelu", False))
            kwargs["force_quick_gelu"] = quick_gelu
            check_checkpoint_file(path)  # a clear message instead of the unpickler's KeyError
            try:
                clip = open_clip.create_model(model, pretrained=path, cache_dir=cache_dir, **kwargs)
            except Exception as e:
                raise WeightsUnavailableError(
                    f"pretrained: could not load checkpoint {path!r} into {model!r} ({type(e).__name__}: {e})") from e
            source = path
        elif pretrained in tags or model.startswith(("hf-hub:", "local-dir:")):
            cfg = open_clip.get_pretrained_cfg(base, pretrained) or {}
            if quick_gelu is None:
                quick_gelu = bool(cfg.get("quick_gelu", False))
            kwargs["force_quick_gelu"] = quick_gelu
            check_download(model, pretrained, cfg, cache_dir)  # fail in seconds without network
            try:
                clip = open_clip.create_model(model, pretrained=pretrained, cache_dir=cache_dir, **kwargs)
            except Exception as e:
                raise WeightsUnavailableError(
                    f"could not download or read the {model!r} weights tagged {pretrained!r} ({e}). Without network "
                    "access, fetch the checkpoint on another machine and pass its local path (pretrained='/path/to/"
                    "weights.pt', CLI: --pretrained PATH), or use pretrained=None (--pretrained none) for random "
                    "weights") from e
            source = f"{pretrained} weights"
        elif _is_weights_path(pretrained):
            raise CdamInputError(f"pretrained: checkpoint file {pretrained!r} does not exist")
        else:
            raise CdamInputError(f"pretrained: {pretrained!r} is neither a local file nor a known tag for {model!r}; "
                                 f"known tags: {', '.join(tags) or 'none'}")
    return ClipBackbone(clip.to(device).eval(), open_clip.get_tokenizer(model), name=model, source=source)


def _layer_norm(ln, x: torch.Tensor) -> torch.Tensor:
    if isinstance(ln, torch.nn.Identity):
        return x
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _layer_scale(ls, x: torch.Tensor) -> torch.Tensor:
    gamma = getattr(ls, "gamma", None)  # open_clip LayerScale; nn.Identity otherwise
    return x if gamma is None else x * gamma


@dataclass(frozen=True)
class Grid:
    """Patch grid of a crop: h x w patch tokens."""
    h: int
    w: int

    @property
    def n(self) -> int:
        return self.h * self.w


class ClipBackbone:
    """An open_clip CLIP model prepared for dense prediction (see the module docstring).

    Token tensors are batch-first, [B, 1 + N, width], the CLS token first.
    """

    def __init__(self, clip, tokenizer, name: str = "?", source: str = "?"):
        open_clip = _open_clip()
        visual = getattr(clip, "visual", None)
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise CdamInputError(f"model {name!r}: only open_clip ViT image towers are supported, "
                                 f"got {type(visual).__name__}")
        if getattr(visual, "attn_pool", None) is not None:
            raise CdamInputError(f"model {name!r}: image towers with attentional pooling are not supported")
        self.blocks = list(visual.transformer.resblocks)
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            if getattr(attn, "in_proj_weight", None) is None or not hasattr(attn, "out_proj") \
                    or getattr(attn, "scaled_cosine", False) or getattr(attn, "head_scale", None) is not None:
                raise CdamInputError(f"model {name!r}: block {i} has an attention layout this pipeline cannot "
                                     "take apart (it needs a fused in_proj_weight and out_proj)")
        self.clip, self.visual, self.tokenizer = clip, visual, tokenizer
        self.name, self.source = name, source
        self.patch_size = tuple(int(p) for p in visual.patch_size)
        self.width = visual.positional_embedding.shape[-1]
        self.heads = self.blocks[-1].attn.num_heads
        self.native_grid = Grid(*visual.grid_size)
        self.embed_dim = visual.proj.shape[-1] if visual.proj is not None else self.width
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self._pos_cache: dict = {}
        self.text_cache: dict = {}  # filled by pipeline.text: one embedding per (prompt, templates)

    # -- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.visual.positional_embedding.device

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def __repr__(self):
        return f"ClipBackbone({self.name!r}, {self.source}, patch {self.patch_size}, {self.depth} blocks)"

    # -- embedding --------------------------------------------------------------------------
    def positional_embedding(self, grid: Grid, interpolation: str = "published") -> torch.Tensor:
        """[1 + N, width]: the model's positional embeddings with the patch part resized
        bicubically to `grid` (cached per grid, rule and device; the native grid returns the
        model's own table). interpolation: "published" (scale_factor = (g + 0.1) / g0 per axis,
        the DINO-style call of the published code) or "size" (size = g); see presets.py."""
        pos = self.visual.positional_embedding
        key = (grid.h, grid.w, interpolation, pos.device)
        if key not in self._pos_cache:
            if grid == self.native_grid:
                table = pos.detach()
            else:
                g = self.native_grid
                patch = pos[1:].detach().float().reshape(1, g.h, g.w, -1).permute(0, 3, 1, 2)
                if interpolation == "published":
                    factor = ((grid.h + 0.1) / g.h, (grid.w + 0.1) / g.w)
                    patch = F.interpolate(patch, scale_factor=factor, mode="bicubic", align_corners=False,
                                          recompute_scale_factor=False)
                elif interpolation == "size":
                    patch = F.interpolate(patch, size=(grid.h, grid.w), mode="bicubic", align_corners=False)
                else:
                    raise CdamInputError(f"positional-embedding interpolation must be 'published' or 'size', "
                                         f"got {interpolation!r}")
                if tuple(patch.shape[-2:]) != (grid.h, grid.w):  # floor((g + 0.1) / g0 * g0) is g
                    raise AssertionError(f"interpolated grid {tuple(patch.shape[-2:])} != {grid}")
                table = torch.cat([pos[:1].detach().float(), patch.permute(0, 2, 3, 1).reshape(grid.n, -1)])
                table = table.to(pos.dtype)
            self._pos_cache[key] = table
        return self._pos_cache[key]

    def embed(self, images: torch.Tensor, pos_interp: str = "published") -> tuple[torch.Tensor, Grid]:
        """Normalised images [B, 3, H, W] -> tokens entering block 0, and their patch grid.
        Pixels beyond the last whole patch are ignored (the patch convolution drops them)."""
        x = self.visual.conv1(images)  # [B, width, h, w]
        grid = Grid(x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = self.visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid, pos_interp).to(x.dtype)
        return _layer_norm(self.visual.ln_pre, x), grid

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks [start, stop) with their own forward (batch-first in, batch-first out)."""
        for blk in self.blocks[start:stop]:
            # open_clip before 2.2x ran its blocks sequence-first; nn.MultiheadAttention says which.
            seq_first = not getattr(blk.attn, "batch_first", True)
            x = blk(x.transpose(0, 1)).transpose(0, 1) if seq_first else blk(x)
        return x

    # -- one block, functionally ---------------------------------------------------------------
    def qkv(self, x: torch.Tensor, index: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, T, width] (heads concatenated) of block `index` for its input x."""
        blk = self.blocks[index]
        y = _layer_norm(blk.ln_1, x)
        qkv = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        return qkv.chunk(3, dim=-1)

    def ln_1(self, x: torch.Tensor, index: int = -1) -> torch.Tensor:
        return _layer_norm(self.blocks[index].ln_1, x)

    def attention_residual(self, heads_out: torch.Tensor, index: int = -1) -> torch.Tensor:
        """What block `index` adds to the residual stream for an attention output [B, T, width]:
        ls_1(out_proj(heads_out))."""
        blk = self.blocks[index]
        y = F.linear(heads_out, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
        return _layer_scale(blk.ls_1, y)

    def mlp_residual(self, x: torch.Tensor, index: int = -1) -> torch.Tensor:
        """ls_2(mlp(ln_2(x))) of block `index`."""
        blk = self.blocks[index]
        return _layer_scale(blk.ls_2, blk.mlp(_layer_norm(blk.ln_2, x)))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> L2-normalised joint-space features [..., embed_dim]."""
        y = _layer_norm(self.visual.ln_post, x)
        if self.visual.proj is not None:
            y = y @ self.visual.proj.to(y.dtype)
        return F.normalize(y.float(), dim=-1)

    # -- text -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, context] -> unnormalised text features [B, embed_dim] (float32).

        For the standard CLIP text tower (causal mask, EOT pooling) the tower runs only on the
        columns up to the last EOT token: causality makes the result identical, and prompts are
        far shorter than the 77-token context, which matters on CPU.
        """
        open_clip = _open_clip()
        clip = self.clip
        tokens = tokens.to(self.device)
        standard = (isinstance(clip, open_clip.CLIP) and getattr(clip, "text_pool_type", "argmax") == "argmax"
                    and getattr(clip, "attn_mask", None) is not None)
        if not standard:
            return clip.encode_text(tokens).float()
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1
        x = clip.token_embedding(tokens[:, :length]) + clip.positional_embedding[:length]
        mask = clip.attn_mask[:length, :length]
        if getattr(clip.transformer, "batch_first", False):
            x = clip.transformer(x, attn_mask=mask)
        else:
            x = clip.transformer(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        x = clip.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]
        proj = clip.text_projection
        if isinstance(proj, torch.nn.Linear):
            x = proj(x)
        elif proj is not None:
            x = x @ proj
        return x.float()
