"""The fast pipeline (fused CDAM op, batched windows, one upsampling) against the plain
reference pipeline (torch reference map, one window at a time, the published order), with
random weights. Small images with a reduced crop / stride give several windows cheaply; the
method matrix runs in global mode (one window) to keep the suite quick; one test runs the
real 448 protocol."""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdam_fast import CdamInputError
from cdam_fast.pipeline import Segmenter, load_clip, prepare_benchmark
from cdam_fast.pipeline.methods import MaskClip
from cdam_fast.pipeline.reference_pipeline import reference_segment

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CLASSES = "background,cat,sofa,grass; lawn"
# 70 x 82 -> 64 x 75: windows of 48 at stride 32 start at rows 0, 16 and columns 0, 27 (the
# last snapped to the border, off the 16-pixel patch grid); the result is resized back up.
SMALL = dict(crop=48, stride=32, short_side=64, long_side=400, templates="single", progress=False)
LOGIT_ATOL = 1e-4  # logits are cosine similarities of about 0.1; fp32 and the CDAM row min-max
MIN_AGREEMENT = 0.999


@pytest.fixture(scope="session")
def vit_b16():
    return load_clip("ViT-B-16", None, DEVICE)


@functools.lru_cache(maxsize=None)
def smooth_image(h, w, seed):
    """uint8 RGB with structure at several scales (not white noise)."""
    g = torch.Generator().manual_seed(seed)
    img = sum(F.interpolate(torch.rand(1, 3, s, s, generator=g), size=(h, w), mode="bilinear", align_corners=False)
              for s in (3, 7, 15))[0] / 3
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def image():
    return smooth_image(70, 82, 0)


def spread_directions(feats):
    """Four class embeddings from patch features [N, E]: +-the top two principal directions,
    made orthogonal to the mean feature. With random weights every patch feature shares one
    dominant direction, so real prompts would give one class to every pixel (a label
    comparison would prove nothing) and random directions give near ties; these give varied
    labels with clear margins."""
    mean = F.normalize(feats.mean(0), dim=0)
    pcs = torch.linalg.svd(feats - feats.mean(0), full_matrices=False).Vh[:2]
    pcs = pcs - (pcs @ mean)[:, None] * mean
    return torch.stack([pcs[0], -pcs[0], pcs[1], -pcs[1]])


@pytest.fixture(scope="module")
def class_embeddings(vit_b16, image):
    """spread_directions of the MaskCLIP features of the test image's first window."""
    bb = vit_b16
    probe = Segmenter(CLASSES, model=bb, cdam=False, background=None, **SMALL)
    crop = probe.preprocess(image).pixels[None, :, :48, :48]
    with torch.inference_mode():
        x, grid = bb.embed(crop)
        x = bb.run_blocks(x, 0, bb.depth - 1)
        feats = bb.project(MaskClip().first_pass(bb, x, grid).out[:, 1:])
    return spread_directions(feats[0])


def make(bb, emb, **kw):
    seg = Segmenter(CLASSES, model=bb, **{**SMALL, "background": None, **kw})
    seg.use_class_embeddings(emb)
    return seg


def spread_for(seg, img):
    """spread_directions of this very configuration's output features (methods without the
    residual give features unlike MaskCLIP's), read by making the class embeddings the
    identity for one pass."""
    chosen = seg.text
    seg.text = torch.eye(chosen.shape[1], device=chosen.device)
    feats = seg.encode_windows(seg.preprocess(img).pixels[None])  # [1, E, h, w]
    seg.text = chosen
    seg.use_class_embeddings(spread_directions(feats[0].flatten(1).T))


def fast_run(seg, img):
    """(logits, labels, threshold) of the fast pipeline, from one pass."""
    result = next(iter(seg.results([img])))
    return seg._full_logits(result), seg.label_map(result), result.threshold


def reference_labels(logits, threshold):
    """The labelling rule written out: argmax, and class 0 below the top-probability threshold."""
    prob = torch.softmax(50 * logits.double(), 0)
    top, arg = prob.max(0)
    return arg if threshold is None else torch.where(top < threshold, 0, arg)


def assert_agree(fast_logits, fast_labels, ref_logits, ref_labels, min_classes=2):
    assert fast_logits.shape == ref_logits.shape
    torch.testing.assert_close(fast_logits, ref_logits, rtol=0, atol=LOGIT_ATOL)
    assert fast_labels.dtype == np.uint8 and fast_labels.shape == tuple(ref_labels.shape)
    agree = float((torch.from_numpy(fast_labels).long().to(ref_labels.device) == ref_labels).float().mean())
    assert agree >= MIN_AGREEMENT
    assert len(np.unique(fast_labels)) >= min_classes  # not trivially "all one class"


@pytest.fixture(scope="module")
def windowed_reference(vit_b16, class_embeddings, image):
    """The reference pipeline's MaskCLIP + CDAM result on the 4-window layout (computed once)."""
    seg = make(vit_b16, class_embeddings, backend="reference")
    assert seg.preprocess(image).layout.boxes() == [(0, 0), (0, 27), (16, 0), (16, 27)]
    return reference_segment(seg, image)


@pytest.mark.parametrize("cdam", [True, False], ids=["cdam", "alone"])
@pytest.mark.parametrize("method", ["maskclip", "sclip", "clearclip", "naclip", "gem"])
def test_each_method_matches_reference(vit_b16, class_embeddings, image, method, cdam):
    seg = make(vit_b16, class_embeddings, method=method, cdam=cdam, mode="global")
    prep = seg.preprocess(image)
    assert prep.layout.count == 1 and prep.tokens == (4, 5)  # 64 x 75 rounded to 64 x 80
    spread_for(seg, image)
    logits, labels, _ = fast_run(seg, image)
    ref = reference_segment(seg, image)
    assert_agree(logits, labels, ref.logits, ref.labels)


def test_cdam_changes_the_result(vit_b16, class_embeddings, image):
    with_cdam = make(vit_b16, class_embeddings, mode="global").logits(image)
    without = make(vit_b16, class_embeddings, mode="global", cdam=False).logits(image)
    assert (with_cdam - without).abs().max() > 100 * LOGIT_ATOL


def test_windows_and_entropy_threshold_match_reference(vit_b16, class_embeddings, image, windowed_reference):
    ref = windowed_reference
    seg = make(vit_b16, class_embeddings, background="entropy")
    logits, labels, thr = fast_run(seg, image)
    assert float(thr) == pytest.approx(float(ref.entropy_threshold), rel=1e-4)
    assert_agree(logits, labels, ref.logits, reference_labels(ref.logits, ref.entropy_threshold), min_classes=1)
    per_window = make(vit_b16, class_embeddings, background="entropy-per-window")
    _, labels, thr = fast_run(per_window, image)
    assert float(thr) == pytest.approx(float(ref.last_window_threshold), rel=1e-4)
    assert float(ref.last_window_threshold) != pytest.approx(float(ref.entropy_threshold), rel=1e-3)
    expected = reference_labels(ref.logits, ref.last_window_threshold)
    assert (torch.from_numpy(labels).long() == expected.cpu()).float().mean() >= MIN_AGREEMENT


def test_fixed_threshold(vit_b16, class_embeddings, image, windowed_reference):
    ref = windowed_reference
    argmax = reference_labels(ref.logits, None)
    top = torch.softmax(50 * ref.logits.double(), 0).max(0).values
    # a threshold between 30% and 70% of the non-background pixels, in the widest gap between
    # their top probabilities there, so that rounding cannot move a pixel across it
    vals = top[argmax != 0].unique().sort().values
    lo, hi = int(0.3 * len(vals)), int(0.7 * len(vals))
    k = lo + int((vals[lo + 1:hi + 1] - vals[lo:hi]).argmax())
    thr = float((vals[k] + vals[k + 1]) / 2)
    logits, labels, used = fast_run(make(vit_b16, class_embeddings, background=thr), image)
    assert used == thr
    expected = reference_labels(ref.logits, thr)
    assert 0.2 < float((expected != argmax)[argmax != 0].float().mean()) < 0.8
    assert_agree(logits, labels, ref.logits, expected)


def test_backends_agree_with_reference_pipeline(vit_b16, class_embeddings, image, windowed_reference, backend):
    name, dev = backend
    if dev != vit_b16.device:
        pytest.skip(f"backend {name!r} runs on {dev}, the model is on {vit_b16.device}")
    if name == "triton" and dev.type != "cuda":
        pytest.skip("the Triton interpreter is too slow for a whole pipeline (the ops tests cover it on CPU)")
    logits, labels, _ = fast_run(make(vit_b16, class_embeddings, backend=name), image)
    assert_agree(logits, labels, windowed_reference.logits, reference_labels(windowed_reference.logits, None))


def test_published_448_protocol(vit_b16, class_embeddings):
    img = smooth_image(40, 41, 3)  # -> 448 x 459: two 448 windows (784 tokens each), 11 pixels apart
    seg = make(vit_b16, class_embeddings, crop=448, stride=224, short_side=448, long_side=2048, background="entropy",
               method="clearclip")  # no MLP in the last block: a little cheaper on CPU
    assert seg.preprocess(img).layout.boxes() == [(0, 0), (0, 11)]
    result = next(iter(seg.results([img])))
    assert result.window_logits.shape == (2, 4, 28, 28)
    ref = reference_segment(seg, img)
    assert float(result.threshold) == pytest.approx(float(ref.threshold), rel=1e-4)
    assert_agree(result.assembler(result.window_logits), seg.label_map(result), ref.logits, ref.labels, min_classes=1)


def test_batches_across_images_equal_single_images(vit_b16, class_embeddings, image):
    imgs = [image, smooth_image(40, 40, 1)]  # 4 + 1 windows
    seg = make(vit_b16, class_embeddings, window_batch=3)  # each image's windows in forward passes of its own
    batched = list(seg.results(imgs))
    assert [r.original for r in batched] == [(70, 82), (40, 40)]
    for img, r in zip(imgs, batched):
        logits, labels, _ = fast_run(seg, img)
        assert torch.equal(r.assembler(r.window_logits), logits)
        assert np.array_equal(seg.label_map(r), labels)


def test_public_methods_and_input_types(vit_b16, class_embeddings, image, tmp_path, capsys):
    from PIL import Image

    seg = make(vit_b16, class_embeddings, mode="global", cdam=False)
    logits = seg.logits(image)
    assert logits.dtype == torch.float32 and logits.shape == (4, 70, 82) and logits.device.type == DEVICE.type
    expected = seg.predict(image)
    assert np.array_equal(expected, logits.argmax(0).cpu().numpy())
    Image.fromarray(image).save(tmp_path / "x.png")
    batch = seg.predict_batch([Image.fromarray(image), tmp_path / "x.png"], progress=True)
    assert all(np.array_equal(b, expected) for b in batch)
    assert "2/2" in capsys.readouterr().err


def test_bad_input_errors(vit_b16, class_embeddings, tmp_path):
    seg = make(vit_b16, class_embeddings, cdam=False)
    with pytest.raises(CdamInputError, match="smaller than one 16x16 patch"):
        seg.predict(np.zeros((10, 40, 3), np.uint8))
    with pytest.raises(CdamInputError, match="does not exist"):
        seg.predict(tmp_path / "nope.jpg")
    with pytest.raises(CdamInputError, match="too elongated"):
        seg.predict(np.zeros((16, 3000, 3), np.uint8))
    with pytest.raises(CdamInputError, match="shape"):
        seg.use_class_embeddings(torch.zeros(3, 7))
    base = dict(model=vit_b16, **SMALL)
    for kwargs, match in [(dict(classes=""), "empty"), (dict(classes="a", method="mask"), "method must be one of"),
                          (dict(classes="a", mode="tiles"), "mode must be"), (dict(classes="a", backend="gpu"), "backend"),
                          (dict(classes="a", background="otsu"), "background"), (dict(classes="a", stride=64), "stride"),
                          (dict(classes="a", crop=8, stride=8), "smaller than the model's"),
                          (dict(classes="a", window_batch=0), "window_batch"), (dict(classes="a", atp=[""]), "atp")]:
        with pytest.raises(CdamInputError, match=match):
            Segmenter(**{**base, **kwargs})
    if DEVICE.type == "cpu":
        with pytest.raises(CdamInputError, match="needs a CUDA device"):
            Segmenter("a", dtype="fp16", **base)


def test_benchmark_helper(vit_b16):
    seg = Segmenter(CLASSES, model=vit_b16, **SMALL)
    fn, crops = prepare_benchmark(seg, size=(48, 48), batch=2)
    out = fn()
    # one row per synonym ("grass; lawn": 5 rows for 4 classes) under the default synonyms="max"
    assert crops.shape == (2, 3, 48, 48) and out.shape == (2, 5, 3, 3) and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast fp16 needs a CUDA GPU")
def test_fp16_autocast_close_to_fp32(vit_b16, class_embeddings, image):
    fp32 = make(vit_b16, class_embeddings, dtype="fp32")
    fp16 = make(vit_b16, class_embeddings, dtype="fp16")
    assert (fp16.predict(image) == fp32.predict(image)).mean() > 0.98
    torch.testing.assert_close(fp16.logits(image), fp32.logits(image), rtol=0, atol=5e-3)


def test_vit_l14_random_weights_run():
    """ViT-L/14 (patch 14, 24 blocks): builds with random weights and matches the reference."""
    bb = load_clip("ViT-L-14", None, DEVICE, share=False)
    assert bb.patch_size == (14, 14) and bb.depth == 24
    img = smooth_image(40, 60, 5)
    seg = Segmenter("background,cat,sofa", model=bb, mode="global", short_side=56, templates="single",
                    atp=("red", "striped"), background=None, progress=False)
    assert seg.preprocess(img).tokens == (4, 6)  # 56 x 84 pixels
    logits = seg.logits(img)
    assert logits.shape == (3, 40, 60) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference_segment(seg, img).logits, rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("resize,pos_interp", [("opencv", "size"), ("torch", "size")])
def test_protocol_choices_match_reference(vit_b16, class_embeddings, image, resize, pos_interp):
    """The other resize / positional-embedding choices (the default pair runs above)."""
    pytest.importorskip("cv2", reason="the 'published' extra (opencv-python-headless) is not installed")
    seg = make(vit_b16, class_embeddings, mode="global", resize=resize, pos_interp=pos_interp)
    logits, labels, _ = fast_run(seg, image)
    ref = reference_segment(seg, image)
    assert_agree(logits, labels, ref.logits, ref.labels)
    published = make(vit_b16, class_embeddings, mode="global", resize=resize).logits(image)
    assert (published - logits).abs().max() > 10 * LOGIT_ATOL  # the choice is visible in the result


def test_max_over_synonyms_matches_reference(vit_b16, class_embeddings, image):
    """synonyms="max": one text row per synonym; a class's probability is its best synonym's.
    Rows 3 and 4 both belong to class 3 ("grass; lawn")."""
    seg = Segmenter(CLASSES, model=vit_b16, **{**SMALL, "mode": "global", "synonyms": "max", "background": "entropy"})
    assert seg.owner.tolist() == [0, 1, 2, 3, 3] and seg.text.shape[0] == 5
    rows = torch.cat([class_embeddings, F.normalize(class_embeddings[1] + class_embeddings[2], dim=0)[None]])
    seg.text = rows.to(seg.device)  # distribution_text follows: [text rows, ATP rows]
    result = next(iter(seg.results([image])))
    labels = seg.label_map(result)
    ref = reference_segment(seg, image)
    assert float(result.threshold) == pytest.approx(float(ref.threshold), rel=1e-4)
    assert_agree(seg.logits(image), labels, ref.logits, ref.labels, min_classes=1)
    assert result.window_logits.shape[1] == 5 and seg.logits(image).shape[0] == 4
    argmax = reference_labels(ref.logits, None)  # per-class logits: the best synonym's
    assert (argmax == 3).any() and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_pamr_matches_reference(vit_b16, class_embeddings, image):
    seg = make(vit_b16, class_embeddings, mode="global", pamr_steps=3, pamr_dilations=(1, 2))
    logits, labels, _ = fast_run(seg, image)
    ref = reference_segment(seg, image)
    assert_agree(logits, labels, ref.logits, ref.labels)
    plain = make(vit_b16, class_embeddings, mode="global").logits(image)
    assert (plain - logits).abs().max() > 10 * LOGIT_ATOL
