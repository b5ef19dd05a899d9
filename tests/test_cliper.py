"""CLIPer against a literal re-implementation of its steps, on a tiny random ViT.

The literal version follows the method's description step by step, out of place and in
float64: the early blocks run through open_clip's own nn.MultiheadAttention with
need_weights=True (the per-head probabilities CLIPer's public code reads), every
normalisation of the fused map is a separate full-tensor expression, the last block runs
once per kept input and once per head, and the combination is written in CLIPer's [C, N]
layout. The implementation under test accumulates in chunks, symmetrises in place tile by
tile, batches the L inputs and the heads, and (with CDAM) calls the fused op once for all
inputs.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdam_fast import CdamInputError, reference
from cdam_fast.pipeline import Segmenter
from cdam_fast.pipeline.cliper import (
    CLIPER_PRESETS, CliperProtocol, cliper_maps, combine, early_fusion, fused_heads_out, last_values,
    normalise_fused_, symmetrise_,
)
from cdam_fast.pipeline.model import ClipBackbone
from cdam_fast.pipeline.windows import whole_layout

CLASSES = "background,cat,sofa,grass"
SMALL = dict(templates="single", progress=False, atp=["red", "striped", "metal"])
TIGHT = dict(rtol=1e-9, atol=1e-10)  # float64 throughout: only summation order differs


def tiny_clip(dtype=torch.float32, seed=0):
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=64, layers=4, width=64, head_width=16,
                                                            patch_size=16),
                              text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
        # random weights give near-uniform attention; sharpen q and k so the maps have structure
        for blk in clip.visual.transformer.resblocks:
            blk.attn.in_proj_weight.data[:128] *= 4
    return ClipBackbone(clip.to(dtype).eval(), open_clip.get_tokenizer("ViT-B-16"), name="tiny", source="random")


@pytest.fixture(scope="module")
def tiny():
    return tiny_clip()


@pytest.fixture(scope="module")
def tiny64():
    return tiny_clip(torch.float64)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


def literal_fusion(bb, x):
    """(kept inputs, fused map [B, H, T, T]) step by step."""
    blocks = bb.visual.transformer.resblocks
    M, kept = 0, []
    for blk in list(blocks)[:-1]:
        y = blk.ln_1(x)
        kept.append(y)
        out, w = blk.attn(y, y, y, need_weights=True, average_attn_weights=False)
        M = M + w
        x = x + blk.ls_1(out)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    kept.append(x)
    literal_fusion.raw = M
    M = M / M.sum(dim=-2, keepdim=True)  # column sums
    M = M / M.sum(dim=-1, keepdim=True)  # row sums
    M = (M + M.transpose(-1, -2)) / 2
    M = M - M.mean(dim=-2, keepdim=True)
    M = torch.clamp(M, min=0)
    M = M / M.sum(dim=-1, keepdim=True)
    return kept, M


def literal_last_block(bb, z, M=None, A=None, how="replace"):
    """The last block on one kept input z [B, T, W]: per head M_h @ v_h (and / or the CDAM
    map A [B, N, N] over patches), out_proj, no residual, no MLP -> normalised patch features."""
    last = bb.visual.transformer.resblocks[-1]
    W, H = bb.width, bb.heads
    d = W // H
    v = F.linear(last.ln_1(z), last.attn.in_proj_weight[2 * W:], last.attn.in_proj_bias[2 * W:])
    heads = []
    for h in range(H):
        vh = v[..., h * d:(h + 1) * d]
        fused = M[:, h, 1:] @ vh if M is not None else None
        cdam = A @ vh[:, 1:] if A is not None else None
        heads.append(fused if A is None else cdam if how == "replace" else 0.5 * (fused + cdam))
    o = last.ls_1(last.attn.out_proj(torch.cat(heads, dim=-1)))
    f = bb.visual.ln_post(o) @ bb.visual.proj
    return f / f.norm(dim=-1, keepdim=True)


def literal_cliper(bb, crops, text, outputs, logit_scale, set_index, thr, cdam=None):
    x, grid = bb.embed(crops)
    kept, M = literal_fusion(bb, x)
    sets = [literal_last_block(bb, z, M) for z in kept]
    if cdam is not None:
        dist_text, how = cdam
        S = torch.stack(sets).mean(0) @ dist_text.T  # [B, N, C']
        A = reference.multiscale_cdam_map(S.transpose(1, 2).reshape(S.shape[0], -1, grid.h, grid.w))
        sets = [literal_last_block(bb, z, M, A, how) for z in kept]
    probs = [torch.softmax(logit_scale * f @ text.T, dim=-1)[..., :outputs] for f in sets]
    maps = []
    for b in range(crops.shape[0]):
        s = probs[set_index][b].T.clone()  # [C, N]
        s[s < s.amax(dim=-1, keepdim=True) * thr] = 0
        s = s @ M[b].mean(0)[1:, 1:]
        maps.append(s + torch.stack([p[b].T for p in probs]).mean(0))
    return torch.stack(maps).reshape(crops.shape[0], outputs, grid.h, grid.w)


def test_normalisation_steps_and_tiled_symmetrise(gen):
    M = torch.rand(2, 3, 11, 11, generator=gen, dtype=torch.float64) ** 4
    expect = M / M.sum(-2, keepdim=True)
    expect = expect / expect.sum(-1, keepdim=True)
    expect = (expect + expect.transpose(-1, -2)) / 2
    expect = (expect - expect.mean(-2, keepdim=True)).clamp(min=0)
    expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(normalise_fused_(M.clone()), expect, **TIGHT)
    S = M.clone()
    torch.testing.assert_close(symmetrise_(S, block=4), (M + M.transpose(-1, -2)) / 2, **TIGHT)


def test_early_fusion_matches_literal_and_the_tower(tiny64, gen):
    crops = torch.randn(2, 3, 48, 64, generator=gen, dtype=torch.float64)
    x, _ = tiny64.embed(crops)
    kept, M = literal_fusion(tiny64, x)
    # a small row budget forces several query-row chunks per block
    inputs, fused = early_fusion(tiny64, x, row_budget=4 * 2 * 4 * 13 * 5)
    torch.testing.assert_close(fused, M, **TIGHT)
    torch.testing.assert_close(inputs, torch.stack(kept), **TIGHT)
    torch.testing.assert_close(inputs[-1], tiny64.run_blocks(x, 0, tiny64.depth - 1), **TIGHT)
    assert float(M.std()) > 1e-3  # a map with structure, not a constant


@pytest.mark.parametrize("cdam", [None, "replace", "average"])
def test_cliper_maps_match_literal(tiny64, gen, cdam):
    crops = torch.randn(2, 3, 64, 48, generator=gen, dtype=torch.float64)
    text = F.normalize(torch.randn(7, tiny64.embed_dim, generator=gen, dtype=torch.float64), dim=-1)
    dist = F.normalize(torch.randn(9, tiny64.embed_dim, generator=gen, dtype=torch.float64), dim=-1)
    args = dict(logit_scale=50.0, set_index=-2, threshold=0.2)
    op = None if cdam is None else (dist, cdam, dict(backend="reference"))
    got, _ = cliper_maps(tiny64, crops, text, 5, cdam=op, **args)
    expect = literal_cliper(tiny64, crops, text, 5, 50.0, -2, 0.2, None if cdam is None else (dist, cdam))
    torch.testing.assert_close(got, expect, **TIGHT)
    assert float((expect.amax(1) - expect.amin(1)).mean()) > 1e-3  # classes differ


def test_official_normalisation_matches_clipers_loop(tiny64, gen):
    """normalisation="official": CLIPer's code divides the accumulated map in place inside its
    loop over the inputs; replayed here literally."""
    crops = torch.randn(1, 3, 48, 64, generator=gen, dtype=torch.float64)
    text = F.normalize(torch.randn(5, tiny64.embed_dim, generator=gen, dtype=torch.float64), dim=-1)
    x, grid = tiny64.embed(crops)
    kept, once = literal_fusion(tiny64, x)
    attn_maps = literal_fusion.raw.clone()
    sets = []
    for z in kept:
        attn_mask = attn_maps  # the code's argument aliases its accumulator
        attn_mask /= torch.sum(attn_mask, dim=-2, keepdim=True)
        attn_mask /= torch.sum(attn_mask, dim=-1, keepdim=True)
        attn_mask = (attn_mask + attn_mask.transpose(-2, -1)) / 2
        attn_mask -= attn_mask.mean(-2, keepdim=True)
        attn_mask = torch.clamp(attn_mask, 0)
        attn_mask /= torch.sum(attn_mask, dim=-1, keepdim=True)
        sets.append(literal_last_block(tiny64, z, attn_mask))
    probs = [torch.softmax(50.0 * f @ text.T, dim=-1) for f in sets]
    s = probs[-1][0].T.clone()
    s[s < s.amax(dim=-1, keepdim=True) * 0.1] = 0
    expect = s @ attn_mask[0].mean(0)[1:, 1:] + torch.stack([p[0].T for p in probs]).mean(0)
    got, _ = cliper_maps(tiny64, crops, text, 5, logit_scale=50.0, set_index=-1, threshold=0.1,
                         normalisation="official")
    torch.testing.assert_close(got[0].reshape(5, -1), expect, **TIGHT)
    assert (attn_mask - once).abs().max() > 1e-6  # the two normalisations differ


def test_thresholded_set_is_the_chosen_one(tiny64, gen):
    """set_index and the threshold matter: other choices give other maps."""
    crops = torch.randn(1, 3, 64, 64, generator=gen, dtype=torch.float64)
    text = F.normalize(torch.randn(4, tiny64.embed_dim, generator=gen, dtype=torch.float64), dim=-1)
    a, _ = cliper_maps(tiny64, crops, text, 4, logit_scale=50.0, set_index=-1, threshold=0.1)
    b, _ = cliper_maps(tiny64, crops, text, 4, logit_scale=50.0, set_index=0, threshold=0.1)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("thr", [0.1, 0.2, 0.6])
def test_combine_matches_literal(gen, thr):
    """The combination on random maps (varied enough for every threshold to zero something)."""
    L, B, N, C = 4, 2, 12, 3
    probs = torch.rand(L, B, N, C, generator=gen, dtype=torch.float64)
    A = torch.rand(B, N, N, generator=gen, dtype=torch.float64)
    got = combine(probs, A, -2, thr)
    for b in range(B):
        s = probs[-2, b].T.clone()
        s[s < s.amax(dim=-1, keepdim=True) * thr] = 0
        assert (s == 0).any()
        torch.testing.assert_close(got[b].T, s @ A[b] + probs[:, b].mean(0).T, **TIGHT)


def spread_directions(bb, crop):
    """Four class embeddings: +-the top two principal directions of the last set's patch
    features, orthogonal to their mean (random weights give every patch one dominant direction,
    so random prompts would label every pixel alike)."""
    x, _ = bb.embed(crop)
    inputs, fused = early_fusion(bb, x)
    feats = bb.project(bb.attention_residual(fused_heads_out(fused, last_values(bb, inputs), bb.heads)))[-1, 0]
    mean = F.normalize(feats.mean(0), dim=0)
    pcs = torch.linalg.svd(feats - feats.mean(0), full_matrices=False).Vh[:2]
    pcs = pcs - (pcs @ mean)[:, None] * mean
    return torch.stack([pcs[0], -pcs[0], pcs[1], -pcs[1]])


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    img = sum(F.interpolate(torch.rand(1, 3, s, s, generator=g), size=(h, w), mode="bilinear") for s in (3, 7)) / 2
    return (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("mode", ["window", "global"])
def test_segmenter_windows_use_cliper_maps(tiny, mode):
    """Each window's maps are CLIPer's maps of that crop; predict_batch equals one image at a time."""
    seg = Segmenter(CLASSES, model=tiny, method="cliper", mode=mode, crop=48, stride=32, short_side=64,
                    window_batch=3, background=None, **SMALL)
    images = [_image(70, 82, 1), _image(64, 64, 2), _image(90, 60, 3)]
    item = seg.preprocess(images[0])
    h, w = item.layout.window
    y, x = item.layout.boxes()[-1]
    crop = item.pixels[:, y:y + h, x:x + w][None]
    seg.use_class_embeddings(spread_directions(tiny, crop))
    expect, _ = cliper_maps(tiny, crop, seg.text, 4, logit_scale=seg.logit_scale, set_index=-1, threshold=0.1)
    torch.testing.assert_close(seg.encode_windows(crop), expect, rtol=1e-5, atol=1e-6)
    batch = seg.predict_batch(images)
    single = [seg.predict(im) for im in images]
    for a, b in zip(batch, single):
        assert a.shape == b.shape and (a == b).mean() > 0.999
    assert len(np.unique(np.concatenate([b.ravel() for b in batch]))) > 1


def test_segmenter_cdam_default_is_off_and_replace(tiny):
    seg = Segmenter(CLASSES, model=tiny, method="cliper", **SMALL)
    assert not seg.cdam and seg.mode == "window" and seg.short_side == 448
    seg = Segmenter(CLASSES, model=tiny, method="cliper", cdam=True, mode="global", short_side=64,
                    backend="reference", **SMALL)
    assert seg.cdam and seg.cdam_combine == "replace"
    img = _image(64, 80, 4)
    item = seg.preprocess(img)
    expect, _ = cliper_maps(tiny, item.pixels[None], seg.text, 4, logit_scale=seg.logit_scale, set_index=-1,
                            threshold=0.1, cdam=(seg.distribution_text, "replace", dict(backend="reference")))
    torch.testing.assert_close(seg.encode_windows(item.pixels[None]), expect, rtol=1e-5, atol=1e-6)


def literal_cam_to_label(cam, score, protocol):
    """CLIPer's labelling, as its evaluation script does it, on full-size maps [C, H, W]."""
    cam = cam / (cam.amax((-1, -2), keepdim=True) + 1e-5) * score[:, None, None]
    valid = (score > protocol.class_threshold)[:, None, None]
    c = cam.reshape(cam.shape[0], -1).clone()
    if protocol.normalize:
        c -= c.amin(-1, keepdim=True)
        c /= c.amax(-1, keepdim=True) + 1e-6
    c[c < protocol.pixel_threshold] = 0
    c = c.reshape(cam.shape) * valid
    value, label = c.max(0)
    label = label + 1
    label[value == 0] = 0
    return label


@pytest.mark.parametrize("normalize", [True, False])
def test_cliper_protocol_labels_match_literal(tiny, normalize):
    protocol = CliperProtocol("cliper-test", ("sky", "wall"), "openai", 100.0, 0.3, 0.4, normalize, 0.1)
    seg = Segmenter(CLASSES, model=tiny, method="cliper", protocol=protocol, short_side=64, **SMALL)
    assert seg.mode == "global" and seg.outputs == 3 and seg.cls_text.shape[0] == 3 + 2 + 1
    img = _image(70, 90, 5)
    item = seg.preprocess(img)
    seg.use_class_embeddings(spread_directions(tiny, item.pixels[None]))
    result = next(seg.results([img]))
    full = result.assembler(result.window_logits)
    assert float(full[0].abs().max()) == 0.0  # channel 0 (background) carries no map
    expect = literal_cam_to_label(full[1:], result.class_scores[1:], protocol)
    got = seg.label_map(result)
    assert (got == expect.numpy()).mean() > 0.999
    assert len(np.unique(got)) >= 3, np.unique(got)  # background and several classes
    torch.testing.assert_close(result.class_scores, result.window_logits.amax(dim=(0, 2, 3)))


def test_presets_and_backbone_settings():
    assert CLIPER_PRESETS[("ViT-B-16", "voc21")].propagation_threshold == 0.1
    assert CLIPER_PRESETS[("ViT-B-16", "context60")].propagation_threshold == 0.2
    assert CLIPER_PRESETS[("ViT-B-16", "coco_object")].propagation_threshold == 0.2


@pytest.mark.parametrize("bad, match", [
    (dict(cdam_combine="mean"), "cdam_combine"),
    (dict(compensation="dino"), "compensation"),
    (dict(sd_weights="/x"), "sd_weights"),
    (dict(protocol="cliper-ade"), "protocol"),
    (dict(protocol="cliper-voc21"), "ViT-B-16"),  # a preset for another backbone
    (dict(threshold=1.5), "threshold"),
    (dict(set_index=4), "set_index"),
    (dict(normalisation="twice"), "normalisation"),
    (dict(method="cliper", cdam="yes", cdam_combine=None), "cdam_combine"),
])
def test_bad_options_rejected(tiny, bad, match):
    kw = dict(model=tiny, method="cliper", **SMALL)
    kw.update(bad)
    with pytest.raises(CdamInputError, match=match):
        Segmenter(CLASSES, **kw)




def test_whole_layout_assembler_is_identity_at_same_size(tiny):
    from cdam_fast.pipeline.segmenter import _assembler

    asm = _assembler(whole_layout((8, 8)), (8, 8), (8, 8), torch.device("cpu"))
    x = torch.rand(1, 2, 8, 8)
    torch.testing.assert_close(asm(x), x[0])


def vit_l14_backbone():
    """The ViT-L/14 image tower (24 blocks, width 1024, 16 heads, patch 14) with a tiny text
    tower. Weights: a seeded random vector tiled over every matrix (drawing 300 M normal
    values takes ~15 s on a loaded CPU; tiling takes ~1 s), layer norms at identity."""
    import open_clip
    from open_clip.factory import get_model_config

    cfg = get_model_config("ViT-L-14")
    with torch.device("meta"):
        clip = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                              text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    clip = clip.to_empty(device="cpu")
    base = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)) * 0.02
    with torch.no_grad():
        for i, p in enumerate(clip.parameters()):
            flat = p.view(-1)
            reps = -(-flat.numel() // base.numel()) + 1
            flat.copy_(base.roll(7919 * i).repeat(reps)[:flat.numel()])
        for m in clip.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1)
                m.bias.fill_(0)
    return ClipBackbone(clip.eval(), open_clip.get_tokenizer("ViT-L-14"), name="ViT-L-14", source="tiled random")


def test_vit_l14_every_method():
    """ViT-L/14 (a tiny image) runs every method; its preset sets patch 14 and CLIPer's
    second-to-last set."""
    from cdam_fast.pipeline.backbone_presets import backbone_preset
    from cdam_fast.pipeline.methods import METHODS

    bb = vit_l14_backbone()
    preset = backbone_preset(bb)
    assert bb.patch_size == (14, 14) and bb.heads == 16 and bb.depth == 24
    assert preset.patch == 14 and preset.cliper_set == -2
    img = _image(30, 44, 6)
    opts = dict(model=bb, mode="global", short_side=28, backend="reference", background=None, **SMALL)
    # with CDAM every method runs its own first pass and the re-run; CLIPer alone as well
    for method, cdam in [(m, True) for m in METHODS] + [("cliper", False)]:
        seg = Segmenter("background,cat", method=method, cdam=cdam, **opts)
        logits = seg.logits(img)
        assert logits.shape == (2, 30, 44) and bool(torch.isfinite(logits).all()), (method, cdam)
    assert seg.set_index == -2 and seg.short_side == 28


def test_autocast_keeps_the_accumulations_in_fp32(tiny, gen):
    """Under autocast (bf16 on the CPU here, fp16 on CUDA) the fused map, the probabilities and
    the combination stay fp32; the maps stay near the fp32 ones (bf16 has 8 mantissa bits)."""
    crops = torch.randn(1, 3, 48, 48, generator=gen)
    text = F.normalize(torch.randn(5, tiny.embed_dim, generator=gen), dim=-1)
    ref, _ = cliper_maps(tiny, crops, text, 5, logit_scale=50.0, set_index=-1, threshold=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, _ = tiny.embed(crops)
        _, fused = early_fusion(tiny, x)
        got, _ = cliper_maps(tiny, crops, text, 5, logit_scale=50.0, set_index=-1, threshold=0.1,
                             cdam=(text, "average", dict(backend="reference")))
        plain, _ = cliper_maps(tiny, crops, text, 5, logit_scale=50.0, set_index=-1, threshold=0.1)
    assert fused.dtype == got.dtype == plain.dtype == torch.float32 and bool(torch.isfinite(got).all())
    assert float((plain - ref).abs().max()) < 0.1 * float(ref.abs().max())
