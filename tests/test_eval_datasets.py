"""Readers of the standard layouts: pairing, label conventions, class lists and clear errors."""
import numpy as np
import pytest
from PIL import Image

from cdam_fast.evaluation.coco_object import make_coco_object_labels, stuff_to_object
from cdam_fast.evaluation.datasets import DATASETS, DatasetError, open_dataset
from test_eval_support import build_dataset, expected_label, write_id_file, write_pair

ALL = sorted(DATASETS)


@pytest.mark.parametrize("name", ALL)
def test_reader_pairs_images_and_applies_label_conventions(tmp_path, name):
    pairs = build_dataset(name, tmp_path, n=3, seed=ALL.index(name))
    ds = open_dataset(name, tmp_path)
    assert [s.id for s in ds.samples] == sorted(pairs)
    assert len(ds.classes) == ds.num_classes == DATASETS[name].num_classes
    for sample in ds.samples:
        stored, pred = pairs[sample.id]
        label = ds.load_label(sample)
        assert label.dtype == np.int64
        np.testing.assert_array_equal(label, expected_label(name, stored))
        image = np.asarray(ds.load_image(sample))
        assert image.shape == stored.shape + (3,)
        np.testing.assert_array_equal(image[..., 0], pred)


@pytest.mark.parametrize("name", ["voc20", "context59", "ade20k"])
def test_reduce_zero_label_ignores_zero_and_shifts(tmp_path, name):
    stored = np.array([[0, 1, 2], [255, 5, 0]])
    write_pair(name, tmp_path, "a", stored, np.zeros_like(stored))
    write_id_file(name, tmp_path, ["a"])
    ds = open_dataset(name, tmp_path)
    np.testing.assert_array_equal(ds.load_label(ds[0]), [[255, 0, 1], [255, 4, 255]])


def test_voc_reads_palette_indices_not_colours(tmp_path):
    stored = np.array([[0, 15, 255], [20, 1, 0]])
    write_pair("voc21", tmp_path, "a", stored, np.zeros_like(stored))
    write_id_file("voc21", tmp_path, ["a"])
    ds = open_dataset("voc21", tmp_path)
    assert Image.open(ds[0].label_path).mode == "P"
    np.testing.assert_array_equal(ds.load_label(ds[0]), stored)


def test_voc_uses_only_ids_in_split_file(tmp_path):
    pairs = build_dataset("voc21", tmp_path, n=4)
    keep = sorted(pairs)[1:3]
    write_id_file("voc21", tmp_path, keep)
    assert [s.id for s in open_dataset("voc21", tmp_path).samples] == keep


def test_cityscapes_pairs_across_city_folders(tmp_path):
    pairs = build_dataset("cityscapes", tmp_path, n=4)
    ds = open_dataset("cityscapes", tmp_path)
    assert {s.id.split("/")[0] for s in ds.samples} == {"aachen", "bonn"}
    for s in ds.samples:
        assert s.label_path.name == s.id.split("/")[1] + "_gtFine_labelTrainIds.png"
        assert s.label_path.parent.name == s.id.split("/")[0]
    assert len(ds) == len(pairs)


def test_limit_keeps_first_images_in_sorted_order(tmp_path):
    pairs = build_dataset("ade20k", tmp_path, n=5)
    assert [s.id for s in open_dataset("ade20k", tmp_path, limit=2).samples] == sorted(pairs)[:2]


def test_class_lists_match_their_counts_and_each_other():
    names = {n: DATASETS[n].class_names() for n in ALL}
    for n, classes in names.items():
        assert len(classes) == DATASETS[n].num_classes, n
        assert len(set(classes)) == len(classes), f"{n} has duplicate class names"
    assert names["voc20"] == names["voc21"][1:]
    assert names["context59"] == names["context60"][1:]
    assert names["voc21"][0] == names["context60"][0] == "background"
    # COCO-Object's 80 things are COCO-Stuff's first 80 classes, after its background entry
    assert names["coco_object"][1:] == names["coco_stuff171"][:80]
    assert names["cityscapes"][:3] == ["road", "sidewalk", "building"]
    assert names["ade20k"][:3] == ["wall", "building", "sky"] and names["ade20k"][-1] == "flag"


# --- errors --------------------------------------------------------------------------------


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as e:
        open_dataset("voc21", tmp_path / "nowhere")
    assert "nowhere" in str(e.value)


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(DatasetError, match="voc21"):
        open_dataset("pascal", tmp_path)


def test_layout_of_another_dataset_is_reported(tmp_path):
    build_dataset("ade20k", tmp_path, n=2)
    with pytest.raises(DatasetError, match="JPEGImages") as e:
        open_dataset("voc21", tmp_path)
    assert "ade20k" in str(e.value)


def test_coco_object_on_coco_stuff_root_points_to_the_converter(tmp_path):
    build_dataset("coco_stuff171", tmp_path, n=2)
    with pytest.raises(DatasetError, match="make-coco-object"):
        open_dataset("coco_object", tmp_path)


@pytest.mark.parametrize("name,bad", [("voc21", 21), ("voc21", 30), ("ade20k", 151), ("cityscapes", 19),
                                      ("context60", 60), ("coco_object", 81)])
def test_label_values_out_of_range(tmp_path, name, bad):
    stored = np.array([[0, 1], [bad, 255]])
    write_pair(name, tmp_path, "x", stored, np.zeros_like(stored))
    write_id_file(name, tmp_path, ["x"])
    ds = open_dataset(name, tmp_path)
    with pytest.raises(DatasetError, match=rf"values \[{bad}\] outside") as e:
        ds.load_label(ds[0])
    assert str(ds[0].label_path) in str(e.value)


def test_colour_label_map_is_refused(tmp_path):
    build_dataset("ade20k", tmp_path, n=1)
    ds = open_dataset("ade20k", tmp_path)
    Image.new("RGB", (4, 4)).save(ds[0].label_path)
    with pytest.raises(DatasetError, match="single-channel"):
        ds.load_label(ds[0])


def test_missing_label_file_is_named(tmp_path):
    build_dataset("ade20k", tmp_path, n=3)
    ds = open_dataset("ade20k", tmp_path)
    ds[1].label_path.unlink()
    with pytest.raises(DatasetError, match="1 of 3") as e:
        open_dataset("ade20k", tmp_path)
    assert str(ds[1].label_path) in str(e.value)


def test_id_in_split_file_without_image(tmp_path):
    pairs = build_dataset("voc21", tmp_path, n=2)
    write_id_file("voc21", tmp_path, list(pairs) + ["2099_000000"])
    with pytest.raises(DatasetError, match="2099_000000"):
        open_dataset("voc21", tmp_path)


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_bad_limit(tmp_path, limit):
    build_dataset("ade20k", tmp_path, n=2)
    with pytest.raises(DatasetError, match="limit"):
        open_dataset("ade20k", tmp_path, limit=limit)


def test_empty_image_folder(tmp_path):
    (tmp_path / "images" / "validation").mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        open_dataset("ade20k", tmp_path)


# --- COCO-Object from COCO-Stuff ------------------------------------------------------------


def test_stuff_to_object_mapping_on_every_value():
    values = np.array(list(range(171)) + [255])
    out = stuff_to_object(values)
    for v, o in zip(values.tolist(), out.tolist()):
        assert o == (v + 1 if v < 80 else 255 if v == 255 else 0), v


def test_make_coco_object_labels_then_read_them(tmp_path):
    pairs = build_dataset("coco_stuff171", tmp_path, n=3)
    assert make_coco_object_labels(tmp_path, progress=False) == 3
    ds = open_dataset("coco_object", tmp_path)
    for s in ds.samples:
        stored = pairs[s.id][0]
        np.testing.assert_array_equal(ds.load_label(s), np.where(stored == 255, 255, np.where(stored < 80, stored + 1, 0)))
    # existing files are kept unless asked
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(ds[0].label_path)
    assert make_coco_object_labels(tmp_path, progress=False) == 0
    assert ds.load_label(ds[0]).shape == (2, 2)
    assert make_coco_object_labels(tmp_path, overwrite=True, progress=False) == 3
    assert ds.load_label(ds[0]).shape == pairs[ds[0].id][0].shape


def test_make_coco_object_labels_needs_a_coco_stuff_root(tmp_path):
    with pytest.raises(DatasetError, match="annotations"):
        make_coco_object_labels(tmp_path, progress=False)
