"""TEST ORACLE, not a runtime path: a deliberately plain re-implementation of the pipeline,
used by the tests and the "published order" benchmark baseline to check the fast one.

One window at a time, in the published order of operations: the window's logits are
upsampled to the window, summed into a full-size canvas with a count of windows per pixel,
divided, and resized to the original image; the background threshold is computed per window.
The last block is written out per head with explicit attention matrices, the CDAM map comes
from `cdam_fast.reference.multiscale_cdam_map` and is applied as an explicit
[N+1, N+1] @ [N+1, width] product with a zero CLS row and column. Resizing (OpenCV or torch)
and the positional-embedding interpolation are written out here too. It shares with
`Segmenter` only the loaded model, the text embeddings, the method registry entry (name,
residual, MLP, depth), the image decoding and PAMR (tested on its own); it is slow by design.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import reference as ops_reference
from .images import to_pixels
from .pamr import pamr


def _heads(t, H):  # [T, W] -> [H, T, d]
    return t.reshape(t.shape[0], H, -1).permute(1, 0, 2)


def _unheads(t):  # [H, T, d] -> [T, W]
    return t.permute(1, 0, 2).reshape(t.shape[1], -1)


def _softmax_rows(scores):
    return torch.softmax(scores, dim=-1)


def _method_attention(name, q, k, v, x_ln, grid_hw, H):
    """The method's attention output [T, W] from q, k, v [T, W] (explicit matrices)."""
    qh, kh, vh = _heads(q, H), _heads(k, H), _heads(v, H)
    d = qh.shape[-1]
    if name == "maskclip":
        return v
    if name == "sclip":
        a = _softmax_rows(qh @ qh.transpose(1, 2) / math.sqrt(d)) + _softmax_rows(kh @ kh.transpose(1, 2) / math.sqrt(d))
        return _unheads(a @ vh)
    if name == "clearclip":
        return _unheads(_softmax_rows(qh @ qh.transpose(1, 2) / math.sqrt(d)) @ vh)
    if name == "naclip":
        h, w = grid_hw
        rows = torch.arange(h * w, device=q.device) // w
        cols = torch.arange(h * w, device=q.device) % w
        dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
        prior = torch.zeros(h * w + 1, h * w + 1, device=q.device)
        prior[1:, 1:] = torch.exp(-dist2.float() / (2 * 5.0 ** 2))
        return _unheads(_softmax_rows(kh @ kh.transpose(1, 2) / math.sqrt(d) + prior.to(q)) @ vh)
    if name == "gem":
        temp = x_ln.norm(dim=-1).mean() / math.sqrt(d)  # inverse temperature, one per image
        total = 0
        for t in (qh, kh, vh):
            t = F.normalize(t, dim=-1)
            t = _softmax_rows(temp * t @ t.transpose(1, 2)) @ t
            t = F.normalize(t, dim=-1)
            total = total + _softmax_rows(temp * t @ t.transpose(1, 2)) @ vh
        return _unheads(total / 3)
    raise ValueError(f"the reference pipeline has no formula for method {name!r}")


def _block_parts(blk, x):
    y = blk.ln_1(x)
    q, k, v = (y @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, dim=-1)
    return y, q, k, v


def _attn_to_stream(blk, o):
    return blk.ls_1(o @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias)


def _tokens(visual, crop, pos_interp):
    """[3, h, w] normalised crop -> (tokens [1 + N, W] after ln_pre, (h_tok, w_tok))."""
    x = visual.conv1(crop[None])[0]  # [W, h, w]
    hw = tuple(x.shape[-2:])
    x = x.flatten(1).T
    pos = visual.positional_embedding
    g = visual.grid_size
    patch_pos = pos[1:].reshape(g[0], g[1], -1).permute(2, 0, 1)[None]
    if hw != tuple(g) and pos_interp == "published":  # the published (DINO-style) call
        patch_pos = F.interpolate(patch_pos, scale_factor=((hw[0] + 0.1) / g[0], (hw[1] + 0.1) / g[1]),
                                  mode="bicubic", align_corners=False, recompute_scale_factor=False)
    elif hw != tuple(g):
        patch_pos = F.interpolate(patch_pos, size=hw, mode="bicubic", align_corners=False)
    patch_pos = patch_pos[0].flatten(1).T
    x = torch.cat([visual.class_embedding[None], x]) + torch.cat([pos[:1], patch_pos])
    return visual.ln_pre(x), hw


def window_token_logits(seg, crop):
    """[C, h_tok, w_tok] logits of one normalised crop [3, h, w], straight from the formulas."""
    bb = seg.backbone
    visual, blocks, H = bb.visual, bb.blocks, bb.heads
    name = seg.method.name
    keep_residual, keep_mlp = seg.method.residual, seg.method.mlp
    x, hw = _tokens(visual, crop, seg.pos_interp)
    L = len(blocks)
    if seg.method.depth > 1:  # GEM: a parallel path over the last blocks, no MLP
        start = L - seg.method.depth
        for blk in blocks[:start]:
            x = blk(x[None])[0]
        stream = x
        for i in range(start, L):
            y, q, k, v = _block_parts(blocks[i], x)
            if i == L - 1:
                x_last, stream_last, v_last = x, stream, v
            stream = stream + _attn_to_stream(blocks[i], _method_attention(name, q, k, v, y, hw, H))
            if i < L - 1:
                x = blocks[i](x[None])[0]
        out = stream
    else:
        for blk in blocks[:-1]:
            x = blk(x[None])[0]
        x_last = stream_last = x
        y, q, k, v_last = _block_parts(blocks[-1], x)
        out = _attn_to_stream(blocks[-1], _method_attention(name, q, k, v_last, y, hw, H))
        if keep_residual:
            out = x + out
        if keep_mlp:
            out = out + blocks[-1].ls_2(blocks[-1].mlp(blocks[-1].ln_2(out)))

    def features(tokens):
        return F.normalize(visual.ln_post(tokens[1:]) @ visual.proj, dim=-1)

    feats = features(out)
    if seg.cdam:
        S = feats @ seg.distribution_text.T  # [N, C']
        sim = S.T.reshape(1, -1, hw[0], hw[1])
        a = ops_reference.multiscale_cdam_map(sim, seg.scales, seg.tau, seg.alpha)[0]
        a_full = torch.zeros(a.shape[0] + 1, a.shape[0] + 1, dtype=a.dtype, device=a.device)
        a_full[1:, 1:] = a  # CLS row and column are zero
        o = a_full @ v_last.to(a.dtype)  # the same map for every head
        out = _attn_to_stream(blocks[-1], o.to(v_last.dtype))
        if keep_residual:
            out = stream_last + out
        if keep_mlp:
            out = out + blocks[-1].ls_2(blocks[-1].mlp(blocks[-1].ln_2(out)))
        feats = features(out)
        del x_last
    return (feats @ seg.text.T).T.reshape(-1, hw[0], hw[1])


class ReferenceResult(NamedTuple):
    logits: torch.Tensor  # [C, H, W] (with synonyms kept apart: each class's best synonym)
    labels: torch.Tensor  # [H, W] int64, with seg.background applied
    threshold: object  # the threshold used (None: plain argmax)
    entropy_threshold: torch.Tensor  # from the tokens of all windows
    last_window_threshold: torch.Tensor  # the published per-window value, last window's


def _per_class(logits, owner, C):
    """[S, ...] -> [C, ...]: max over each class's synonym rows."""
    if owner is None:
        return logits
    return torch.stack([logits[owner == c].max(0).values for c in range(C)])


def _entropy_bits(logits_c_first, scale):
    p = torch.softmax(scale * logits_c_first.reshape(logits_c_first.shape[0], -1).T, dim=-1)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)


@torch.inference_mode()
def reference_segment(seg, image):
    """ReferenceResult (logits [C, H, W], labels [H, W], thresholds) of one image, float32 on
    seg.device."""
    dev = seg.device
    img = to_pixels(image)
    Hn, Wn = img.shape[-2:]
    if seg.mode == "window":
        scale = min(seg.short_side / min(Hn, Wn), seg.long_side / max(Hn, Wn))
        size = (int(Hn * scale + 0.5), int(Wn * scale + 0.5))
    else:
        p = seg.backbone.patch_size
        scale = min(seg.short_side / min(Hn, Wn), seg.long_side / max(Hn, Wn))
        size = tuple(max(pp, round(int(n * scale + 0.5) / pp) * pp) for n, pp in zip((Hn, Wn), p))
    if seg.resize == "opencv":  # mmseg: cv2 INTER_LINEAR on the HWC array (uint8 stays uint8)
        import cv2

        arr = cv2.resize(img.permute(1, 2, 0).numpy().copy(), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        img = torch.from_numpy(arr).permute(2, 0, 1).to(dev)
        img = img.float() / 255 if img.dtype == torch.uint8 else img
    else:
        img = img.to(dev)
        img = img.float() / 255 if img.dtype == torch.uint8 else img
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(seg.backbone.mean, device=dev).reshape(3, 1, 1)
    std = torch.tensor(seg.backbone.std, device=dev).reshape(3, 1, 1)
    img = (img - mean) / std
    Hr, Wr = size
    crop = seg.crop if seg.mode == "window" else max(Hr, Wr)
    stride = seg.stride if seg.mode == "window" else crop
    # mmseg's slide inference
    h_grids = max(Hr - crop + stride - 1, 0) // stride + 1
    w_grids = max(Wr - crop + stride - 1, 0) // stride + 1
    C, owner = len(seg.class_names), seg.owner
    S = C if owner is None else len(owner)
    canvas = torch.zeros(S, Hr, Wr, device=dev)
    count = torch.zeros(1, Hr, Wr, device=dev)
    entropies, thr_window = [], None
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, Hr), min(x1 + crop, Wr)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            tok = window_token_logits(seg, img[:, y1:y2, x1:x2])
            ent = _entropy_bits(_per_class(tok, owner, C), seg.logit_scale)
            entropies.append(ent)
            thr_window = 0.5 * 2.5 / ((ent.min() + ent.max()) / 2)
            canvas[:, y1:y2, x1:x2] += F.interpolate(tok[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                                     align_corners=False)[0]
            count[:, y1:y2, x1:x2] += 1
    logits = F.interpolate((canvas / count)[None], size=(Hn, Wn), mode="bilinear", align_corners=False)[0]
    if seg.pamr_steps:
        image = F.interpolate(img[None], size=(Hn, Wn), mode="bilinear", align_corners=False)[0]
        logits = pamr(image, logits, seg.pamr_steps, seg.pamr_dilations)
    allh = torch.cat(entropies)
    thr_image = 0.5 * 2.5 / ((allh.min() + allh.max()) / 2)
    if seg.background == "entropy":
        threshold = thr_image
    elif seg.background == "entropy-per-window":
        threshold = thr_window
    else:
        threshold = seg.background
    prob = torch.softmax(seg.logit_scale * logits, dim=0)  # over every synonym row
    top, arg = prob.max(0)
    if owner is not None:
        arg = owner[arg]
    labels = arg if threshold is None else torch.where(top < threshold, torch.zeros_like(arg), arg)
    return ReferenceResult(_per_class(logits, owner, C), labels, threshold, thr_image, thr_window)
