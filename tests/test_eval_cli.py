"""`cdam-fast eval` and `cdam-fast make-coco-object` end to end, with the fake predictor."""
import json

import numpy as np
import pytest

from cdam_fast.cli import main
from cdam_fast.evaluation.predictors import background_setting
from cdam_fast.evaluation.metrics import scores
from test_eval_support import build_dataset, expected_confusion

FAKE = ["--predictor", "test_eval_support:channel_predictor", "--no-progress"]


def test_eval_prints_table_and_writes_json(tmp_path, capsys):
    pairs = build_dataset("context60", tmp_path / "ctx", n=3)
    rc = main(["eval", "--dataset", "context60", "--root", str(tmp_path / "ctx"), "--output", str(tmp_path / "o"), *FAKE])
    assert rc == 0
    out = capsys.readouterr().out
    expected = scores(expected_confusion("context60", pairs))
    assert f"mIoU {100 * expected.miou:5.2f}" in out
    assert "aeroplane" in out and "result.json" in out
    data = json.loads((tmp_path / "o" / "result.json").read_text())
    assert data["mIoU"] == pytest.approx(expected.miou, abs=1e-12)
    assert data["aAcc"] == pytest.approx(expected.aacc, abs=1e-12)


def test_eval_limit(tmp_path):
    pairs = build_dataset("voc20", tmp_path / "voc", n=4)
    rc = main(["eval", "--dataset", "voc20", "--root", str(tmp_path / "voc"), "--limit", "2",
               "--output", str(tmp_path / "o"), *FAKE])
    assert rc == 0
    data = json.loads((tmp_path / "o" / "result.json").read_text())
    first_two = {k: pairs[k] for k in sorted(pairs)[:2]}
    np.testing.assert_array_equal(np.array(data["confusion"]), expected_confusion("voc20", first_two))


def test_eval_missing_root(tmp_path, capsys):
    rc = main(["eval", "--dataset", "voc21", "--root", str(tmp_path / "absent"), *FAKE])
    assert rc == 2
    assert "absent" in capsys.readouterr().err


def test_eval_wrong_layout(tmp_path, capsys):
    build_dataset("cityscapes", tmp_path / "cs", n=2)
    rc = main(["eval", "--dataset", "ade20k", "--root", str(tmp_path / "cs"), *FAKE])
    assert rc == 2
    err = capsys.readouterr().err
    assert "images/validation" in err and "cityscapes" in err


def test_eval_label_out_of_range(tmp_path, capsys):
    pairs = build_dataset("cityscapes", tmp_path / "cs", n=2)
    from test_eval_support import write_pair
    write_pair("cityscapes", tmp_path / "cs", sorted(pairs)[0], np.array([[40, 1]]), np.array([[0, 0]]))
    rc = main(["eval", "--dataset", "cityscapes", "--root", str(tmp_path / "cs"), "--output", str(tmp_path / "o"), *FAKE])
    assert rc == 2
    assert "[40] outside 0..18" in capsys.readouterr().err


def test_background_setting():
    assert background_setting(None, True) == "entropy"
    assert background_setting(None, False) is None
    assert background_setting("none", True) is None
    assert background_setting("entropy-per-window", False) == "entropy-per-window"
    assert background_setting("0.3", True) == 0.3
    with pytest.raises(ValueError, match="--background"):
        background_setting("sometimes", True)


def test_make_coco_object_command(tmp_path, capsys):
    build_dataset("coco_stuff171", tmp_path, n=2)
    assert main(["make-coco-object", "--root", str(tmp_path)]) == 0
    assert "wrote 2" in capsys.readouterr().out
    assert len(list((tmp_path / "annotations" / "val2017").glob("*_instanceTrainIds.png"))) == 2
    assert main(["make-coco-object", "--root", str(tmp_path / "nope")]) == 2


def test_default_output_folder_names_the_run(tmp_path):
    from cdam_fast.evaluation.datasets import open_dataset
    from cdam_fast.evaluation.predictors import pipeline_config, run_name

    build_dataset("voc21", tmp_path / "voc", n=1)
    ds = open_dataset("voc21", tmp_path / "voc")
    a = pipeline_config(ds, method="sclip", cdam=False, model="ViT-B-16", pretrained="openai")
    b = pipeline_config(ds, method="sclip", cdam=False, model="ViT-B-16", pretrained="/w/ckpt.pt", mode="global")
    assert run_name("voc21", a) == "voc21-sclip-nocdam-ViT-B-16-openai"
    assert run_name("voc21", b) == "voc21-sclip-nocdam-ViT-B-16-ckpt.pt-global"
    with pytest.raises(ValueError, match="method"):
        pipeline_config(ds, method="clip", cdam=True, model="ViT-B-16", pretrained="openai")


def test_eval_prints_the_background_rule(tmp_path, capsys, monkeypatch):
    """The pipeline path (options -> config -> predictor), with the Segmenter swapped for the
    fake predictor: the stored config and the printed rule follow --preset and --background."""
    import cdam_fast.evaluation.cli as eval_cli
    from test_eval_support import channel_predictor

    seen = []
    monkeypatch.setattr(eval_cli, "segmenter_predictor",
                        lambda dataset, config, **kw: seen.append(config) or channel_predictor(dataset))
    build_dataset("voc21", tmp_path / "voc", n=1)
    base = ["eval", "--dataset", "voc21", "--root", str(tmp_path / "voc"), "--no-progress", "--pretrained", "none"]
    assert main([*base, "--output", str(tmp_path / "a")]) == 0
    assert "background rule: entropy threshold, one per image" in capsys.readouterr().out
    assert main([*base, "--preset", "cdam-voc21", "--output", str(tmp_path / "b")]) == 0
    assert "background rule: entropy threshold of the last window" in capsys.readouterr().out
    assert seen[1]["resize"] == "opencv" and seen[1]["synonyms"] == "max" and seen[1]["preset"] == "cdam-voc21"
    assert main([*base, "--background", "0.4", "--output", str(tmp_path / "c")]) == 0
    assert "background rule: fixed probability threshold 0.4" in capsys.readouterr().out
    assert main([*base, "--background", "otsu", "--output", str(tmp_path / "d")]) == 2
    assert "--background" in capsys.readouterr().err
