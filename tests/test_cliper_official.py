"""CLIPer's presets against CLIPer's public evaluation code (github.com/linsun449/cliper.code,
ovs/main_ovs.py, modified_clip/model.py), re-implemented here from what that code computes.

Nothing below calls the package for the steps it checks: the resize is PIL's own call (and,
separately, PIL's bicubic written out in numpy), the patch-count rule, the positional table, the
early-layer fusion (through open_clip's nn.MultiheadAttention with need_weights=True), the
in-place normalisation loop, the last block, the sliding windows, the thresholded combination
(a view of the stacked sets, thresholded in place), the single upsampling and CLIPer's labelling
are written out as that code does them. The presets must give the same labels on real photos
with random ViT-B/16 weights (one model, shared by the module).
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cdam_fast.pipeline import Segmenter, read_class_file
from cdam_fast.pipeline.cliper import CLIPER_PRESETS, combine
from cdam_fast.pipeline.cliper_official import (
    combine_official, direct_assembler, merge_windows, official_pos_table, official_size, pil_resize,
)
from cdam_fast.pipeline.model import ClipBackbone, Grid
from cdam_fast.pipeline.windows import global_size

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATE = "a photo of a {}."  # one template keeps the text tower cheap; the preset's are checked apart
# CLIPer's data/voc/cls_voc21.txt, typed in again: line 1 its background words, then its 20 classes
VOC_BACKGROUND = ("ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
                  "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock",
                  "street", "valley", "bridge", "sign")
VOC_CLASSES = ("aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
               "diningtable", "dog", "horse", "motorbike", "person with clothes, people, human", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor screen")


# -- PIL's bicubic resize, written out ---------------------------------------------------------
_PREC = 22  # Pillow's fixed-point precision for 8-bit images: 32 - 8 - 2 bits


def _keys_cubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _pil_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] int64 fixed-point weights of one axis: the cubic's support widened by the
    scale when shrinking, weights normalised per output pixel, then rounded to 22 bits."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    inv = 1.0 / filterscale
    K = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = [_keys_cubic((x + xmin - center + 0.5) * inv) for x in range(xmax - xmin)]
        total = sum(w)
        for x, k in enumerate(w):
            k = k / total if total != 0.0 else k
            K[xx, xmin + x] = int(k * (1 << _PREC) - 0.5) if k < 0 else int(k * (1 << _PREC) + 0.5)
    return K


def _clip8(acc: np.ndarray) -> np.ndarray:
    out = np.where(acc >= (1 << (_PREC + 8)), 255, np.where(acc <= 0, 0, acc >> _PREC))
    return out.astype(np.uint8)


def numpy_pil_bicubic(img: np.ndarray, size: tuple) -> np.ndarray:
    """uint8 [H, W, 3] -> [h, w, 3]: horizontal pass into an 8-bit image, then vertical."""
    H, W = img.shape[:2]
    h, w = size
    out = img.astype(np.int64)
    half = 1 << (_PREC - 1)
    if w != W:
        out = _clip8(np.einsum("ox,yxc->yoc", _pil_weights(W, w), out) + half).astype(np.int64)
    if h != H:
        out = _clip8(np.einsum("oy,yxc->oxc", _pil_weights(H, h), out) + half).astype(np.int64)
    return out.astype(np.uint8)


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] float64: 1-D linear interpolation, half-pixel centres (align_corners=False)."""
    M = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
        i0 = min(int(src), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = src - i0
        M[i, i0] += 1 - lam
        M[i, i1] += lam
    return M


# -- CLIPer's evaluation code, written out ---------------------------------------------------------
def cliper_size(height, width, short_side, patch=16):
    ratio = short_side / min(width, height)
    return int(height * ratio / patch + 0.5) * patch, int(width * ratio / patch + 0.5) * patch


def cliper_preprocess(img: np.ndarray, short_side: int) -> torch.Tensor:
    h, w = cliper_size(*img.shape[:2], short_side)
    x = torch.from_numpy(np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC)).copy())
    x = x.permute(2, 0, 1).float() / 255.0
    return ((x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])[None]


def cliper_encode(visual, x):
    """CLIPer's encode_image on one crop [1, 3, h, w]: (per-set tokens after ln_post + proj
    [L, T, E], the last input's fused map [heads, T, T])."""
    gh, gw = x.shape[-2] // 16, x.shape[-1] // 16
    pos = visual.positional_embedding
    side = int(math.sqrt(pos.shape[0] - 1))
    table = pos[1:].permute(1, 0).reshape(1, -1, side, side)
    table = F.interpolate(table, size=(gh, gw), mode="bilinear")
    table = torch.cat([pos[:1], table.reshape(pos.shape[1], -1).permute(1, 0)]).half()
    t = visual.conv1(x).reshape(1, pos.shape[1], -1).permute(0, 2, 1)
    t = torch.cat([visual.class_embedding + torch.zeros(1, 1, t.shape[-1]), t], dim=1) + table.float()
    t = visual.ln_pre(t)
    blocks = list(visual.transformer.resblocks)
    maps, kept = 0, []
    for blk in blocks[:-1]:
        y = blk.ln_1(t)
        kept.append(y)
        out, weights = blk.attn(y, y, y, need_weights=True, average_attn_weights=False)
        maps = maps + weights
        t = t + out
        t = t + blk.mlp(blk.ln_2(t))
    kept.append(t)
    last = blocks[-1]
    heads = last.attn.num_heads
    feats = []
    for z in kept:
        maps /= maps.sum(dim=-2, keepdim=True)  # in place on the shared accumulator, once per input
        maps /= maps.sum(dim=-1, keepdim=True)
        m = (maps + maps.transpose(-2, -1)) / 2
        m = m - m.mean(-2, keepdim=True)
        m = torch.clamp(m, 0)
        m = m / m.sum(dim=-1, keepdim=True)
        v = F.linear(last.ln_1(z), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)[2]
        T, W = v.shape[1], v.shape[2]
        vh = v[0].reshape(T, heads, W // heads).transpose(0, 1)
        feats.append(last.attn.out_proj((m[0] @ vh).transpose(0, 1).reshape(T, W)))
    return visual.ln_post(torch.stack(feats)) @ visual.proj, m[0]


def cliper_logits(feats, text, logit_scale, gh, gw):
    """CLIPer's classify (both sides normalised, the mean prompt too), patch tokens only."""
    f = feats / feats.norm(dim=-1, keepdim=True)
    logits = (logit_scale * f @ (text / text.norm(dim=-1, keepdim=True)).T)[:, 1:]
    return logits.transpose(-1, -2).reshape(feats.shape[0], text.shape[0], gh, gw)


def cliper_slide(visual, img, text, logit_scale, crop, stride=112, patch=16):
    _, _, H, W = img.shape
    rows = max(H - crop + stride - 1, 0) // stride + 1
    cols = max(W - crop + stride - 1, 0) // stride + 1
    L = len(visual.transformer.resblocks)
    gh, gw = H // patch, W // patch
    preds = torch.zeros(L, text.shape[0], gh, gw)
    attns = torch.zeros(gh, gw, gh, gw)
    count = torch.zeros(1, gh, gw)
    count_attns = torch.zeros_like(attns)
    for i in range(rows):
        for j in range(cols):
            y1, x1 = i * stride, j * stride
            y2, x2 = min(y1 + crop, H), min(x1 + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            ch, cw = (y2 - y1) // patch, (x2 - x1) // patch
            ty, tx = y1 // patch, x1 // patch
            feats, attn = cliper_encode(visual, img[:, :, y1:y2, x1:x2])
            preds[..., ty:ty + ch, tx:tx + cw] += cliper_logits(feats, text, logit_scale, ch, cw)
            count[..., ty:ty + ch, tx:tx + cw] += 1
            attns[ty:ty + ch, tx:tx + cw, ty:ty + ch, tx:tx + cw] += attn.mean(0)[1:, 1:].reshape(ch, cw, ch, cw)
            count_attns[ty:ty + ch, tx:tx + cw, ty:ty + ch, tx:tx + cw] += 1
    preds /= count
    attns /= count_attns + 1e-5
    attns = attns.flatten(0, 1).flatten(-2, -1)
    attns /= attns.sum(dim=-1, keepdim=True)
    return (preds.flatten(-2, -1) @ attns).unflatten(-1, (gh, gw))


def cliper_pipeline(visual, image, fg_text, bg_text, protocol, crop, whole=None):
    """CLIPer's main_ovs for one image: (pred_mask at the original size [C, H, W], class scores
    [C]). whole: a dict caching the whole-image pass (the same with and without windows)."""
    img = cliper_preprocess(image, protocol.short_side)
    gh, gw = img.shape[2] // 16, img.shape[3] // 16
    text = torch.cat([fg_text, bg_text, fg_text.mean(0, True)], dim=0)
    C = fg_text.shape[0]
    if whole is None or "pass" not in whole:
        feats, attn = cliper_encode(visual, img)
        whole = {} if whole is None else whole
        whole["pass"] = feats, attn
    feats, attn = whole["pass"]
    seg = cliper_logits(feats, text, protocol.logit_scale, gh, gw).softmax(-3)[:, :C]
    if crop > 0:
        slide = cliper_slide(visual, img, text, protocol.logit_scale, crop).softmax(-3)[:, :C]
        seg = slide * 0.5 + seg * 0.5
    seg_last = seg[protocol.select_layer]  # a view: thresholding it changes seg too
    seg_last[seg_last < seg_last.amax((-1, -2), keepdim=True) * protocol.propagation_threshold] = 0
    seg_last = (seg_last.flatten(-2, -1) @ attn.mean(0)[1:, 1:]).unflatten(-1, (gh, gw))
    seg = seg_last + seg.mean(0)
    score = seg.amax(dim=(-1, -2))
    return F.interpolate(seg[None], size=image.shape[:2], mode="bilinear")[0], score


def cliper_labels(pred, score, class_threshold, pixel_threshold, normalize):
    """main_ovs's scaling and cam_to_label (bkg_thre > 0): labels [H, W], 0 = no class."""
    C = pred.shape[0]
    cam = pred / (pred.amax((-1, -2), keepdim=True) + 1e-5) * score[..., None, None]
    cam = cam.reshape(C, -1).clone()
    if normalize:
        cam -= cam.amin(dim=-1, keepdim=True)
        cam /= cam.amax(dim=-1, keepdim=True) + 1e-6
    valid = (score > class_threshold)[:, None]
    cam[cam < pixel_threshold] = 0
    value, label = (valid * cam).max(dim=0)
    label += 1
    label[value == 0] = 0
    return label.reshape(pred.shape[1:])


def encode_prompts(clip, tokenizer, names):
    """CLIPer's classifier: per name, the template's embedding normalised (one template here)."""
    e = clip.encode_text(tokenizer([TEMPLATE.format(n) for n in names]))
    return e / e.norm(dim=-1, keepdim=True)


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_b16():
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    return clip, open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return {"chelsea": data.chelsea(), "astronaut": data.astronaut(), "coffee": data.coffee()}


@pytest.fixture(scope="module")
def whole_passes():
    return {}  # photo -> the reference's whole-image pass, shared by its runs with and without windows


@pytest.fixture(scope="module")
def voc_segmenter(vit_b16):
    clip, tok = vit_b16
    bb = ClipBackbone(clip, tok, name="ViT-B-16", source="random")
    seg = Segmenter(read_class_file("voc21"), model=bb, method="cliper", protocol="cliper-voc21",
                    templates=[TEMPLATE], progress=False, cache_dir=False)
    # the preset's official pipeline: CLIPer's normalisation, its VOC config's sliding crop
    assert (seg.pipeline, seg.normalisation, seg.sliding_crop, seg.short_side) == ("official", "official", 336, 336)
    return seg


# -- end to end --------------------------------------------------------------------------------
# Without windows on every photo; with VOC's 336 windows (3 at 336 x 512) and Context's 224 (4 at
# 336 x 336), on one photo each: a ViT-B/16 pass costs seconds on two cores.
@pytest.mark.parametrize("name, crop", [("chelsea", 0), ("astronaut", 0), ("coffee", 0), ("coffee", 336),
                                        ("astronaut", 224)])
def test_preset_matches_clipers_code_on_photos(vit_b16, photos, voc_segmenter, whole_passes, name, crop):
    """cliper-voc21 (ViT-B/16, random weights) against CLIPer's code written out: the plain
    argmax of the map and CLIPer's labels agree on >= 99.9 % of the pixels, without and with
    sliding windows. The prompts are the segmenter's (checked on their own below)."""
    seg = voc_segmenter
    seg.sliding_crop = crop
    check_against_clipers_code(seg, vit_b16[0].visual, photos[name], whole_passes.setdefault(name, {}), (name, crop))


def test_context_preset_matches_clipers_code(vit_b16, photos, whole_passes):
    """cliper-context60 as shipped (its 224 windows, "background" as the only background word,
    no min-max) on one photo."""
    clip, tok = vit_b16
    seg = Segmenter(read_class_file("context60"), model=ClipBackbone(clip, tok, name="ViT-B-16", source="random"),
                    method="cliper", protocol="cliper-context60", templates=[TEMPLATE], progress=False, cache_dir=False)
    assert (seg.sliding_crop, seg.outputs, seg.cls_text.shape[0]) == (224, 59, 59 + 1 + 1)
    assert seg.prompted_classes.names == read_class_file("cliper_context60").names
    check_against_clipers_code(seg, clip.visual, photos["astronaut"], whole_passes.setdefault("astronaut", {}),
                               "context60")


def check_against_clipers_code(seg, visual, image, whole, what):
    """The segmenter's map and labels against CLIPer's code written out, on its own prompts."""
    C = seg.outputs
    fg, bg = seg.cls_text[:C], seg.cls_text[C:-1]
    with torch.inference_mode():
        expect_map, expect_score = cliper_pipeline(visual, image, fg, bg, seg.protocol, seg.sliding_crop, whole)
        result = next(iter(seg.results([image])))
        got_map = result.assembler(result.window_logits)[1:]  # channel 0: CLIPer's background, no map
    assert got_map.shape == expect_map.shape
    argmax_expect = expect_map.argmax(0)
    agree = (got_map.argmax(0) == argmax_expect).float().mean().item()
    assert agree >= 0.999, (what, agree)
    assert len(torch.unique(argmax_expect)) >= 3  # a map with structure, not one class everywhere
    # values too (a threshold flipped by rounding moves a few pixels slightly)
    assert float((got_map - expect_map).abs().max()) < 0.01 * float(expect_map.abs().max())
    # CLIPer's labels: with the preset's thresholds (random weights score low: mostly class 0),
    # and with thresholds that let several classes through, with and without min-max
    p = seg.protocol
    ranked = expect_score.sort().values
    median = float(ranked[C // 2 - 1] + ranked[C // 2]) / 2  # between two scores: rounding cannot flip a class
    try:
        for cls_thr, px_thr, norm in [(p.class_threshold, p.pixel_threshold, p.normalize), (median, 0.3, True),
                                      (median, 0.1, False)]:
            seg.protocol = dataclasses.replace(p, class_threshold=cls_thr, pixel_threshold=px_thr, normalize=norm)
            expect = cliper_labels(expect_map, expect_score, cls_thr, px_thr, norm)
            got = torch.from_numpy(seg.label_map(result).astype(np.int64))
            label_agree = (got == expect).float().mean().item()
            assert label_agree >= 0.999, (what, cls_thr, px_thr, norm, label_agree)
            if cls_thr == median:
                assert len(torch.unique(expect)) >= 3
    finally:
        seg.protocol = p


# -- the steps one by one ----------------------------------------------------------------------
def test_pil_bicubic_written_out_matches_pil_and_the_package(photos):
    """What PIL's BICUBIC resize does, exactly: the numpy version above (separable, columns
    then rows, antialiased when shrinking, 22-bit fixed point, 8-bit intermediate) equals PIL
    bit for bit, shrinking and enlarging; the package's resize is that resize."""
    img = photos["chelsea"]
    for size in [(336, 505), (120, 181), (640, 960), (300, 200)]:
        ours = numpy_pil_bicubic(img, size)
        pil = np.asarray(Image.fromarray(img).resize(size[::-1], Image.BICUBIC))
        assert np.array_equal(ours, pil), size
        got = pil_resize(torch.from_numpy(img).permute(2, 0, 1), size)
        assert torch.equal(got, torch.from_numpy(ours).permute(2, 0, 1).float() / 255.0)
    # not torch's bilinear (the package pipeline's resize): many pixels differ
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255.0
    bil = (F.interpolate(x, size=(120, 181), mode="bilinear", align_corners=False)[0] * 255).round()
    assert (bil != torch.from_numpy(numpy_pil_bicubic(img, (120, 181))).permute(2, 0, 1)).float().mean() > 0.3


@pytest.mark.parametrize("hw, expect", [((300, 436), (336, 496)), ((300, 451), (336, 512)),
                                        ((336, 488), (336, 496)), ((512, 512), (336, 336)),
                                        ((300, 3000), (336, 3360)), ((1000, 90), (3728, 336))])
def test_size_rule(hw, expect):
    """int(x / 16 + 0.5) patches on the unrounded size, no long-side cap."""
    assert cliper_size(*hw, 336) == expect
    assert official_size(*hw, 336, 16) == expect


def test_size_rule_differs_from_the_package_rule():
    assert global_size(300, 436, (16, 16), 336) == (336, 480)  # whole pixels, then round half to even
    diff = sum(official_size(h, w, 336, 16) != global_size(h, w, (16, 16), 336, 10 ** 6)
               for h in range(150, 800, 7) for w in range(150, 800, 7))
    assert diff > 0


def test_positional_table_bilinear_fp16(vit_b16):
    """The table resized bilinearly (half-pixel centres) and rounded to fp16, class row included."""
    clip, tok = vit_b16
    bb = ClipBackbone(clip, tok, name="ViT-B-16", source="random")
    pos = clip.visual.positional_embedding.detach().double().numpy()
    grid = (21, 31)
    table = official_pos_table(bb, Grid(*grid))
    assert table.dtype == torch.float16 and table.shape == (1 + 21 * 31, 768)
    patch = pos[1:].reshape(14, 14, -1)
    expect = np.einsum("yi,xj,ijc->yxc", bilinear_matrix(21, 14), bilinear_matrix(31, 14), patch).reshape(-1, 768)
    expect = torch.from_numpy(np.concatenate([pos[:1], expect])).half()
    # fp32 vs float64 arithmetic may round a value to a neighbouring fp16 number
    diff = (table.float() - expect.float()).abs()
    assert bool((diff <= expect.float().abs() * 2 ** -10 + 1e-7).all())
    assert (diff > 0).float().mean() < 0.01
    # not the package pipeline's bicubic table with scale (g + 0.1) / g0
    package = bb.positional_embedding(Grid(*grid), "published").float()
    assert ((package - table.float()).abs() > expect.float().abs() * 2 ** -9 + 1e-6).float().mean() > 0.5
    assert torch.equal(table[0], clip.visual.positional_embedding[0].detach().half())
    # the native grid is rounded too
    assert torch.equal(official_pos_table(bb, Grid(14, 14)), clip.visual.positional_embedding.detach().half())


def test_combination_thresholds_in_place(gen):
    """The mean over the sets includes the thresholded set (a view thresholded in place)."""
    L, C, N = 5, 4, 30
    probs = torch.rand(L, C, N, generator=gen, dtype=torch.float64)
    A = torch.rand(N, N, generator=gen, dtype=torch.float64)
    seg = probs.clone()
    seg_last = seg[-1]
    seg_last[seg_last < seg_last.amax(-1, keepdim=True) * 0.5] = 0
    expect = seg_last @ A + seg.mean(0)
    torch.testing.assert_close(combine_official(probs.clone(), A, -1, 0.5), expect, rtol=1e-12, atol=1e-12)
    package = combine(probs.permute(0, 2, 1)[:, None], A[None], -1, 0.5)[0].T  # the unthresholded mean
    assert (package - expect).abs().max() > 1e-3


def test_upsampling_is_one_bilinear_step(gen):
    tokens, original = (21, 28), (300, 451)
    maps = torch.rand(1, 3, *tokens, generator=gen)
    asm = direct_assembler(tokens, original, torch.device("cpu"))
    expect = np.einsum("Yy,Xx,cyx->cYX", bilinear_matrix(300, 21), bilinear_matrix(451, 28), maps[0].double().numpy())
    torch.testing.assert_close(asm(maps).double(), torch.from_numpy(expect), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(asm(maps)[None], F.interpolate(maps, size=original, mode="bilinear"), rtol=1e-5,
                               atol=1e-6)


def test_merge_windows_matches_the_loop(gen):
    """The sliding merge on random window logits and maps (token units) against the loop."""
    L, K, h, w, c = 3, 4, 5, 9, 4
    boxes = [(0, 0), (0, 3), (0, 5), (1, 0), (1, 3), (1, 5)]
    logits = torch.rand(len(boxes), L, K, c, c, generator=gen, dtype=torch.float64)
    attn = torch.rand(len(boxes), c * c, c * c, generator=gen, dtype=torch.float64)
    preds, cnt = torch.zeros(L, K, h, w, dtype=torch.float64), torch.zeros(h, w, dtype=torch.float64)
    pairs = torch.zeros(h * w, h * w, dtype=torch.float64)
    pair_cnt = torch.zeros(h * w, h * w, dtype=torch.float64)
    for i, (y, x) in enumerate(boxes):
        idx = [(y + a) * w + (x + b) for a in range(c) for b in range(c)]
        for p, q in enumerate(idx):
            preds[..., q // w, q % w] += logits[i].reshape(L, K, -1)[..., p]
            cnt[q // w, q % w] += 1
            for p2, q2 in enumerate(idx):
                pairs[q, q2] += attn[i, p, p2]
                pair_cnt[q, q2] += 1
    A = pairs / (pair_cnt + 1e-5)
    A = A / A.sum(-1, keepdim=True)
    expect = ((preds / cnt).reshape(L, K, -1) @ A).reshape(L, K, h, w)
    torch.testing.assert_close(merge_windows(logits, attn, boxes, (h, w)), expect, rtol=1e-10, atol=1e-12)


def test_class_lists_are_clipers():
    voc = read_class_file("cliper_voc21")
    assert voc.names == ("background",) + VOC_CLASSES
    ctx = read_class_file("cliper_context60").names
    assert len(ctx) == 60 and ctx[0] == "background"
    assert {"bird avian", "chair seat", "person with cloth people human", "tvmonitor screen", "wood"} <= set(ctx)
    for name, count in [("cliper_coco_object", 81), ("cliper_coco_stuff171", 172), ("cliper_ade20k", 151),
                        ("cliper_cityscapes", 20)]:
        names = read_class_file(name).names
        assert len(names) == count and names[0] == "background", name
    assert CLIPER_PRESETS[("ViT-B-16", "voc21")].background_words == VOC_BACKGROUND


def test_preset_prompts_clipers_names(voc_segmenter, vit_b16):
    """Given the package's VOC list, the preset prompts CLIPer's names (the outputs keep the
    given names): foreground rows, then its background words, then the mean foreground prompt;
    rows checked against CLIPer's classifier on a few names (the text tower is slow here)."""
    clip, tok = vit_b16
    seg = voc_segmenter
    assert seg.class_names == read_class_file("voc21").names
    assert seg.prompted_classes.names == ("background",) + VOC_CLASSES
    assert seg.cls_text.shape[0] == 20 + 25 + 1 and seg.outputs == 20
    pick_fg, pick_bg = [2, 14, 19], [0, 24]  # bird avian, person with clothes..., tvmonitor screen; ground, sign
    with torch.inference_mode():
        expect = encode_prompts(clip, tok, [VOC_CLASSES[i] for i in pick_fg] + [VOC_BACKGROUND[i] for i in pick_bg])
    got = torch.cat([seg.cls_text[pick_fg], seg.cls_text[[20 + i for i in pick_bg]]])
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seg.cls_text[45], F.normalize(seg.cls_text[:20].mean(0), dim=0))


# (name, templates, logit_scale, score_threshold, bkg_thre, is_normalize, attention_thr, size, select_layer,
#  sliding_crop_size) of scripts/config/<model>/ovs_<dataset>.yaml, typed in again
CONFIGS = {
    ("ViT-B-16", "voc21"): ("cliper", 100, 0.7, 0.6, True, 0.1, 336, -1, 336),
    ("ViT-B-16", "voc20"): ("cliper", 100, 0.0, 0.001, False, 0.1, 336, -1, 0),
    ("ViT-B-16", "context60"): ("cliper", 100, 0.45, 0.45, False, 0.2, 336, -1, 224),
    ("ViT-B-16", "context59"): ("cliper", 100, 0.3, 0.3, False, 0.2, 336, -1, 224),
    ("ViT-B-16", "coco_object"): ("openai", 50, 0.3, 0.3, False, 0.2, 336, -1, 224),
    ("ViT-B-16", "coco_stuff171"): ("cliper", 50, 0.1, 0.1, False, 0.2, 336, -1, 0),
    ("ViT-B-16", "ade20k"): ("cliper", 100, 0.3, 0.3, False, 0.2, 336, -1, 0),
    ("ViT-B-16", "cityscapes"): ("openai", 100, 0.0, 0.0001, False, 0.35, 560, -1, 0),
    ("ViT-L-14", "voc21"): ("cliper", 50, 0.5, 0.4, True, 0.1, 336, -2, 0),
    ("ViT-L-14", "voc20"): ("cliper", 70, 0.1, 0.0001, False, 0.2, 336, -1, 0),
    ("ViT-L-14", "context60"): ("openai", 50, 0.3, 0.3, False, 0.2, 336, -2, 0),
    ("ViT-L-14", "context59"): ("cliper", 100, 0.45, 0.45, False, 0.2, 336, -2, 0),
    ("ViT-L-14", "coco_object"): ("openai", 50, 0.5, 0.5, False, 0.1, 336, -2, 0),
    ("ViT-L-14", "coco_stuff171"): ("openai", 50, 0.2, 0.2, False, 0.2, 336, -2, 0),
    ("ViT-L-14", "ade20k"): ("openai", 50, 0.2, 0.2, False, 0.2, 336, -1, 0),
    ("ViT-L-14", "cityscapes"): ("cliper", 100, 0.0, 0.0001, False, 0.35, 448, -1, 0),
}


def test_presets_are_clipers_configs():
    assert set(CLIPER_PRESETS) == set(CONFIGS)
    for key, cfg in CONFIGS.items():
        p = CLIPER_PRESETS[key]
        got = (p.templates, p.logit_scale, p.class_threshold, p.pixel_threshold, p.normalize,
               p.propagation_threshold, p.short_side, p.select_layer, p.sliding_crop)
        assert got == cfg, key
        assert p.name == f"cliper-{key[1]}"


def test_package_pipeline_keeps_the_package_steps(vit_b16, voc_segmenter):
    """pipeline="package": CLIPer's protocol (thresholds, prompts' templates and background
    words) around the package's own steps: names as given, its size rule, one normalisation."""
    clip, tok = vit_b16
    bb = ClipBackbone(clip, tok, name="ViT-B-16", source="random")
    seg = Segmenter(read_class_file("voc21"), model=bb, method="cliper", protocol="cliper-voc21", pipeline="package",
                    templates=[TEMPLATE], progress=False, cache_dir=False)
    assert (seg.pipeline, seg.normalisation, seg.sliding_crop) == ("package", "once", 0)
    assert seg.prompted_classes.names == read_class_file("voc21").names
    img = np.zeros((300, 436, 3), np.uint8)
    assert seg.preprocess(img).layout.size == (336, 480)
    assert voc_segmenter.preprocess(img).layout.size == (336, 496)


@pytest.mark.parametrize("kw, match", [
    (dict(protocol="mmseg", pipeline="official"), "needs a CLIPer protocol"),
    (dict(protocol="cliper-voc21", pipeline="package", sliding_crop=224), "sliding_crop"),
    (dict(protocol="cliper-voc21", sliding_crop=200), "multiple of"),
    (dict(protocol="cliper-voc21", sliding_crop=-1), "sliding_crop"),
    (dict(protocol="cliper-voc21", pipeline="pil"), "pipeline"),
    (dict(protocol="cliper-voc20", classes="voc20"), "cliper_voc21"),  # CLIPer's class 0 missing
    (dict(attention="proxy"), "attention"),  # DINO's similarities: not implemented
    (dict(fuse_sets="no"), "fuse_sets"),
])
def test_bad_official_options(vit_b16, kw, match):
    from cdam_fast import CdamInputError

    clip, tok = vit_b16
    bb = ClipBackbone(clip, tok, name="ViT-B-16", source="random")
    classes = read_class_file(kw.pop("classes", "voc21"))
    with pytest.raises(CdamInputError, match=match):
        Segmenter(classes, model=bb, method="cliper", templates=[TEMPLATE], progress=False, cache_dir=False, **kw)


def test_official_pipeline_batches_windows_and_images(gen):
    """A tiny random ViT: the official pipeline with windows gives the same labels whatever
    the window batch, one image at a time or several, and runs with CDAM."""
    from cdam_fast.pipeline.cliper import CliperProtocol
    from test_cliper import SMALL, _image, tiny_clip

    tiny = tiny_clip()
    protocol = CliperProtocol("cliper-test", ("sky", "wall"), "openai", 100.0, 0.0, 0.05, False, 0.1, short_side=64,
                              sliding_crop=48)
    images = [_image(70, 90, 1), _image(64, 64, 2), _image(100, 60, 3)]
    kw = dict(model=tiny, method="cliper", protocol=protocol, **SMALL)
    one = Segmenter("background,cat,sofa,grass", window_batch=1, **kw)
    many = Segmenter("background,cat,sofa,grass", window_batch=16, **kw)
    assert one.pipeline == "official" and one.sliding_crop == 48
    batch = many.predict_batch(images)
    for img, b in zip(images, batch):
        a = one.predict(img)
        assert a.shape == img.shape[:2] and (a == b).mean() > 0.999
    cdam = Segmenter("background,cat,sofa,grass", cdam=True, backend="reference", **kw)
    assert cdam.predict(images[0]).shape == (70, 90)


@pytest.mark.parametrize("attention, fuse_sets", [("vanilla", True), ("q-q", True), ("k-k", False), ("v-v", True),
                                                   ("identity", True), ("fused", False)])
def test_ablation_switches_match_clipers_custom_attn(gen, attention, fuse_sets):
    """CLIPer's attn_type and fuse_feature switches, as its custom_attn and forward compute
    them (float64, a tiny random ViT): the last block on every kept input with that attention,
    the last input's attention propagating the thresholded set, with or without the mean."""
    from cdam_fast.pipeline.cliper import cliper_maps
    from test_cliper import literal_fusion, tiny_clip

    bb = tiny_clip(torch.float64)
    crops = torch.randn(1, 3, 48, 64, generator=gen, dtype=torch.float64)
    text = F.normalize(torch.randn(6, bb.embed_dim, generator=gen, dtype=torch.float64), dim=-1)
    with torch.inference_mode():
        x, grid = bb.embed(crops)
        kept, _ = literal_fusion(bb, x)
        maps = literal_fusion.raw.clone()
        last = bb.visual.transformer.resblocks[-1]
        H, W = last.attn.num_heads, bb.width
        d = W // H
        sets = []
        for z in kept:
            q, k, v = (t[0].reshape(-1, H, d).transpose(0, 1)
                       for t in F.linear(last.ln_1(z), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, -1))
            if attention == "fused":
                maps /= maps.sum(dim=-2, keepdim=True)
                maps /= maps.sum(dim=-1, keepdim=True)
                att = (maps + maps.transpose(-2, -1)) / 2
                att = torch.clamp(att - att.mean(-2, keepdim=True), 0)
                att = (att / att.sum(dim=-1, keepdim=True))[0]
            elif attention == "identity":
                att = torch.eye(v.shape[1], dtype=v.dtype).expand(H, -1, -1)
            else:
                a, c = {"vanilla": (q, k), "q-q": (q, q), "k-k": (k, k), "v-v": (v, v)}[attention]
                att = torch.softmax(torch.bmm(a * d ** -0.5, c.transpose(1, 2)), dim=-1)
            out = last.attn.out_proj(torch.bmm(att, v).transpose(0, 1).reshape(-1, W))
            f = bb.visual.ln_post(out) @ bb.visual.proj
            sets.append(torch.softmax(40.0 * F.normalize(f, dim=-1) @ text.T, dim=-1)[1:, :4].T)  # [C, N]
        seg = torch.stack(sets)
        seg_last = seg[-1]
        seg_last[seg_last < seg_last.amax(-1, keepdim=True) * 0.2] = 0
        expect = seg_last @ att.mean(0)[1:, 1:] + (seg.mean(0) if fuse_sets else 0)
        got, _ = cliper_maps(bb, crops, text, 4, logit_scale=40.0, set_index=-1, threshold=0.2,
                             normalisation="official", combination="official", attention=attention, fuse_sets=fuse_sets)
    torch.testing.assert_close(got[0].reshape(4, -1), expect, rtol=1e-9, atol=1e-10)
