"""The evaluation loop: totals over the dataset, the JSON result, resumable per-image results."""
import json

import numpy as np
import pytest
import torch

from cdam_fast.evaluation.datasets import open_dataset
from cdam_fast.distributed import DistContext
from cdam_fast.evaluation.metrics import PredictionError
from cdam_fast.evaluation.runner import evaluate
from cdam_fast.evaluation.store import StoreError
from test_eval_support import build_dataset, channel_predictor, expected_confusion


class CountingPredictor:
    """The channel predictor, counting calls and optionally failing after `fail_after` images."""

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, image):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # what Ctrl-C looks like to the loop
        self.calls += 1
        return np.asarray(image)[..., 0].astype(np.int64)


@pytest.fixture
def voc(tmp_path):
    pairs = build_dataset("voc21", tmp_path / "voc", n=6, seed=3)
    return open_dataset("voc21", tmp_path / "voc"), pairs


def test_totals_match_independent_count(voc):
    ds, pairs = voc
    result = evaluate(ds, channel_predictor(ds), progress=False)
    np.testing.assert_array_equal(result.confusion, expected_confusion("voc21", pairs))
    assert result.num_images == 6


def test_result_json(voc, tmp_path):
    ds, pairs = voc
    result = evaluate(ds, channel_predictor(ds), output=tmp_path / "out", config={"method": "fake"}, progress=False)
    data = json.loads((tmp_path / "out" / "result.json").read_text())
    assert data["dataset"] == "voc21" and data["num_images"] == 6
    assert data["config"] == {"dataset": "voc21", "split": "val", "method": "fake"}
    assert data["mIoU"] == pytest.approx(result.scores.miou, abs=0)
    assert list(data["per_class"]) == ds.classes
    np.testing.assert_array_equal(np.array(data["confusion"]), expected_confusion("voc21", pairs))


def test_interrupted_run_continues_and_matches_uninterrupted(voc, tmp_path):
    ds, pairs = voc
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        evaluate(ds, CountingPredictor(fail_after=4), output=out, progress=False)
    assert not (out / "result.json").exists()
    second = CountingPredictor()
    result = evaluate(ds, second, output=out, progress=False)
    assert second.calls == 2  # only the images not scored before
    np.testing.assert_array_equal(result.confusion, expected_confusion("voc21", pairs))
    third = CountingPredictor()
    evaluate(ds, third, output=out, progress=False)
    assert third.calls == 0


def test_line_cut_short_is_redone(voc, tmp_path):
    ds, pairs = voc
    out = tmp_path / "out"
    evaluate(ds, CountingPredictor(), output=out, progress=False)
    lines_file = out / "images.rank0.jsonl"
    text = lines_file.read_text()
    lines_file.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # crash mid-line
    again = CountingPredictor()
    result = evaluate(ds, again, output=out, progress=False)
    assert again.calls == 1
    np.testing.assert_array_equal(result.confusion, expected_confusion("voc21", pairs))
    # the repaired file still reads back completely
    final = CountingPredictor()
    evaluate(ds, final, output=out, progress=False)
    assert final.calls == 0


def test_larger_limit_continues_smaller_run(tmp_path):
    pairs = build_dataset("ade20k", tmp_path / "ade", n=5)
    first = CountingPredictor()
    evaluate(open_dataset("ade20k", tmp_path / "ade", limit=2), first, output=tmp_path / "out", progress=False)
    rest = CountingPredictor()
    result = evaluate(open_dataset("ade20k", tmp_path / "ade"), rest, output=tmp_path / "out", progress=False)
    assert (first.calls, rest.calls) == (2, 3)
    np.testing.assert_array_equal(result.confusion, expected_confusion("ade20k", pairs))


def test_results_of_another_configuration_are_not_mixed_in(voc, tmp_path):
    ds, _ = voc
    out = tmp_path / "out"
    evaluate(ds, CountingPredictor(), output=out, config={"cdam": True}, progress=False)
    before = (out / "images.rank0.jsonl").read_text()
    with pytest.raises(StoreError, match=r"cdam: True there, False now.*--overwrite"):
        evaluate(ds, CountingPredictor(), output=out, config={"cdam": False}, progress=False)
    assert (out / "images.rank0.jsonl").read_text() == before  # nothing touched without asking
    again = CountingPredictor()
    evaluate(ds, again, output=out, config={"cdam": False}, overwrite=True, progress=False)
    assert again.calls == len(ds)
    assert json.loads((out / "run.json").read_text())["cdam"] is False


def test_output_that_is_a_file_is_refused(voc, tmp_path):
    ds, _ = voc
    (tmp_path / "f").write_text("mine")
    with pytest.raises(StoreError, match="not a folder"):
        evaluate(ds, CountingPredictor(), output=tmp_path / "f", progress=False)
    assert (tmp_path / "f").read_text() == "mine"


def test_wrong_prediction_shape_names_the_image(voc):
    ds, _ = voc
    with pytest.raises(PredictionError, match=rf"image '{ds[0].id}'.*original image size"):
        evaluate(ds, lambda image: np.zeros((3, 3), np.int64), progress=False)


def test_tensor_predictions_are_accepted(voc):
    ds, pairs = voc
    result = evaluate(ds, lambda image: torch.from_numpy(np.asarray(image)[..., 0].astype(np.int64)), progress=False)
    np.testing.assert_array_equal(result.confusion, expected_confusion("voc21", pairs))


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shards_cover_every_image_once(world):
    seen = sorted(i for r in range(world) for i in DistContext(rank=r, world_size=world).shard(10))
    assert seen == list(range(10))


def test_sharded_ranks_sum_to_single_process(voc, tmp_path):
    """Without a process group: each simulated rank scores its shard; the sums add up exactly."""
    ds, pairs = voc
    parts = [evaluate(ds, channel_predictor(ds), dist=DistContext(rank=r, world_size=3), progress=False).confusion
             for r in range(3)]
    np.testing.assert_array_equal(sum(parts), expected_confusion("voc21", pairs))


def test_a_label_map_of_another_size_than_its_image_names_both_files(tmp_path):
    from PIL import Image

    from cdam_fast.evaluation.datasets import DatasetError

    build_dataset("voc21", tmp_path / "voc", n=2)
    ds = open_dataset("voc21", str(tmp_path / "voc"))
    sample = ds[0]
    with Image.open(sample.label_path) as im:
        im.crop((0, 0, im.width, im.height - 4)).save(sample.label_path)
    with pytest.raises(DatasetError, match=f"{sample.label_path.name}.*{sample.image_path.name}"):
        ds.load_pair(sample)
    image, label = ds.load_pair(ds[1])
    assert label.shape == (image.height, image.width)
