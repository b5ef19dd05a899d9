"""The real CLIP pipeline (random weights, tiny windows) inside the evaluation loop.

Fails, rather than skips, if cdam_fast.pipeline.Segmenter cannot be imported: `cdam-fast eval`
depends on it.
"""
import numpy as np

from cdam_fast.evaluation.datasets import open_dataset
from cdam_fast.evaluation.predictors import pipeline_config, segmenter_predictor
from cdam_fast.evaluation.runner import evaluate
from test_eval_support import build_dataset, expected_label


def test_segmenter_predictions_are_scored_at_original_size(tmp_path):
    pairs = build_dataset("voc21", tmp_path / "voc", n=2, shapes=[(40, 56), (48, 32)])
    ds = open_dataset("voc21", tmp_path / "voc")
    config = pipeline_config(ds, method="maskclip", cdam=True, model="ViT-S-16", pretrained="none")
    assert config["background"] == "entropy"  # VOC21 has a background class
    # small protocol so that the test stays quick: 32-px windows of 2x2 patches
    predict = segmenter_predictor(ds, config, backend="reference", device="cpu", progress=False,
                                  templates="single", atp=["red", "striped"], crop=32, stride=16, short_side=32,
                                  long_side=64)
    result = evaluate(ds, predict, progress=False)
    # every scored pixel is counted once, in the row of its ground-truth class
    gt_hist = np.zeros(21, np.int64)
    for stored, _ in pairs.values():
        label = expected_label("voc21", stored)
        gt_hist += np.bincount(label[label != 255], minlength=21)
    np.testing.assert_array_equal(result.confusion.sum(axis=1), gt_hist)
    assert 0.0 <= result.scores.miou <= 1.0
