"""CLIPer (Sun et al., ICCV 2025): hierarchical early-layer fusion, alone or refined by CDAM.

Per crop (token tensors [B, T, width], T = 1 + N, CLS first; L blocks):

1. Early-layer fusion. Blocks 0..L-2 run as usual while each block's per-head attention
   probabilities softmax(q k^T / sqrt d) (CLS included) are added into M [B, heads, T, T] in
   fp32, one block at a time and in query-row chunks (never all layers' maps, never a full
   [heads, T, T] score tensor besides M). The features entering each early block's attention,
   ln_1_i(x_i), are kept, and so is x_{L-1}, the input of the last block (CLIPer's public code
   keeps exactly these). M becomes the fused map: divide by column sums (sum over queries), then
   by row sums, symmetrise (M + M^T) / 2, subtract the mean over the query axis, clamp at 0,
   row-normalise (`normalise_fused_`; rows left all-zero by the clamp stay zero).
2. The last block runs on all L kept inputs as one batch with the fused map in place of its
   attention (per head), without residual and without MLP: ls_1(out_proj(M @ v)), v from
   the last block's ln_1 and value projection. ln_post + proj give L sets of patch features.
3. Per set, class probabilities softmax(logit_scale * cos) over the classification prompts.
4. Combination: the chosen set's map (the last for ViT-B/16, the second-to-last for ViT-L/14),
   values below `threshold` x its per-class maximum zeroed, propagated once through the head-
   mean fused map (map @ A over patches), plus the mean over the L sets' maps.

With CDAM (`cdam=True`): S = the mean over the L sets of the raw cosine similarities to the
distribution prompts (classes + ATP); the multi-scale CDAM map of S replaces the fused map in
step 2 (or, with cdam_combine="average", is averaged with it: 0.5 (M_h + A) @ v, computed as
two products so A is never materialised); steps 3-4 are unchanged (the propagation keeps the
fused map). One fused-op call serves all L inputs: their values are concatenated along the
feature axis ([B, N, L * width]), so the divergences are computed once per crop.

Protocols. "mmseg" (default, the rest of the table's protocol): the classes as given (a
"background" class is a prompt like any other), labels by argmax, background options as for
the other methods with prob := the CLIPer map normalised over classes per pixel. "cliper-<dataset>"
(`CLIPER_PRESETS`): CLIPer's own protocol from its public configs - the whole image at its short
side (plus its sliding windows where a config enables them), its templates and class names, the
dataset classes after class 0 against CLIPer's background words and the mean foreground prompt,
image-level class scores (max of the map), a class-score threshold, a pixel threshold and optional
per-class min-max normalisation. Under it, pipeline="official" (default) runs every step around
the network as CLIPer's evaluation code does (cliper_official.py); pipeline="package" keeps the
package's own resize, positional table, size rule, combination and upsampling (docs/cliper.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from ..ops import multiscale_cdam_attention
from ..validation import CdamInputError
from . import background as bg
from .backbone_presets import backbone_preset
from .cliper_official import SLIDE_STRIDE, check_official_size, combine_official, direct_assembler, \
    merge_windows, official_embed, official_size, pil_resize, slide_boxes
from .cliper_options import ATTENTIONS, CDAM_COMBINES, CLIPER_DATASETS, NORMALISATIONS, PIPELINES
from .methods import merge_heads, split_heads
from .model import DEFAULT_MODEL, DEFAULT_PRETRAINED
from .images import to_pixels
from .segmenter import ImageResult, Segmenter, _assembler, _Prepared
from .text import parse_classes, read_class_file, resolve_templates
from .visualize import label_dtype
from .windows import SHORT_SIDE, whole_layout

COMPENSATIONS = (None, "sd")
PROTOCOL_MMSEG = "mmseg"
# Propagation thresholds of CLIPer's configs: 0.1 for VOC-sized class lists, 0.2 otherwise.
VOC_LIKE_THRESHOLD, OTHER_THRESHOLD, VOC_LIKE_MAX_CLASSES = 0.1, 0.2, 21
_ROW_BUDGET = 64 << 20  # bytes of attention scores per query-row chunk in the early blocks
_SYM_BLOCK = 1024  # tile of the in-place symmetrisation
_EPS_NORM = 1e-5  # CLIPer's epsilon in max-normalisations

_VOC_BG = ("ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
           "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street",
           "valley", "bridge", "sign")
_COCO_BG = tuple(w for w in _VOC_BG if w not in ("keyboard", "sign"))


@dataclass(frozen=True)
class CliperProtocol:
    """CLIPer's own evaluation protocol for one (backbone, dataset), from its public configs."""
    name: str
    background_words: tuple  # prompts competing with the classes; never an output
    templates: str  # "cliper" (its 15 templates) or "openai" (the 80 ImageNet ones)
    logit_scale: float
    class_threshold: float  # an image-level class score must exceed this (score_threshold)
    pixel_threshold: float  # pixels whose scaled map is below this are background (bkg_thre)
    normalize: bool  # per-class min-max of the scaled map before the pixel threshold (is_normalize)
    propagation_threshold: float  # attention_thr: the set threshold before propagation, and SD's
    short_side: int = 336  # size: the short side images are resized to
    select_layer: int = -1  # select_layer: the set that is thresholded and propagated
    sliding_crop: int = 0  # sliding_crop_size as the config ships it (0: whole image only)
    class_file: str | None = None  # CLIPer's class names (a packaged list), prompted for the dataset's classes
    dataset: str | None = None  # the package's dataset whose classes CLIPer's names stand for


def _p(name, words, templates, scale, cls_thr, px_thr, norm, prop, size=336, select=-1, slide=0):
    dataset = name[len("cliper-"):]
    return CliperProtocol(name, words, templates, scale, cls_thr, px_thr, norm, prop, size, select, slide,
                          CLIPER_CLASS_FILES[dataset], dataset)


_BG = ("background",)
# dataset -> CLIPer's class list (cdam_fast/data/classes). Its VOC20 and Context59 configs run
# the VOC21 / Context60 lists (class 0 included) and ignore ground-truth 0 when scoring.
CLIPER_CLASS_FILES = {"voc21": "cliper_voc21", "voc20": "cliper_voc21", "context60": "cliper_context60",
                      "context59": "cliper_context60", "coco_object": "cliper_coco_object",
                      "coco_stuff171": "cliper_coco_stuff171", "ade20k": "cliper_ade20k",
                      "cityscapes": "cliper_cityscapes"}
# (model, dataset) -> protocol: every value from scripts/config/<model>/ovs_<dataset>.yaml of
# CLIPer's public code, with the sliding-window crop each file enables as shipped. CLIPer's
# "Object" is COCO 2014 val (5k images); ours is built from COCO-Stuff 164k val2017 (docs/cliper.md).
#   name, background words, templates, logit scale, score_threshold, bkg_thre, is_normalize,
#   attention_thr, size, select_layer, sliding_crop_size
CLIPER_PRESETS = {
    ("ViT-B-16", "voc21"): _p("cliper-voc21", _VOC_BG, "cliper", 100.0, 0.7, 0.6, True, 0.1, slide=336),
    ("ViT-B-16", "voc20"): _p("cliper-voc20", _VOC_BG, "cliper", 100.0, 0.0, 0.001, False, 0.1),
    ("ViT-B-16", "context60"): _p("cliper-context60", _BG, "cliper", 100.0, 0.45, 0.45, False, 0.2, slide=224),
    ("ViT-B-16", "context59"): _p("cliper-context59", _BG, "cliper", 100.0, 0.3, 0.3, False, 0.2, slide=224),
    ("ViT-B-16", "coco_object"): _p("cliper-coco_object", _COCO_BG, "openai", 50.0, 0.3, 0.3, False, 0.2, slide=224),
    ("ViT-B-16", "coco_stuff171"): _p("cliper-coco_stuff171", _BG, "cliper", 50.0, 0.1, 0.1, False, 0.2),
    ("ViT-B-16", "ade20k"): _p("cliper-ade20k", _BG, "cliper", 100.0, 0.3, 0.3, False, 0.2),
    ("ViT-B-16", "cityscapes"): _p("cliper-cityscapes", _BG, "openai", 100.0, 0.0, 0.0001, False, 0.35, size=560),
    ("ViT-L-14", "voc21"): _p("cliper-voc21", _VOC_BG, "cliper", 50.0, 0.5, 0.4, True, 0.1, select=-2),
    ("ViT-L-14", "voc20"): _p("cliper-voc20", _VOC_BG, "cliper", 70.0, 0.1, 0.0001, False, 0.2),
    ("ViT-L-14", "context60"): _p("cliper-context60", _BG, "openai", 50.0, 0.3, 0.3, False, 0.2, select=-2),
    ("ViT-L-14", "context59"): _p("cliper-context59", _BG, "cliper", 100.0, 0.45, 0.45, False, 0.2, select=-2),
    ("ViT-L-14", "coco_object"): _p("cliper-coco_object", _COCO_BG, "openai", 50.0, 0.5, 0.5, False, 0.1, select=-2),
    ("ViT-L-14", "coco_stuff171"): _p("cliper-coco_stuff171", _BG, "openai", 50.0, 0.2, 0.2, False, 0.2, select=-2),
    ("ViT-L-14", "ade20k"): _p("cliper-ade20k", _BG, "openai", 50.0, 0.2, 0.2, False, 0.2),
    ("ViT-L-14", "cityscapes"): _p("cliper-cityscapes", _BG, "cliper", 100.0, 0.0, 0.0001, False, 0.35, size=448),
}
PROTOCOLS = (PROTOCOL_MMSEG,) + tuple(f"cliper-{d}" for d in CLIPER_DATASETS)


def cliper_templates() -> tuple:
    path = resources.files("cdam_fast") / "data" / "cliper_templates.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(ln.strip() for ln in lines if ln.strip() and not ln.startswith("#"))


def resolve_protocol(protocol: str, model_name: str):
    """None for "mmseg", else the CliperProtocol of this backbone (a CliperProtocol is taken as is)."""
    if isinstance(protocol, CliperProtocol):
        return protocol
    if protocol == PROTOCOL_MMSEG:
        return None
    if protocol not in PROTOCOLS:
        raise CdamInputError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    key = (model_name.replace("/", "-"), protocol[len("cliper-"):])
    if key not in CLIPER_PRESETS:
        models = sorted({m for m, d in CLIPER_PRESETS if d == key[1]})
        raise CdamInputError(f"protocol {protocol!r}: CLIPer published settings for {', '.join(models)} only, "
                             f"not {model_name!r}")
    return CLIPER_PRESETS[key]


def default_threshold(num_classes: int) -> float:
    return VOC_LIKE_THRESHOLD if num_classes <= VOC_LIKE_MAX_CLASSES else OTHER_THRESHOLD


def _lower(names) -> tuple:
    return tuple(n.strip().lower() for n in names)


def prompt_classes(protocol: CliperProtocol, classes):
    """The classes whose names a CLIPer preset prompts: CLIPer's own list when `classes` are its
    dataset's classes (CLIPer's list itself, or the package's list of that dataset, 'background'
    first where the package's list has none); any other list as given. A background-free
    dataset's list without CLIPer's class 0 is refused (CLIPer labels "no class" as 0)."""
    if protocol.class_file is None:
        return classes
    cliper = read_class_file(protocol.class_file)
    ours = _lower(read_class_file(protocol.dataset).names)
    given = _lower(classes.names)
    if given in (_lower(cliper.names), ours if ours[0] == "background" else ("background",) + ours):
        return cliper
    if given == ours:
        raise CdamInputError(f"protocol {protocol.name!r} labels like CLIPer's code: class 0 is 'no class' "
                             f"(background) and the {len(ours)} classes follow; pass "
                             f"read_class_file({protocol.class_file!r}) (or 'background' + these classes)")
    return classes


# -- the computation -------------------------------------------------------------------------------
def symmetrise_(M: torch.Tensor, block: int = _SYM_BLOCK) -> torch.Tensor:
    """M <- (M + M^T) / 2 over the last two axes, in place, tile pair by tile pair (scratch: one
    [..., block, block] tile instead of a second [..., T, T] tensor)."""
    T = M.shape[-1]
    for a in range(0, T, block):
        for b in range(a, T, block):
            X, Y = M[..., a:a + block, b:b + block], M[..., b:b + block, a:a + block]
            S = (X + Y.transpose(-1, -2)) * 0.5
            X.copy_(S)
            Y.copy_(S.transpose(-1, -2))
    return M


def normalise_fused_(M: torch.Tensor) -> torch.Tensor:
    """The accumulated attention probabilities [..., T, T] (fp32) -> the fused map, in place."""
    M.div_(M.sum(-2, keepdim=True))  # column sums: positive, every softmax entry is
    M.div_(M.sum(-1, keepdim=True))
    symmetrise_(M)
    M.sub_(M.mean(-2, keepdim=True))
    M.clamp_(min=0)
    return M.div_(M.sum(-1, keepdim=True).clamp_min(torch.finfo(M.dtype).tiny))


def _in_proj(backbone, index: int, part: slice):
    attn = backbone.blocks[index].attn
    w = attn.in_proj_weight[part]
    return w, None if attn.in_proj_bias is None else attn.in_proj_bias[part]


def early_fusion(backbone, x: torch.Tensor, row_budget: int = _ROW_BUDGET, normalise: bool = True):
    """x: tokens entering block 0 [B, T, width] -> (inputs [L, B, T, width]: ln_1_i(x_i) for
    i < L-1 and x_{L-1}; fused map [B, heads, T, T] float32; normalise=False: the raw sum)."""
    L, H = backbone.depth, backbone.heads
    B, T, W = x.shape
    scale = 1.0 / math.sqrt(W // H)
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for a float64 model
    fused = torch.zeros(B, H, T, T, dtype=acc, device=x.device)
    rows = max(1, row_budget // (4 * B * H * T))
    inputs = []
    for i in range(L - 1):
        y = backbone.ln_1(x, i)
        inputs.append(y)
        w, b = _in_proj(backbone, i, slice(None))
        q, k, v = (split_heads(t, H) for t in F.linear(y, w, b).chunk(3, dim=-1))
        out = torch.empty_like(v)
        kt = k.transpose(-1, -2)
        for a in range(0, T, rows):
            p = torch.softmax((q[:, :, a:a + rows] * scale @ kt).to(acc), dim=-1)
            fused[:, :, a:a + rows] += p
            out[:, :, a:a + rows] = p.to(v.dtype) @ v
        x = x + backbone.attention_residual(merge_heads(out), i)
        x = x + backbone.mlp_residual(x, i)
    inputs.append(x)
    dtype = inputs[0].dtype
    return torch.stack([t.to(dtype) for t in inputs]), normalise_fused_(fused) if normalise else fused


def official_fused_maps(M: torch.Tensor, count: int):
    """CLIPer's public code normalises the accumulated map in place inside its loop over the L
    inputs, so the column / row division is applied again for every input. Yields the fused map
    input k sees (k + 1 divisions; M is modified in place; one extra [B, H, T, T] buffer)."""
    for _ in range(count):
        M.div_(M.sum(-2, keepdim=True))
        M.div_(M.sum(-1, keepdim=True))
        F_k = symmetrise_(M.clone())
        F_k.sub_(F_k.mean(-2, keepdim=True))
        F_k.clamp_(min=0)
        yield F_k.div_(F_k.sum(-1, keepdim=True).clamp_min(torch.finfo(F_k.dtype).tiny))


def last_values(backbone, inputs: torch.Tensor) -> torch.Tensor:
    """The last block's values W_v ln_1(z) [..., T, width] of every input z."""
    W = backbone.width
    w, b = _in_proj(backbone, -1, slice(2 * W, 3 * W))
    return F.linear(backbone.ln_1(inputs, -1), w, b)


def fused_heads_out(fused: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head fused map times the values of all L inputs, patch queries only.
    fused [B, H, T, T], v [L, B, T, width] -> [L, B, N, width]. The L inputs share the map, so
    their values are laid side by side ([B, H, T, L * d]) and the map is read once."""
    L, B, T, W = v.shape
    d = W // heads
    vh = v.reshape(L, B, T, heads, d).permute(1, 3, 2, 0, 4).reshape(B, heads, T, L * d)
    out = fused[:, :, 1:].to(vh.dtype) @ vh  # [B, H, N, L * d]
    return out.reshape(B, heads, T - 1, L, d).permute(3, 0, 2, 1, 4).reshape(L, B, T - 1, W)


def project(backbone, x: torch.Tensor) -> torch.Tensor:
    """ln_post + proj, L2-normalised, in at least fp32 (float64 models stay float64)."""
    y = backbone.project(x) if x.dtype != torch.float64 else None
    if y is None:  # ClipBackbone.project rounds to fp32
        v = backbone.visual
        y = F.layer_norm(x, v.ln_post.normalized_shape, v.ln_post.weight, v.ln_post.bias, v.ln_post.eps)
        y = F.normalize(y @ v.proj if v.proj is not None else y, dim=-1)
    return y


def class_probabilities(feats: torch.Tensor, text: torch.Tensor, logit_scale: float, outputs: int) -> torch.Tensor:
    """feats [..., E] (normalised), text [K, E] (normalised) -> softmax over all K prompts of
    logit_scale * cos, first `outputs` columns kept."""
    return torch.softmax(logit_scale * (feats @ text.T), dim=-1)[..., :outputs]


def combine(probs: torch.Tensor, fused_mean: torch.Tensor, set_index: int, threshold: float,
            fuse_sets: bool = True) -> torch.Tensor:
    """probs [L, B, N, C]; fused_mean [B, N, N] (head mean, patch block) -> [B, N, C]:
    thresholded set `set_index` propagated through fused_mean, plus (fuse_sets) the mean over the sets."""
    s = probs[set_index]
    s = torch.where(s < threshold * s.amax(dim=1, keepdim=True), torch.zeros_like(s), s)
    out = fused_mean.transpose(1, 2) @ s  # (s^T A)^T: map @ A in CLIPer's [C, N] layout
    return out + probs.mean(0) if fuse_sets else out


def ablation_heads_out(backbone, inputs: torch.Tensor, attention: str):
    """The last block on every kept input with one of CLIPer's ablation attentions instead of
    the fused map (its code's attn_type): softmax(a a^T / sqrt d) with a = q, k or v of that
    input ("q-q", "k-k", "v-v"), the block's own softmax(q k^T / sqrt d) ("vanilla"), or the
    identity. inputs [L, B, T, width] -> (heads_out [L, B, N, width], the last input's
    attention [B, heads, T, T], which the propagation uses as CLIPer's code does)."""
    L, B, T, W = inputs.shape
    H = backbone.heads
    scale = 1.0 / math.sqrt(W // H)
    w, b = _in_proj(backbone, -1, slice(None))
    outs = []
    for z in inputs:  # one input at a time: one [B, heads, T, T] map at once
        q, k, v = (split_heads(t, H) for t in F.linear(backbone.ln_1(z, -1), w, b).chunk(3, dim=-1))
        if attention == "identity":
            att = torch.eye(T, dtype=v.dtype, device=v.device).expand(B, H, T, T)
        else:
            a, c = {"vanilla": (q, k), "q-q": (q, q), "k-k": (k, k), "v-v": (v, v)}[attention]
            att = torch.softmax((a * scale) @ c.transpose(-1, -2), dim=-1)
        outs.append(merge_heads(att[:, :, 1:] @ v))
    return torch.stack(outs), att


def cliper_features(backbone, crops: torch.Tensor, *, cdam=None, normalisation: str = "once", embed=None,
                    attention: str = "fused"):
    """Normalised crops [B, 3, h, w] -> (features [L, B, N, E] (normalised, fp32 or wider),
    fused [B, heads, T, T] (the map the propagation uses), grid). cdam: None, or
    (distribution_text [C', E], combine, kwargs of multiscale_cdam_attention). normalisation:
    "once" (the method as described) or "official" (CLIPer's code: repeated per input, see
    official_fused_maps). embed: crops -> (tokens, grid); default backbone.embed. attention:
    "fused" (CLIPer) or one of its code's ablations (see ablation_heads_out)."""
    bb = backbone
    x, grid = (embed or bb.embed)(crops)
    inputs, fused = early_fusion(bb, x, normalise=normalisation == "once")
    v = last_values(bb, inputs)  # [L, B, T, width]
    if attention != "fused":
        heads_out, fused = ablation_heads_out(bb, inputs, attention)
    elif normalisation == "once":
        heads_out = fused_heads_out(fused, v, bb.heads)
    else:  # each input its own map; the last one serves the propagation
        outs = []
        for k, fused_k in enumerate(official_fused_maps(fused, len(v))):
            outs.append(fused_heads_out(fused_k, v[k:k + 1], bb.heads))
        heads_out, fused = torch.cat(outs), fused_k
    feats = project(bb, bb.attention_residual(heads_out))  # [L, B, N, E]
    if cdam is not None:
        dist_text, how, op_kwargs = cdam
        L, B = feats.shape[:2]
        sim = (feats.mean(0) @ dist_text.T).transpose(1, 2).reshape(B, -1, grid.h, grid.w)
        v_cat = v[:, :, 1:].permute(1, 2, 0, 3).reshape(B, grid.n, L * bb.width)
        with torch.autocast(x.device.type, enabled=False):  # the divergence stays fp32
            sim = sim.to(torch.promote_types(sim.dtype, torch.float32))
            out = multiscale_cdam_attention(sim.contiguous(), v_cat.contiguous(), **op_kwargs)
        out = out.reshape(B, grid.n, L, bb.width).permute(2, 0, 1, 3).to(heads_out.dtype)
        heads_out = out if how == "replace" else 0.5 * (heads_out + out)
        feats = project(bb, bb.attention_residual(heads_out))
    return feats, fused, grid


def cliper_maps(backbone, crops: torch.Tensor, text: torch.Tensor, outputs: int, *, logit_scale: float,
                set_index: int, threshold: float, cdam=None, normalisation: str = "once", embed=None,
                combination: str = "package", attention: str = "fused", fuse_sets: bool = True) -> tuple:
    """Normalised crops [B, 3, h, w] -> (maps [B, outputs, h_tok, w_tok] float32, grid): the
    whole CLIPer pass of each crop (see cliper_features for cdam / normalisation / embed).
    combination: "package" (the mean over the unthresholded sets) or "official" (CLIPer's
    code: the thresholded set enters the mean, see cliper_official.combine_official). fuse_sets:
    False drops the mean over the sets (its code's fuse_feature=False)."""
    feats, fused, grid = cliper_features(backbone, crops, cdam=cdam, normalisation=normalisation, embed=embed,
                                         attention=attention)
    with torch.autocast(crops.device.type, enabled=False):  # small: probabilities and combination in fp32
        acc = torch.promote_types(feats.dtype, torch.float32)
        probs = class_probabilities(feats.to(acc), text.to(acc), logit_scale, outputs)
        A = fused.mean(1)[:, 1:, 1:].to(acc)
        if combination == "official":  # per crop, in CLIPer's [C, N] layout
            maps = torch.stack([combine_official(probs[:, b].transpose(1, 2).clone(), A[b], set_index, threshold,
                                                 fuse_sets).T for b in range(probs.shape[1])])
        else:
            maps = combine(probs, A, set_index, threshold, fuse_sets)  # [B, N, C]
    return maps.transpose(1, 2).reshape(maps.shape[0], outputs, grid.h, grid.w), grid


# -- the segmenter ---------------------------------------------------------------------------------
@dataclass
class CliperResult(ImageResult):
    class_scores: torch.Tensor | None = None  # [C] image-level scores (CLIPer protocol)


class CliperSegmenter(Segmenter):
    """`Segmenter(..., method="cliper")` builds one of these (see the module docstring).

    Extra keyword options: protocol ("mmseg" or a `PROTOCOLS` preset "cliper-voc21", ...),
    pipeline (under a CLIPer protocol: "official", the default, every step around the network
    as CLIPer's public code does it (cliper_official.py), or "package", the package's own
    steps), sliding_crop (official pipeline: the sliding-window crop, default the preset's,
    0 off), cdam_combine ("replace" or "average"), threshold (the set threshold before
    propagation; default 0.1 for up to 21 classes, else 0.2, or the preset's), set_index
    (default the preset's, else from the backbone preset), compensation (None or "sd"),
    sd_weights (local diffusers folder), sd_seed, sd_options (more SdCompensation arguments),
    normalisation ("once", the method as described, or "official", CLIPer's code's repeated
    in-place normalisation; default "official" with the official pipeline, else "once"),
    attention ("fused", CLIPer, or an ablation of its code: "vanilla", "q-q", "k-k", "v-v",
    "identity"), fuse_sets (False: only the propagated set, without the mean over the sets).
    CDAM is off by default for CLIPer (cdam=True refines it).
    """

    def __init__(self, classes, model=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED, method: str = "cliper",
                 cdam: bool = False,
                 mode: str | None = None, backend: str = "auto", device=None, dtype=None, background="auto", *,
                 protocol: str = PROTOCOL_MMSEG, pipeline: str | None = None, sliding_crop: int | None = None,
                 attention: str = "fused", fuse_sets: bool = True, cdam_combine: str = "replace", threshold: float | None = None,
                 set_index: int | None = None, compensation: str | None = None, sd_weights=None, sd_seed: int = 0,
                 sd_options: dict | None = None, normalisation: str | None = None,
                 templates=None, short_side: int | None = None, logit_scale: float | None = None,
                 synonyms: str = "mean", **options):
        if not isinstance(method, str) or method.lower() != "cliper":
            raise CdamInputError(f"CliperSegmenter runs method 'cliper', got {method!r}")
        if cdam_combine not in CDAM_COMBINES:
            raise CdamInputError(f"cdam_combine must be one of {CDAM_COMBINES}, got {cdam_combine!r}")
        if compensation not in COMPENSATIONS:
            raise CdamInputError(f"compensation must be None or 'sd', got {compensation!r}")
        if compensation is None and sd_weights is not None:
            raise CdamInputError("sd_weights is given but compensation is not 'sd'")
        if normalisation is not None and normalisation not in NORMALISATIONS:
            raise CdamInputError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        if attention not in ATTENTIONS:
            raise CdamInputError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if not isinstance(fuse_sets, bool):
            raise CdamInputError(f"fuse_sets must be True or False, got {fuse_sets!r}")
        self.attention, self.fuse_sets = attention, fuse_sets
        if pipeline is not None and pipeline not in PIPELINES:
            raise CdamInputError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
        if sliding_crop is not None and (isinstance(sliding_crop, bool) or not isinstance(sliding_crop, int)
                                         or sliding_crop < 0):
            raise CdamInputError(f"sliding_crop must be an integer >= 0 (0: off), got {sliding_crop!r}")
        if compensation == "sd":  # fail before the (slow) model load
            from .compensation import check_sd_weights, import_extra

            check_sd_weights(sd_weights)
            import_extra("diffusers")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 <= threshold <= 1.0):
            raise CdamInputError(f"threshold must be a fraction in [0, 1], got {threshold!r}")
        name = model if isinstance(model, str) else getattr(model, "name", repr(model))
        if not isinstance(protocol, (str, CliperProtocol)):
            raise CdamInputError(f"protocol must be 'mmseg', a CLIPer preset name or a CliperProtocol, "
                                 f"got {protocol!r}")
        self.protocol = resolve_protocol(protocol, name)
        preset = self.protocol
        if preset is None and pipeline == "official":
            raise CdamInputError("pipeline='official' is CLIPer's evaluation code and needs a CLIPer protocol "
                                 f"({', '.join(PROTOCOLS[1:])}); protocol 'mmseg' runs the package's pipeline")
        self.pipeline = pipeline or ("official" if preset is not None else "package")
        official = self.pipeline == "official"
        self.normalisation = normalisation or ("official" if official else "once")
        self.sliding_crop = (preset.sliding_crop if official else 0) if sliding_crop is None else sliding_crop
        if self.sliding_crop and not official:
            raise CdamInputError("sliding_crop is CLIPer's sliding-window variant of its official pipeline; "
                                 "use pipeline='official' with a CLIPer protocol (or mode='window' for the "
                                 "package's windows)")
        user_classes = parse_classes(classes)
        prompted = user_classes
        if preset is not None:
            if background not in ("auto", None):
                raise CdamInputError(f"background: protocol {preset.name!r} labels background with its own class-score "
                                     f"and pixel thresholds; leave background at 'auto', got {background!r}")
            background = None
            mode = "global" if mode is None else mode
            templates = cliper_templates() if templates is None and preset.templates == "cliper" else templates
            logit_scale = preset.logit_scale if logit_scale is None else logit_scale
            if official:
                prompted = prompt_classes(preset, user_classes)
        self._templates = resolve_templates(templates)
        if synonyms != "mean" and any(len(s) > 1 for s in user_classes.synonyms):
            raise CdamInputError("method 'cliper' takes one text embedding per class: synonyms must be 'mean' "
                                 f"when classes have synonyms, got {synonyms!r}")
        super().__init__(prompted, model, pretrained, "maskclip",
                         cdam, "window" if mode is None else mode, backend, device, dtype, background,
                         templates=self._templates, short_side=SHORT_SIDE if short_side is None else short_side,
                         logit_scale=bg.LOGIT_SCALE if logit_scale is None else logit_scale, synonyms=synonyms,
                         **options)
        self.classes, self.prompted_classes = user_classes, prompted  # outputs keep the given names
        bb_preset = backbone_preset(self.backbone)
        if short_side is None:
            self.short_side = (preset.short_side if preset is not None else bb_preset.short_side)
        if self.sliding_crop and self.sliding_crop % self.backbone.patch_size[0]:
            raise CdamInputError(f"sliding_crop ({self.sliding_crop}) must be a multiple of the model's "
                                 f"{self.backbone.patch_size[0]}-pixel patches")
        self.method_name = "cliper"
        self.cdam_combine = cdam_combine
        if preset is not None and len(self.classes) < 2:
            raise CdamInputError(f"protocol {preset.name!r} needs class 0 (background) and at least one class")
        if threshold is None:
            threshold = preset.propagation_threshold if preset is not None else default_threshold(len(self.classes))
        self.threshold = float(threshold)
        self._background_text = None if preset is None else \
            self._text_embedder.prompts(list(preset.background_words)).to(self.device)
        self._build_cls_text()
        if set_index is None:
            set_index = preset.select_layer if preset is not None else bb_preset.cliper_set
        self.set_index = set_index
        if isinstance(self.set_index, bool) or not isinstance(self.set_index, int) \
                or not -self.backbone.depth <= self.set_index < self.backbone.depth:
            raise CdamInputError(f"set_index must be an integer in [-{self.backbone.depth}, {self.backbone.depth}), "
                                 f"got {set_index!r}")
        self._pos_tables: dict = {}  # official pipeline: fp16 positional tables per grid
        self.compensation = None
        if compensation == "sd":
            from .compensation import SdCompensation

            self.compensation = SdCompensation(sd_weights, self.device, threshold=self.threshold, seed=sd_seed,
                                               **(sd_options or {}))

    def __repr__(self):
        cdam = f" + CDAM ({self.cdam_combine})" if self.cdam else ""
        where = (f"pipeline=official, sliding_crop={self.sliding_crop}" if self.pipeline == "official"
                 else f"mode={self.mode}")
        if self.attention != "fused" or not self.fuse_sets:
            where += f", attention={self.attention}, fuse_sets={self.fuse_sets}"
        return (f"Segmenter({len(self.classes)} classes, cliper{cdam}"
                f"{' + SD compensation' if self.compensation is not None else ''}, {self.backbone.name} "
                f"({self.backbone.source}), protocol={self.protocol.name if self.protocol else PROTOCOL_MMSEG}, "
                f"{where}, backend={self.backend}, device={self.device}, dtype={self.dtype})")

    def _build_cls_text(self) -> None:
        """The classification prompts of the per-set softmax, and how many are outputs."""
        if self.protocol is None:
            self.cls_text, self.outputs = self.text, len(self.classes)
        else:  # CLIPer: foreground classes, its background words, the mean foreground prompt
            fg = self.text[1:]
            self.cls_text = torch.cat([fg, self._background_text, F.normalize(fg.mean(0, keepdim=True), dim=-1)])
            self.outputs = len(self.classes) - 1

    def use_class_embeddings(self, embeddings):
        super().use_class_embeddings(embeddings)
        self._build_cls_text()

    def _cdam_args(self):
        if not self.cdam:
            return None
        return (self.distribution_text, self.cdam_combine,
                dict(scales=self.scales, tau=self.tau, alpha=self.alpha, mode=self.cdam_mode,
                     memory_budget=self.memory_budget, backend=self.backend))

    def _embed(self):
        """The token embedding of this pipeline (the official one rounds its positional table to fp16)."""
        if self.pipeline == "official":
            return lambda crops: official_embed(self.backbone, crops, self._pos_tables)
        return None

    @torch.inference_mode()
    def encode_windows(self, crops: torch.Tensor) -> torch.Tensor:
        """Normalised crops -> CLIPer maps [B, C, h_tok, w_tok] (float32, non-negative; under
        the CLIPer protocol channel 0, the background, is zero), each crop on its own."""
        with self._autocast():
            maps, _ = cliper_maps(self.backbone, crops, self.cls_text, self.outputs,
                                  logit_scale=self.logit_scale, set_index=self.set_index, threshold=self.threshold,
                                  cdam=self._cdam_args(), normalisation=self.normalisation, embed=self._embed(),
                                  combination=self.pipeline, attention=self.attention, fuse_sets=self.fuse_sets)
        return self._pad(maps.float())

    def _pad(self, maps: torch.Tensor) -> torch.Tensor:
        return F.pad(maps, (0, 0, 0, 0, 1, 0)) if self.protocol is not None else maps

    # -- the official pipeline ---------------------------------------------------------------------
    def preprocess(self, image, what: str = "image"):
        if self.pipeline != "official":
            return super().preprocess(image, what)
        pixels = to_pixels(image, what)
        H, W = pixels.shape[-2:]
        patch = self.backbone.patch_size[0]
        size = official_size(H, W, self.short_side, patch)
        check_official_size(size, patch, what, self.short_side)
        pixels = pil_resize(pixels, size).to(self.device)
        tokens = (size[0] // patch, size[1] // patch)
        return _Prepared((pixels - self._mean) / self._std, (H, W), whole_layout(size), tokens)

    def _set_logits(self, crops: torch.Tensor):
        """crops [B, 3, h, w] -> (logits [L, B, N, K] of every prompt, head-mean patch fused maps [B, N, N])."""
        with self._autocast():
            feats, fused, _ = cliper_features(self.backbone, crops, cdam=self._cdam_args(),
                                              normalisation=self.normalisation, embed=self._embed(),
                                              attention=self.attention)
        with torch.autocast(crops.device.type, enabled=False):
            acc = torch.promote_types(feats.dtype, torch.float32)
            logits = self.logit_scale * (feats.to(acc) @ self.cls_text.to(acc).T)
            return logits, fused.mean(1)[:, 1:, 1:].to(acc)

    @torch.inference_mode()
    def official_maps(self, item) -> torch.Tensor:
        """One preprocessed image -> its CLIPer map [C, h_tok, w_tok] as CLIPer's code computes it:
        the whole image, averaged with the sliding windows' merged maps when sliding_crop > 0,
        then the in-place-thresholded combination."""
        h, w = item.tokens
        C = self.outputs
        logits, A = self._set_logits(item.pixels[None])
        seg = torch.softmax(logits[:, 0], dim=-1)[..., :C].transpose(1, 2)  # [L, C, N]
        if self.sliding_crop:
            patch = self.backbone.patch_size[0]
            H, W = item.layout.size
            ch, cw = min(self.sliding_crop, H), min(self.sliding_crop, W)
            boxes = slide_boxes((H, W), self.sliding_crop, SLIDE_STRIDE)
            win_logits, win_attn = [], []
            for j in range(0, len(boxes), self.window_batch):
                crops = torch.stack([item.pixels[:, y:y + ch, x:x + cw] for y, x in boxes[j:j + self.window_batch]])
                lg, at = self._set_logits(crops)
                win_logits.append(lg.transpose(0, 1))  # [b, L, Nc, K]
                win_attn.append(at)
            n = len(boxes)
            lg = torch.cat(win_logits).transpose(-1, -2).reshape(n, -1, logits.shape[-1], ch // patch, cw // patch)
            merged = merge_windows(lg, torch.cat(win_attn), [(y // patch, x // patch) for y, x in boxes], (h, w))
            slide = torch.softmax(merged, dim=1)[:, :C].reshape(-1, C, h * w)
            seg = slide * 0.5 + seg * 0.5
        return combine_official(seg, A[0], self.set_index, self.threshold, self.fuse_sets).reshape(C, h, w)

    # -- per image -------------------------------------------------------------------------------
    def _threshold(self, window_logits):
        return None  # decided in _finish, after the optional compensation

    def _pseudo_logits(self, maps: torch.Tensor, dim: int) -> torch.Tensor:
        """Logits whose softmax(logit_scale * .) over `dim` is the map normalised over classes."""
        return torch.log(maps.clamp_min(1e-30)) / self.logit_scale

    def _run_group(self, items: list) -> list:
        if self.pipeline == "official":  # one image at a time, upsampled once to the original size
            results = [ImageResult(self._pad(self.official_maps(it)[None]), None,
                                   direct_assembler(it.tokens, it.original, self.device), it.original)
                       for it in items]
        else:
            results = super()._run_group(items)
        return [self._finish(it, res) for it, res in zip(items, results)]

    def _to_size(self, item, size: tuple):
        """The map's resampling from tokens to `size` (the compensation's grid)."""
        if self.pipeline == "official":
            return direct_assembler(item.tokens, size, self.device)
        return _assembler(item.layout, item.tokens, size, self.device)

    def _finish(self, item, res: ImageResult) -> CliperResult:
        wl, asm = res.window_logits, res.assembler
        scores = wl.amax(dim=(0, 2, 3))
        if self.compensation is not None:
            P = self.compensation.grid
            to_grid = self._to_size(item, (P, P))
            image = (item.pixels * self._std + self._mean).clamp(0, 1)
            refined = self.compensation(image, to_grid(wl))  # [C, P, P]
            scores = 0.5 * refined.amax(dim=(1, 2)) + 0.5 * scores
            wl, asm = refined[None], _assembler(whole_layout((P, P)), (P, P), res.original, self.device)
        threshold = None
        if self.protocol is None:
            threshold = Segmenter._threshold(self, self._pseudo_logits(wl, 1))
        return CliperResult(wl, threshold, asm, res.original, class_scores=scores)

    def label_map(self, result: CliperResult) -> np.ndarray:
        half = result.assembler.half_apply(result.window_logits)
        H, W = result.original
        rows = max(1, (1 << 24) // max(1, half.shape[0] * W))
        chunks = [(a, min(H, a + rows)) for a in range(0, H, rows)]
        if self.protocol is None:
            out = torch.cat([bg.label(self._pseudo_logits(result.assembler.rows_apply(half, a, b), 0),
                                      result.threshold, self.logit_scale) for a, b in chunks])
        else:
            mx = torch.stack([result.assembler.rows_apply(half, a, b).amax(dim=(1, 2)) for a, b in chunks]).amax(0)
            mn = torch.stack([result.assembler.rows_apply(half, a, b).amin(dim=(1, 2)) for a, b in chunks]).amin(0)
            out = torch.cat([self._cliper_label(result.assembler.rows_apply(half, a, b), mx, mn, result.class_scores)
                             for a, b in chunks])
        return out.cpu().numpy().astype(label_dtype(len(self.classes)))

    def _cliper_label(self, maps, mx, mn, scores) -> torch.Tensor:
        """CLIPer's labelling of rows of the full-size maps [C, r, W] (channel 0 unused):
        cam = map / (max + eps) * score, classes with score <= class_threshold dropped, optional
        per-class min-max, pixels below pixel_threshold -> background."""
        p = self.protocol
        k = (scores / (mx + _EPS_NORM))[1:, None, None]
        cam = maps[1:] * k
        if p.normalize:
            lo, hi = (mn[1:, None, None] * k), (mx[1:, None, None] * k)
            cam = (cam - lo) / (hi - lo + 1e-6)
        valid = (scores[1:] > p.class_threshold).to(cam.dtype)[:, None, None]
        if p.pixel_threshold > 0:
            cam = torch.where(cam < p.pixel_threshold, torch.zeros_like(cam), cam) * valid
            value, idx = cam.max(0)
            return torch.where(value == 0, torch.zeros_like(idx), idx + 1)
        cam = cam * valid
        return torch.cat([(1 - cam.amax(0, keepdim=True)).square(), cam]).argmax(0)


__all__ = ["CLIPER_PRESETS", "CliperProtocol", "CliperSegmenter", "PROTOCOLS", "cliper_maps", "combine",
           "early_fusion", "fused_heads_out", "normalise_fused_"]
