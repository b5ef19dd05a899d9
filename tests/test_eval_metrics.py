"""mIoU / accuracy against hand-computed confusion matrices and an independent pixel count."""
import math

import numpy as np
import pytest

from cdam_fast.evaluation.metrics import (
    PredictionError, confusion_matrix, format_table, from_sparse, scores, to_sparse,
)


def test_hand_computed_confusion_and_scores():
    # 4 classes; class 2 is never predicted, class 3 appears nowhere; one pixel ignored.
    label = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 0]])
    conf = confusion_matrix(label, pred, 4)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 1] = 1
    np.testing.assert_array_equal(conf, expected)
    s = scores(conf)
    # class 0: I=1, U=2+1-1=2; class 1: I=2, U=2+4-2=4; class 2: I=0, U=1; class 3: no union
    np.testing.assert_allclose(s.iou[:3], [0.5, 0.5, 0.0])
    assert math.isnan(s.iou[3])
    assert s.miou == pytest.approx((0.5 + 0.5 + 0.0) / 3, abs=1e-15)
    assert s.aacc == pytest.approx(3 / 5, abs=1e-15)
    np.testing.assert_allclose(s.acc[:3], [0.5, 1.0, 0.0])
    assert s.macc == pytest.approx(0.5, abs=1e-15)


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    label = np.zeros((2, 2), np.int64)
    pred = np.array([[0, 0], [0, 1]])
    s = scores(confusion_matrix(label, pred, 3))
    assert s.iou[1] == 0.0 and math.isnan(s.iou[2])
    assert s.miou == pytest.approx((3 / 4 + 0.0) / 2, abs=1e-15)
    assert math.isnan(s.acc[1])  # accuracy is over ground-truth classes only


def test_dataset_level_sums_not_mean_of_images():
    # image A: class 0 perfect on 1 pixel; image B: class 0 on 3 pixels, all predicted 1.
    a = confusion_matrix(np.array([[0]]), np.array([[0]]), 2)
    b = confusion_matrix(np.array([[0, 0, 0]]), np.array([[1, 1, 1]]), 2)
    s = scores(a + b)
    # class 0: I=1, U=4; class 1: I=0, U=3 -> mIoU 0.125 (a per-image mean would give 0.25)
    assert s.miou == pytest.approx((1 / 4 + 0) / 2, abs=1e-15)


def test_random_against_pixel_loop():
    rng = np.random.default_rng(7)
    k = 6
    label = rng.integers(0, k, size=(23, 31))
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, k, size=label.shape)
    conf = confusion_matrix(label, pred, k)
    inter, gt_n, pr_n = [0.0] * k, [0.0] * k, [0.0] * k
    correct = total = 0
    for g, p in zip(label.ravel().tolist(), pred.ravel().tolist()):
        if g == 255:
            continue
        total += 1
        gt_n[g] += 1
        pr_n[p] += 1
        if g == p:
            inter[g] += 1
            correct += 1
    ious = [inter[c] / (gt_n[c] + pr_n[c] - inter[c]) for c in range(k) if gt_n[c] + pr_n[c] > 0]
    s = scores(conf)
    assert conf.sum() == total
    assert s.miou == pytest.approx(sum(ious) / len(ious), abs=1e-12)
    assert s.aacc == pytest.approx(correct / total, abs=1e-12)


def test_all_pixels_ignored_gives_nan_not_error():
    s = scores(confusion_matrix(np.full((2, 2), 255), np.zeros((2, 2), np.int64), 3))
    assert math.isnan(s.miou) and math.isnan(s.aacc)
    assert s.as_dict(["a", "b", "c"])["mIoU"] is None


def test_sparse_round_trip():
    rng = np.random.default_rng(1)
    conf = rng.integers(0, 3, size=(5, 5)) * (rng.random((5, 5)) < 0.3)
    triples = to_sparse(conf)
    assert all(n > 0 for _, _, n in triples)
    np.testing.assert_array_equal(from_sparse(triples, 5), conf)


def test_prediction_shape_must_match_label():
    with pytest.raises(PredictionError, match=r"shape \(2, 3\).*\(3, 2\).*original image size"):
        confusion_matrix(np.zeros((3, 2), np.int64), np.zeros((2, 3), np.int64), 2)


@pytest.mark.parametrize("bad", [-1, 2])
def test_prediction_out_of_range(bad):
    with pytest.raises(PredictionError, match=r"outside 0\.\.1"):
        confusion_matrix(np.zeros((1, 2), np.int64), np.array([[0, bad]]), 2)


def test_prediction_out_of_range_on_ignored_pixel_is_not_scored():
    conf = confusion_matrix(np.array([[0, 255]]), np.array([[0, 9]]), 2)
    assert conf.sum() == 1


def test_float_prediction_refused():
    with pytest.raises(PredictionError, match="integer"):
        confusion_matrix(np.zeros((1, 2), np.int64), np.zeros((1, 2)), 2)


def test_table_lists_every_class_and_summary():
    s = scores(confusion_matrix(np.array([[0, 1]]), np.array([[0, 0]]), 3))
    text = format_table(["bg", "cat", "dog"], s)
    assert "bg" in text and "50.00" in text  # bg: I=1, U=2
    assert text.splitlines()[-1].startswith("mIoU 25.00")  # (0.5 + 0) / 2; dog has no union
    dog = [line for line in text.splitlines() if line.startswith("dog")][0]
    assert "-" in dog and "0.00" not in dog
