"""Pipeline pieces that need no model: window layouts and their assembly, class lists and
templates, background thresholds, image conversion, palette and files."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdam_fast import CdamInputError
from cdam_fast.pipeline import background as bg
from cdam_fast.pipeline import images, text, visualize, windows

SPEC = Path(__file__).resolve().parents[1] / "cdam_fast" / "data"  # the packaged spec lists (hermetic)


# -- windows ------------------------------------------------------------------------------
def _mmseg_boxes(H, W, crop, stride):
    """mmseg's slide_inference loop, written out: the independent definition of the layout."""
    h_grids = max(H - crop + stride - 1, 0) // stride + 1
    w_grids = max(W - crop + stride - 1, 0) // stride + 1
    boxes = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, H), min(x1 + crop, W)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    return boxes


@pytest.mark.parametrize("H,W,crop,stride", [(448, 448, 448, 224), (448, 597, 448, 224), (448, 1000, 448, 224),
                                             (68, 2048, 448, 224), (96, 160, 64, 32), (70, 101, 48, 32),
                                             (30, 50, 64, 32), (500, 500, 448, 448)])
def test_sliding_layout_matches_mmseg_loop(H, W, crop, stride):
    layout = windows.sliding_layout((H, W), crop, stride)
    got = [(y, x, y + layout.window[0], x + layout.window[1]) for y, x in layout.boxes()]
    assert got == _mmseg_boxes(H, W, crop, stride)


@pytest.mark.parametrize("hw,expected", [((480, 640), (448, 597)), ((640, 480), (597, 448)), ((448, 448), (448, 448)),
                                         ((100, 3000), (68, 2048)), ((10, 20), (448, 896))])
def test_protocol_size(hw, expected):
    # expected: short side -> 448 unless the long side would pass 2048, rounded half up
    assert windows.protocol_size(*hw) == expected


def test_global_size_is_whole_patches():
    for hw in [(480, 640), (37, 91), (100, 3000)]:
        h, w = windows.global_size(*hw, (16, 16))
        assert h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16
        ph, pw = windows.protocol_size(*hw)
        assert abs(h - ph) <= 8 and abs(w - pw) <= 8


def _published_assembly(window_logits, layout, original):
    """Per window: upsample to the window, add into a canvas with a count, divide, resize."""
    C = window_logits.shape[1]
    H, W = layout.size
    canvas = torch.zeros(C, H, W, dtype=torch.float64)
    count = torch.zeros(1, H, W, dtype=torch.float64)
    h, w = layout.window
    for lg, (y, x) in zip(window_logits, layout.boxes()):
        canvas[:, y:y + h, x:x + w] += F.interpolate(lg[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        count[:, y:y + h, x:x + w] += 1
    return F.interpolate((canvas / count)[None], size=original, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("size,crop,stride,patch,original", [
    ((64, 91), 48, 32, 16, (70, 100)),     # snapped starts not on the patch grid, resize back up
    ((448, 597), 448, 224, 16, (480, 640)),  # the published protocol
    ((68, 300), 64, 32, 16, (50, 222)),     # windows taller than the image: one row, shorter windows
    ((56, 84), 56, 28, 14, (56, 84)),       # ViT-L/14 patches, no final resize
])
def test_assembly_equals_per_window_order(size, crop, stride, patch, original):
    g = torch.Generator().manual_seed(7)
    layout = windows.sliding_layout(size, crop, stride)
    tokens = (layout.window[0] // patch, layout.window[1] // patch)
    wl = torch.randn(layout.count, 5, *tokens, generator=g, dtype=torch.float64)
    asm = windows.Assembler.build(layout, tokens, original, "cpu", torch.float64)
    expected = _published_assembly(wl, layout, original)
    torch.testing.assert_close(asm(wl), expected, rtol=1e-10, atol=1e-10)
    # labelling works on row chunks of the same product
    half = asm.half_apply(wl)
    torch.testing.assert_close(torch.cat([asm.rows_apply(half, a, a + 7) for a in range(0, original[0], 7)], dim=1),
                               expected, rtol=1e-10, atol=1e-10)


# -- class lists and templates ----------------------------------------------------------------
def test_parse_classes_synonyms_and_errors():
    cl = text.parse_classes("background, cat ,person; people; man")
    assert cl.names == ("background", "cat", "person")
    assert cl.synonyms[2] == ("person", "people", "man")
    assert text.parse_classes([["a", "b"], "c"]).synonyms == (("a", "b"), ("c",))
    for bad, match in [("", "empty"), ([], "empty"), ("cat,,dog", "entry 2"), ("cat, ;", "entry 2"),
                       ("cat,Cat", "twice"), (5, "comma-separated")]:
        with pytest.raises(CdamInputError, match=match):
            text.parse_classes(bad)


def test_read_class_file(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# my classes\nbackground\n\nperson; people\ncar\n")
    assert text.read_class_file(f).synonyms == (("background",), ("person", "people"), ("car",))
    voc = text.read_class_file("voc21")
    assert len(voc) == 21 and voc.names[0] == "background"
    assert voc.names == tuple((SPEC / "classes" / "voc21.txt").read_text().split("\n")[:21])
    with pytest.raises(CdamInputError, match="does not exist"):
        text.read_class_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(CdamInputError, match="no classes"):
        text.read_class_file(tmp_path / "empty.txt")


def test_atp_prompts_are_the_spec_list():
    spec = [ln.strip() for ln in (SPEC / "atp.txt").read_text().splitlines() if ln.strip()]
    assert text.atp_prompts() == tuple(spec) and len(spec) == 80


def test_templates(tmp_path):
    import open_clip

    t80 = text.resolve_templates(None)
    assert len(t80) == 80 and t80 == text.resolve_templates("openai")
    assert [t.replace("{}", "dog") for t in t80] == [f("dog") for f in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert text.resolve_templates("single") == ("a photo of a {}.",)
    f = tmp_path / "t.txt"
    f.write_text("a {} here\nitap of a {}\n")
    assert text.resolve_templates(f) == ("a {} here", "itap of a {}")
    with pytest.raises(CdamInputError, match="'{}'"):
        text.resolve_templates(["no slot"])
    with pytest.raises(CdamInputError, match="existing file"):
        text.resolve_templates("nope")


# -- background -----------------------------------------------------------------------------
def test_entropy_threshold_formula():
    g = torch.Generator().manual_seed(3)
    logits = 0.1 * torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    p = torch.softmax(50 * logits.reshape(-1, 5), -1)
    h = [-sum(float(pi) * math.log2(float(pi)) for pi in row) for row in p]
    expected = 0.5 * 2.5 / ((min(h) + max(h)) / 2)
    assert float(bg.entropy_threshold(logits)) == pytest.approx(expected, rel=1e-5)


def test_label_threshold_and_top_probability():
    g = torch.Generator().manual_seed(4)
    logits = 0.05 * torch.randn(4, 9, 11, generator=g)
    prob = torch.softmax(50 * logits, 0)
    torch.testing.assert_close(bg.top_probability(logits), prob.max(0).values)
    thr = float(prob.max(0).values.median())
    lab = bg.label(logits, thr)
    assert torch.equal(lab, torch.where(prob.max(0).values < thr, 0, prob.argmax(0)))
    assert 0 < int((lab == 0).sum()) < lab.numel()
    assert torch.equal(bg.label(logits, None), logits.argmax(0))


def test_check_background():
    assert bg.check_background("auto", ("Background", "cat")) == "entropy"
    assert bg.check_background("auto", ("cat", "background")) is None
    assert bg.check_background(0.3, ("a",)) == 0.3 and bg.check_background(None, ("a",)) is None
    for bad in ("otsu", 1.5, -0.1, float("nan"), True):
        with pytest.raises(CdamInputError, match="background"):
            bg.check_background(bad, ("a",))


# -- images ---------------------------------------------------------------------------------
def test_to_tensor_accepts_the_usual_types(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    Image.fromarray(arr).save(tmp_path / "x.png")
    for src in (arr, Image.fromarray(arr), tmp_path / "x.png", str(tmp_path / "x.png"), expected.clone(),
                torch.from_numpy(arr).permute(2, 0, 1).contiguous(), np.dstack([arr, arr[..., :1]])):
        torch.testing.assert_close(images.to_tensor(src), expected)
    gray = images.to_tensor(arr[..., 0])
    assert gray.shape == (3, 20, 30) and torch.equal(gray[0], gray[2])


def test_to_tensor_errors(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    cases = [(tmp_path / "missing.png", "does not exist"), (tmp_path / "bad.png", "cannot read"),
             (tmp_path, "not a file"), (np.zeros((3, 20, 30), np.uint8), "channels-last"),
             (torch.zeros(4, 5, 6), r"\[1\|3, H, W\]"), (torch.full((3, 4, 4), 2.0), r"\[0, 1\]"),
             (torch.full((3, 4, 4), float("nan")), "NaN"), ([1, 2], "must be a file path")]
    for src, match in cases:
        with pytest.raises(CdamInputError, match=match):
            images.to_tensor(src)


# -- visualisation --------------------------------------------------------------------------
def test_palette_distinct_and_black_background():
    pal = visualize.palette(256)
    assert tuple(pal[0]) == (0, 0, 0)
    assert len({tuple(c) for c in pal}) == 256
    assert tuple(pal[1]) == (128, 0, 0) and tuple(pal[2]) == (0, 128, 0)  # the VOC colours


def test_label_png_and_overlay(tmp_path):
    from PIL import Image

    labels = np.zeros((12, 20), np.uint8)
    labels[:, 10:] = 2
    visualize.save_labels(labels, tmp_path / "l.png")
    back = Image.open(tmp_path / "l.png")
    assert back.mode == "L" and np.array_equal(np.asarray(back), labels)
    img = np.full((12, 20, 3), 200, np.uint8)
    ov = visualize.overlay(img, labels, ["background", "cat", "sofa"])
    assert ov.height >= 12 and ov.width > 20  # legend to the right
    px = np.asarray(ov)
    assert tuple(px[0, 15]) == tuple(np.round(0.5 * 200 + 0.5 * visualize.palette(3)[2]).astype(np.uint8))
    assert visualize.class_shares(labels, ["background", "cat", "sofa"]) == [(0, "background", 0.5), (2, "sofa", 0.5)]


def test_label_png_depth_follows_the_class_count(tmp_path):
    """A 300-class run writes 16-bit maps whatever labels one image happens to contain, so all
    files of a run share one format; up to 256 classes every map is 8-bit."""
    from types import SimpleNamespace

    from PIL import Image

    from cdam_fast.pipeline import fileio

    names = [f"class{i}" for i in range(300)]
    seg = SimpleNamespace(classes=text.parse_classes(names), class_names=tuple(names), method_name="maskclip",
                          cdam=True, backbone=SimpleNamespace(name="m", source="random"), mode="window",
                          background=None)
    image = np.zeros((6, 9, 3), np.uint8)
    low, high = np.zeros((6, 9), np.int64), np.zeros((6, 9), np.int64)
    low[:, 4:], high[:, 4:] = 7, 299
    for tag, labels in (("low", low), ("high", high)):
        paths = fileio.output_paths([tmp_path / f"{tag}.png"], tmp_path / "out")[0]
        fileio.write_outputs(seg, tag, image, labels, paths)
        back = Image.open(paths.labels)
        assert back.mode.startswith("I;16"), (tag, back.mode)
        np.testing.assert_array_equal(np.asarray(back), labels)
    visualize.save_labels(low.astype(np.uint8), tmp_path / "few.png", n_classes=8)
    assert Image.open(tmp_path / "few.png").mode == "L"
    with pytest.raises(ValueError, match="must lie in"):
        visualize.save_labels(high, tmp_path / "bad.png", n_classes=256)


# -- protocol choices: resize, presets, options, synonyms, PAMR ------------------------------
def test_opencv_resize_is_cv2_inter_linear_on_uint8():
    cv2 = pytest.importorskip("cv2", reason="the 'published' extra (opencv-python-headless) is not installed")
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pixels = torch.from_numpy(arr).permute(2, 0, 1)
    got = images.resize(pixels, (61, 45), "opencv")  # (H, W): cv2 takes (W, H)
    expected = cv2.resize(arr, (45, 61), interpolation=cv2.INTER_LINEAR)
    assert got.shape == (3, 61, 45) and got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)  # whole grey levels
    torch_way = images.resize(pixels, (61, 45), "torch")
    diff = (torch_way - got).abs().max() * 255
    assert 0.2 < diff <= 1.0  # the float resize differs by up to about one grey level
    assert torch.equal(images.resize(pixels, (37, 53), "opencv"), pixels.float() / 255)


def test_opencv_resize_missing_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    with pytest.raises(CdamInputError, match=r"cdam-fast\[clip\]"):
        images.resize(torch.zeros(3, 4, 4, dtype=torch.uint8), (8, 8), "opencv")
    with pytest.raises(CdamInputError, match="resize must be"):
        images.resize(torch.zeros(3, 4, 4), (8, 8), "pillow")
    from cdam_fast.pipeline import Segmenter

    with pytest.raises(CdamInputError, match=r"cdam-fast\[clip\]"):  # before any model load
        Segmenter("a,b", model="no-such-model", resize="opencv")
    with pytest.raises(CdamInputError, match=r"cdam-fast\[clip\].*resize='torch'"):  # the default needs it too
        Segmenter("a,b", model="no-such-model")


def test_defaults_are_the_published_protocol():
    """Segmenter's defaults (and so the CLI's and eval's, which read them) are the published
    protocol: the cdam-* presets differ from them only in the background rule."""
    import argparse
    import inspect
    import re

    from cdam_fast.pipeline import options, presets
    from cdam_fast.pipeline.cliper import CliperSegmenter
    from cdam_fast.pipeline.segmenter import Segmenter

    params = inspect.signature(Segmenter.__init__).parameters
    assert {k: params[k].default for k in presets.PUBLISHED_PROTOCOL} == presets.PUBLISHED_PROTOCOL
    defaults = options.segmenter_defaults()
    for name in ("cdam-voc21", "cdam-ade20k"):
        differ = {k for k, v in presets.preset(name).items() if defaults.get(k) != v}
        assert differ <= {"background"}, (name, differ)
    p = argparse.ArgumentParser()
    options.add_model_options(p)
    options.add_protocol_options(p)
    chosen = options.segmenter_options(p.parse_args([]))
    assert {k: chosen[k] for k in presets.PUBLISHED_PROTOCOL} == presets.PUBLISHED_PROTOCOL
    assert options.segmenter_options(p.parse_args(["--resize", "torch"]))["resize"] == "torch"  # still a choice
    # CLIPer takes one embedding per class: its own default stays "mean"
    assert inspect.signature(CliperSegmenter.__init__).parameters["synonyms"].default == "mean"
    assert options.segmenter_defaults("cliper")["synonyms"] == "mean"
    with pytest.raises(CdamInputError, match="one text embedding per class"):
        Segmenter("background,cat; kitten", model="no-such-model", method="cliper", synonyms="max")
    # OpenCV comes with the pipeline's extra, which the default needs
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    clip = re.search(r'"clip": \[([^\]]*)\]', setup).group(1)
    assert "PUBLISHED" in clip and re.search(r'PUBLISHED = \["opencv-python-headless"\]', setup)


def test_missing_opencv_is_named_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import sys

    from cdam_fast.cli import main

    monkeypatch.setitem(sys.modules, "cv2", None)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("cdam_fast.pipeline.segmenter.load_clip", no_model)
    rc = main(["segment", str(tmp_path / "a.png"), "--classes", "cat,sofa", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "cdam-fast[clip]" in err and "--resize torch" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_to_pixels_keeps_uint8():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    px = images.to_pixels(arr)
    assert px.dtype == torch.uint8 and torch.equal(px, torch.from_numpy(arr).permute(2, 0, 1))
    assert images.to_pixels(arr.astype(np.float32) / 255).dtype == torch.float32


def test_presets_are_valid_segmenter_settings():
    import inspect

    from cdam_fast.pipeline import presets
    from cdam_fast.pipeline.segmenter import MODES, Segmenter

    params = inspect.signature(Segmenter.__init__).parameters
    for name, values in presets.PRESETS.items():
        assert set(values) <= set(params), name
        assert values["resize"] in presets.RESIZES and values["pos_interp"] in presets.POS_INTERPOLATIONS
        assert values["synonyms"] in presets.SYNONYM_RULES and values["mode"] in MODES
        bg.check_background(values["background"], ("background",))
    voc = presets.preset("cdam-voc21")
    # spec section 4 and the issue: the published protocol, written out
    assert voc == dict(method="maskclip", cdam=True, mode="window", short_side=448, long_side=2048, crop=448,
                       stride=224, logit_scale=50.0, resize="opencv", pos_interp="published", synonyms="max",
                       pamr_steps=0, background="entropy-per-window")
    voc["crop"] = 1
    assert presets.preset("cdam-voc21")["crop"] == 448  # a copy
    with pytest.raises(CdamInputError, match="preset must be one of"):
        presets.preset("cdam-voc22")


def test_options_precedence_flag_over_preset_over_default():
    import argparse

    from cdam_fast.pipeline import options

    p = argparse.ArgumentParser()
    options.add_model_options(p)
    options.add_protocol_options(p)
    plain = options.segmenter_options(p.parse_args([]))
    assert plain == options.segmenter_defaults()
    assert plain["background"] == "auto" and plain["resize"] == "opencv" and plain["pos_interp"] == "published"
    assert plain["synonyms"] == "max"
    got = options.segmenter_options(p.parse_args(["--preset", "naclip-context60", "--stride", "100", "--no-cdam",
                                                  "--background", "none"]))
    assert got["method"] == "naclip" and got["stride"] == 100 and got["crop"] == 224 and got["pamr_steps"] == 10
    assert got["background"] is None and got["cdam"] is False
    assert options.segmenter_options(p.parse_args(["--background", "0.25"]))["background"] == 0.25
    with pytest.raises(CdamInputError, match="--background"):
        options.segmenter_options(p.parse_args(["--background", "otsu"]))
    assert options.model_options(p.parse_args(["--pretrained", "None"]))["pretrained"] is None


def test_synonym_rule_max_over_probabilities():
    g = torch.Generator().manual_seed(5)
    logits = 0.05 * torch.randn(5, 6, 7, generator=g, dtype=torch.float64)
    owner = torch.tensor([0, 1, 1, 2, 1])  # class 1 has three synonyms
    prob = torch.softmax(50 * logits, 0)  # over every synonym row
    cls_prob = torch.stack([prob[owner == c].max(0).values for c in range(3)])
    for thr in (None, float(cls_prob.max(0).values.median())):
        expected = cls_prob.argmax(0)
        if thr is not None:
            expected = torch.where(cls_prob.max(0).values < thr, 0, expected)
        assert torch.equal(bg.label(logits, thr, 50.0, owner), expected)
    per_class = bg.class_logits(logits, owner, 3)
    torch.testing.assert_close(per_class, torch.stack([logits[owner == c].max(0).values for c in range(3)]))
    assert bg.class_logits(logits, None, 5) is logits


def _pamr_loops(image, mask, steps, dilations):
    """PAMR written out pixel by pixel (float64): the definition in pamr.py's docstring."""
    K, H, W = image.shape
    C = mask.shape[0]
    offs = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    at = lambda t, y, x: t[:, min(max(y, 0), H - 1), min(max(x, 0), W - 1)]  # noqa: E731  (replicated border)
    aff = np.zeros((len(offs), H, W))
    for y in range(H):
        for x in range(W):
            window = [at(image, y + dy * d, x + dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            sigma = np.std(np.stack(window), axis=0, ddof=1)  # per channel
            scores = [np.mean(-np.abs(image[:, y, x] - at(image, y + oy, x + ox)) / (1e-8 + 0.1 * sigma))
                      for oy, ox in offs]
            e = np.exp(np.array(scores) - max(scores))
            aff[:, y, x] = e / e.sum()
    for _ in range(steps):
        new = np.zeros((C, H, W))
        for y in range(H):
            for x in range(W):
                for p, (oy, ox) in enumerate(offs):
                    new[:, y, x] += aff[p, y, x] * at(mask, y + oy, x + ox)
        mask = new
    return mask


def test_pamr_matches_the_written_out_definition():
    from cdam_fast.pipeline.pamr import pamr

    rng = np.random.default_rng(2)
    image = rng.normal(size=(3, 9, 11))
    image[:, :, :5] += 2.0  # an edge PAMR should respect
    mask = rng.normal(size=(4, 9, 11))
    expected = _pamr_loops(image, mask, 3, (1, 3))
    got = pamr(torch.from_numpy(image), torch.from_numpy(mask), steps=3, dilations=(1, 3))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-5)
    assert np.abs(expected - mask).max() > 0.1  # it does change the mask
    torch.testing.assert_close(pamr(torch.from_numpy(image), torch.from_numpy(mask), steps=0),
                               torch.from_numpy(mask).float())
    for kwargs, match in [(dict(steps=-1), "steps"), (dict(dilations=(0,)), "dilations"), (dict(dilations=()), "dilations")]:
        with pytest.raises(CdamInputError, match=match):
            pamr(torch.from_numpy(image), torch.from_numpy(mask), **kwargs)
    with pytest.raises(CdamInputError, match="share H, W"):
        pamr(torch.zeros(3, 4, 5), torch.zeros(2, 4, 6))
