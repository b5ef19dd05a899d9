"""`cdam-fast segment` end to end on small images (random weights, CPU or the test device)."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cdam_fast.cli import build_parser, main
from cdam_fast.pipeline import Segmenter, load_clip
from cdam_fast.pipeline.bulk import check_not_inputs, read_manifest
from cdam_fast.pipeline.fileio import output_paths

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# a reduced protocol keeps it quick: short side 64, windows of 48 at stride 32
PROTOCOL = dict(short_side=64, crop=48, stride=32)
BASE = ["--classes", "background,cat,sofa", "--pretrained", "none", "--templates", "single", "--background", "none",
        "--device", DEVICE.type, "--short-side", "64", "--crop", "48", "--stride", "32"]


@pytest.fixture(scope="session")
def vit_b16():
    # the CLI's load_clip("ViT-B-16", None, device) returns this same object while it is alive
    return load_clip("ViT-B-16", None, DEVICE)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in [("kitchen.png", (40, 56)), ("street.jpg", (36, 30))]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_segment_end_to_end(vit_b16, images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["segment", *map(str, images), *BASE, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = [ln for ln in captured.out.splitlines() if ln.strip()]
    assert len(lines) == 2 and "kitchen.png: 56x40, maskclip + CDAM" in lines[0] and "street.jpg" in lines[1]
    assert "2/2" in captured.err  # the progress bar over images
    seg = Segmenter("background,cat,sofa", model=vit_b16, pretrained=None, templates="single", background=None,
                    progress=False, **PROTOCOL)
    for img, stem in zip(images, ("kitchen", "street")):
        label_file = Image.open(out / f"{stem}_labels.png")
        src = Image.open(img)
        assert label_file.mode == "P" and label_file.size == src.size  # one byte per pixel, input size
        labels = np.asarray(label_file)
        assert np.array_equal(labels, seg.predict(img))  # the CLI writes what the Python API predicts
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.height >= src.height and overlay.width > src.width  # legend on the right
        assert f"{stem}_labels.png" in captured.out


def test_segment_global_mode_other_method(vit_b16, images, tmp_path, capsys):
    rc = main(["segment", str(images[1]), *BASE, "--out", str(tmp_path / "o"), "--mode", "global", "--method", "sclip",
               "--no-cdam", "--backend", "reference"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "street.jpg: 30x36, sclip, ViT-B-16 [random weights (seed 0)]:" in captured.out  # weights named
    assert Image.open(tmp_path / "o" / "street_labels.png").size == (30, 36)


def test_segment_errors_and_no_silent_overwrite(vit_b16, images, tmp_path, capsys):
    out = tmp_path / "out"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
    rest = BASE[2:] + ["--out", str(out)]  # everything but --classes
    cases = [
        ([str(tmp_path / "missing.png"), *BASE, "--out", str(out)], "missing.png' does not exist"),
        ([str(images[0]), "--classes", "", *rest], "class list is empty"),
        ([str(images[0]), "--classes", "cat,,dog", *rest], "entry 2"),
        ([str(images[0]), "--classes-file", str(tmp_path / "none.txt"), *rest], "none.txt' does not exist"),
        ([str(images[0]), *BASE, "--out", str(out), "--model", "ViT-Q-99"], "unknown open_clip model name"),
        ([str(tmp_path / "tiny.png"), *BASE, "--out", str(out)], "smaller than one 16x16 patch"),
    ]
    for argv, message in cases:
        rc = main(["segment", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (argv, err)
    # an existing output is not replaced without --overwrite (stdin is not a terminal here)
    out.mkdir(exist_ok=True)
    (out / "street_labels.png").write_bytes(b"keep me")
    rc = main(["segment", str(images[1]), *BASE, "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "street_labels.png").read_bytes() == b"keep me"
    assert main(["segment", str(images[1]), *BASE, "--out", str(out), "--overwrite"]) == 0
    assert Image.open(out / "street_labels.png").size == (30, 36)


def test_output_names_never_collide(tmp_path):
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg"
    paths = output_paths([a, b], tmp_path / "out")
    assert [p.name for pair in paths for p in pair] == ["x_labels.png", "x_overlay.png", "x_classes.json",
                                                       "x-2_labels.png", "x-2_overlay.png", "x-2_classes.json"]
    victim = tmp_path / "y_labels.png"
    victim.write_bytes(b"an input")
    with pytest.raises(Exception, match="would replace an input"):
        check_not_inputs([victim, tmp_path / "y.png"], output_paths([tmp_path / "y.png"], tmp_path))


def test_segment_is_registered():
    parser = build_parser()
    args = parser.parse_args(["segment", "a.png", "--classes", "cat"])
    from cdam_fast.pipeline.options import segmenter_options

    opts = segmenter_options(args)  # unset flags resolve to the preset's, then Segmenter's defaults
    assert args.func.__module__ == "cdam_fast.pipeline.cli" and opts["method"] == "maskclip" and opts["cdam"]
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "a.png"])  # --classes or --classes-file is required


# -- batches with bad images, outputs, flags (the tiny model keeps these quick) ---------------------
from cdam_fast.pipeline import fileio, visualize  # noqa: E402
from tiny_clip import register_tiny_clip  # noqa: E402

TINY = ["--classes", "background,cat,sofa", "--pretrained", "none", "--templates", "single", "--background", "none",
        "--device", "cpu", "--short-side", "64", "--crop", "48", "--stride", "32", "--cache-dir", "off"]


@pytest.fixture(scope="module")
def tiny_model():
    name = register_tiny_clip()
    return name, load_clip(name, None, "cpu")  # kept alive: the CLI's load_clip returns this object


def test_bad_images_cost_only_themselves(tiny_model, images, tmp_path, capsys):
    name, _ = tiny_model
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    Image.fromarray(np.zeros((8, 40, 3), np.uint8)).save(tmp_path / "thin.png")
    Image.fromarray(np.zeros((32, 32), np.float32)).save(tmp_path / "float.tif")  # fails when decoded, not before
    argv = [str(images[0]), str(tmp_path / "broken.jpg"), str(tmp_path / "missing.png"), str(tmp_path / "thin.png"),
            str(tmp_path / "float.tif"), str(images[1])]
    out = tmp_path / "out"
    rc = main(["segment", *argv, *TINY, "--model", name, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # non-zero at the end, after every good image was written
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}{k}" for s in ("kitchen", "street") for k in ("_labels.png", "_overlay.png", "_classes.json")]
        + ["manifest.rank0.jsonl", "segment.json"])
    failed = [r for r in read_manifest(out) if r["status"] == "failed"]  # every failure recorded, named
    assert [os.path.basename(r["image"]) for r in failed] == ["broken.jpg", "missing.png", "thin.png", "float.tif"]
    assert "6 images: 2 done, 0 skipped (already done), 4 failed" in captured.err
    summary = captured.err.split("4 image(s) failed:")[1]
    for message in ("broken.jpg': cannot identify image", "missing.png' does not exist",
                    "thin.png' is 40x8 pixels (W x H), smaller than one 16x16 patch", "float.tif': floating-point"):
        assert message in summary, message
    assert "image 0" not in captured.err and "Traceback" not in captured.err
    assert "kitchen.png: 56x40" in captured.out and "street.jpg: 30x36" in captured.out


def test_nothing_to_segment_loads_no_model_and_leaves_no_folder(tiny_model, tmp_path, capsys, monkeypatch):
    name, _ = tiny_model

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("cdam_fast.pipeline.segmenter.load_clip", no_model)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
    out = tmp_path / "new" / "out"
    rc = main(["segment", str(tmp_path / "tiny.png"), str(tmp_path / "gone.png"), *TINY, "--model", name,
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "no image can be segmented" in err and "tiny.png' is 8x8 pixels" in err
    assert not (tmp_path / "new").exists()


def test_outputs_class_mapping_and_palette(tiny_model, images, tmp_path, capsys):
    import json

    name, _ = tiny_model
    f = tmp_path / "classes.txt"
    f.write_text("background\ncat; kitten,sofa\n")
    rc = main(["segment", str(images[0]), *TINY[2:], "--classes-file", str(f), "--model", name,
               "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "warning" in captured.err and "'cat; kitten,sofa'" in captured.err and "ONE class" in captured.err
    mapping = json.loads((tmp_path / "o" / "kitchen_classes.json").read_text())
    assert [(c["value"], c["name"], c["synonyms"]) for c in mapping["classes"]] == [
        (0, "background", ["background"]), (1, "cat", ["cat", "kitten,sofa"])]
    assert mapping["weights"] == "random weights (seed 0)" and mapping["model"] == name
    assert mapping["size"] == {"width": 56, "height": 40}
    label_png = Image.open(tmp_path / "o" / "kitchen_labels.png")
    pal = np.array(label_png.getpalette()[:6]).reshape(2, 3)
    assert np.array_equal(pal, visualize.palette(2))  # the overlay's colours
    for c in mapping["classes"]:
        assert c["color"] == visualize.palette(2)[c["value"]].tolist()
    assert f"{name} [random weights (seed 0)]" in captured.out


def test_flags_reach_the_pipeline(tiny_model, images, tmp_path, capsys, monkeypatch):
    import cdam_fast.pipeline.segmenter as segmenter_module

    name, _ = tiny_model
    calls = []
    real = segmenter_module.load_clip

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(segmenter_module, "load_clip", spy)
    cache = tmp_path / "cache"
    rc = main(["segment", str(images[1]), *TINY[:-2], "--model", name, "--out", str(tmp_path / "o"), "--quick-gelu",
               "--cache-dir", str(cache)])
    assert rc == 0, capsys.readouterr().err
    assert calls[-1]["quick_gelu"] is True
    assert any(cache.rglob("*.emb"))  # the text embeddings went to --cache-dir
    parser = build_parser()
    assert parser.parse_args(["segment", "a.png", "--classes", "cat", "--no-quick-gelu"]).quick_gelu is False
    assert parser.parse_args(["segment", "a.png", "--classes", "cat"]).quick_gelu is None
    ev = parser.parse_args(["eval", "--dataset", "voc21", "--root", ".", "--templates", "single", "--quick-gelu"])
    assert ev.templates == "single" and ev.quick_gelu is True
    seg_help = parser._subparsers._group_actions[0].choices["segment"].format_usage()
    assert "--templates" in seg_help and "--classes CLASSES | --classes-file F" in seg_help


def test_not_a_checkpoint_and_missing_open_clip(tiny_model, images, tmp_path, capsys, monkeypatch):
    name, _ = tiny_model
    (tmp_path / "weights.pt").write_text("these are not weights")
    rc = main(["segment", str(images[0]), *TINY[:2], "--pretrained", str(tmp_path / "weights.pt"), *TINY[4:],
               "--model", name, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "is not a model checkpoint" in err and "Traceback" not in err and len(err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if the [clip] extra were not installed
    rc = main(["segment", str(images[0]), *BASE, "--templates", "openai", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "pip install 'cdam-fast[clip]'" in err and len(err.splitlines()) == 1


def test_eval_without_open_clip_prints_the_hint(tmp_path, capsys, monkeypatch):
    from test_eval_support import build_dataset

    build_dataset("voc21", tmp_path / "voc", n=1)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    rc = main(["eval", "--dataset", "voc21", "--root", str(tmp_path / "voc"), "--output", str(tmp_path / "e"),
               "--no-progress", "--pretrained", "none"])
    err = capsys.readouterr().err
    assert rc == 1 and "pip install 'cdam-fast[clip]'" in err and "Traceback" not in err
    from cdam_fast.evaluation.table import main as table_main

    rc = table_main(["--voc21", str(tmp_path / "voc"), "--limit", "1", "--pretrained", "none", "--no-progress",
                     "--output", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 1 and "pip install 'cdam-fast[clip]'" in err


def test_predict_names_the_image_and_write_outputs(tiny_model, images, tmp_path):
    name, backbone = tiny_model
    seg = Segmenter("background,cat", model=backbone, templates="single", progress=False, cache_dir=False,
                    **PROTOCOL)
    with pytest.raises(Exception, match="'holiday.png' is 8x8 pixels"):
        seg.predict(np.zeros((8, 8, 3), np.uint8), name="'holiday.png'")
    paths = output_paths([images[0]], tmp_path / "o")[0]
    labels = seg.predict(images[0])
    fileio.write_outputs(seg, str(images[0]), np.asarray(Image.open(images[0]).convert("RGB")), labels, paths)
    assert np.array_equal(np.asarray(Image.open(paths.labels)), labels) and Image.open(paths.overlay).width > 56
    assert json.loads(paths.classes.read_text())["size"] == {"width": 56, "height": 40}
