"""`cdam-fast segment` end to end on small images (random weights, CPU or the test device)."""
import numpy as np
import pytest
import torch
from PIL import Image

from cdam_fast.cli import build_parser, main
from cdam_fast.pipeline import Segmenter, load_clip
from cdam_fast.pipeline.bulk import check_not_inputs, output_files

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
        assert label_file.mode == "L" and label_file.size == src.size  # one byte per pixel, input size
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
    assert "street.jpg: 30x36, sclip:" in captured.out
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
    paths = output_files([a, b], tmp_path / "out")
    assert [p.name for pair in paths for p in pair] == ["x_labels.png", "x_overlay.png", "x-2_labels.png",
                                                       "x-2_overlay.png"]
    victim = tmp_path / "y_labels.png"
    victim.write_bytes(b"an input")
    with pytest.raises(Exception, match="would replace an input"):
        check_not_inputs([victim, tmp_path / "y.png"], output_files([tmp_path / "y.png"], tmp_path))


def test_segment_is_registered():
    parser = build_parser()
    args = parser.parse_args(["segment", "a.png", "--classes", "cat"])
    assert args.func.__module__ == "cdam_fast.pipeline.cli" and args.method == "maskclip" and not args.no_cdam
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "a.png"])  # --classes or --classes-file is required
