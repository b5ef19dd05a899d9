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
