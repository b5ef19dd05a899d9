"""`--method cliper` on the command lines: segment, eval (configuration and run names), and
the CLIPer rows of the published table."""
import json

import numpy as np
import pytest
from PIL import Image

from cdam_fast.cli import main
from cdam_fast.evaluation.cliper_table import CLIPER_PUBLISHED, TABLE_DATASETS
from cdam_fast.evaluation.predictors import pipeline_config, run_name
from cdam_fast.evaluation.datasets import DATASETS
from test_eval_support import build_dataset

# CLIPer's public README (ViT-B/16, its protocol, no sliding window), typed in again here
README = {None: (60.7, 34.7, 36.3), "sd": (66.4, 37.5, 39.2)}


def test_published_cliper_numbers():
    assert CLIPER_PUBLISHED == README and TABLE_DATASETS == ("voc21", "context60", "coco_object")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "a.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(path)
    return path


BASE = ["--classes", "background,cat,sofa", "--pretrained", "none", "--templates", "single", "--device", "cpu",
        "--short-side", "32", "--backend", "reference"]


def test_segment_cliper_with_cdam(image, tmp_path, capsys):
    rc = main(["segment", str(image), *BASE, "--method", "cliper", "--cdam", "--mode", "global",
               "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    labels = np.asarray(Image.open(tmp_path / "o" / "a_labels.png"))
    assert labels.shape == (40, 56)
    assert "cliper + CDAM" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--method", "sclip", "--protocol", "cliper-voc21"], "--method cliper only"),
    (["--method", "cliper", "--compensation", "sd"], "sd_weights"),
    (["--method", "cliper", "--compensation", "sd", "--sd-weights", "/no/such/sd"], "/no/such/sd"),
    (["--method", "cliper", "--sd-weights", "/x"], "--compensation sd"),
    (["--method", "cliper", "--protocol", "cliper"], "needs a dataset"),
    (["--method", "sclip", "--cliper-pipeline", "package"], "--method cliper only"),
    (["--method", "cliper", "--sliding-crop", "224"], "sliding_crop"),  # the package pipeline has no such windows
])
def test_segment_cliper_errors(image, tmp_path, capsys, argv, message):
    rc = main(["segment", str(image), *BASE, *argv, "--out", str(tmp_path / "o")])
    assert rc != 0
    assert message in capsys.readouterr().err


def test_eval_config_and_run_name():
    voc = type("D", (), {"spec": DATASETS["voc21"]})()
    plain = pipeline_config(voc, method="sclip", cdam=True, model="ViT-B-16", pretrained="openai")
    assert "protocol" not in plain  # other methods' stored configurations are unchanged
    cfg = pipeline_config(voc, method="cliper", cdam=False, model="ViT-B-16", pretrained="openai",
                          cliper=dict(protocol="cliper-voc21", cdam_combine="replace", compensation="sd",
                                      sd_weights="/w", sd_seed=0))
    assert cfg["mode"] == "global" and cfg["background"] is None and cfg["compensation"] == "sd"
    assert run_name("voc21", cfg) == "voc21-cliper-nocdam-ViT-B-16-openai-global-cliper-voc21-sd"
    from cdam_fast.pipeline.cliper_options import settings

    cfg = pipeline_config(voc, method="cliper", cdam=False, model="ViT-B-16", pretrained="openai",
                          cliper=settings("cliper-voc21", pipeline="package", sliding_crop=0))
    assert run_name("voc21", cfg) == "voc21-cliper-nocdam-ViT-B-16-openai-global-cliper-voc21-package-pipeline-slide0"


def test_eval_cliper_options_reach_the_config(tmp_path, capsys):
    build_dataset("voc21", tmp_path / "voc", n=2, seed=1)
    rc = main(["eval", "--dataset", "voc21", "--root", str(tmp_path / "voc"), "--method", "sclip",
               "--protocol", "cliper", "--no-progress"])
    assert rc == 2 and "--method cliper only" in capsys.readouterr().err
    rc = main(["eval", "--dataset", "voc21", "--root", str(tmp_path / "voc"), "--method", "cliper",
               "--compensation", "sd", "--sd-weights", str(tmp_path / "missing"), "--no-progress",
               "--pretrained", "none", "--device", "cpu", "--output", str(tmp_path / "o")])
    assert rc == 2 and str(tmp_path / "missing") in capsys.readouterr().err


def test_table_cliper_rows(tmp_path, capsys):
    from cdam_fast.evaluation.table import main as table_main

    build_dataset("voc21", tmp_path / "voc", n=2, seed=1)
    rc = table_main(["--voc21", str(tmp_path / "voc"), "--methods", "maskclip", "--cliper", "--sd-weights", "w",
                     "--output", str(tmp_path / "out"), "--no-progress",
                     "--predictor", "test_eval_support:table_predictor"])
    assert rc == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "method" not in line}
    assert rows["CLIPer (CLIPer protocol)"][1::2] == ["60.7", "34.7", "36.3"]
    assert rows["CLIPer + SD compensation (CLIPer protocol)"][1::2] == ["66.4", "37.5", "39.2"]
    assert rows["CLIPer + CDAM (CLIPer protocol)"][1::2] == ["-", "-", "-"]
    assert rows["CLIPer (CLIPer protocol)"][0] != "-" and rows["CLIPer (CLIPer protocol)"][2] == "-"
    data = json.loads((tmp_path / "out" / "published_table.json").read_text())
    assert len(data["cliper_rows"]) == 3
    # each CLIPer cell is its own resumable run (2 MaskCLIP cells + 3 CLIPer cells)
    assert len(list((tmp_path / "out").glob("*/result.json"))) == 5


def test_eval_predictor_builds_cliper_with_its_options():
    """The eval hook hands CLIPer's stored options to the Segmenter."""
    from cdam_fast.evaluation.predictors import segmenter_predictor
    from cdam_fast.pipeline.text import read_class_file
    from test_cliper import tiny_clip

    voc = type("D", (), {"spec": DATASETS["voc21"], "classes": read_class_file("voc21")})()
    cfg = pipeline_config(voc, method="cliper", cdam=True, model="tiny", pretrained="none", mode="global",
                          cliper=dict(protocol="mmseg", cdam_combine="average", compensation=None, sd_weights=None,
                                      sd_seed=0, normalisation="official"))
    seg = segmenter_predictor(voc, cfg, backbone=tiny_clip(), progress=False, templates="single", atp=["red"]).__self__
    assert (seg.method_name, seg.cdam, seg.cdam_combine, seg.normalisation) == ("cliper", True, "average", "official")
    assert seg.mode == "global" and seg.protocol is None and seg.background == "entropy"
