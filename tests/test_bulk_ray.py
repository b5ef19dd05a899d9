"""The Ray Data adapter: labels equal the single-process Segmenter's in every batch format Ray
Data hands over; bad images are reported in the error column and the others still come back.
The batch handling runs in-process; one test runs it on a local 2-CPU Ray cluster."""
import numpy as np
import pytest
import torch
from PIL import Image

from cdam_fast.pipeline import Segmenter
from cdam_fast.pipeline.ray_data import RaySegmenter

OPTIONS = dict(model="ViT-S-16", pretrained=None, templates="single", background=None, device="cpu", short_side=48,
               long_side=96, crop=32, stride=16, window_batch=4)
CLASSES = "background,cat,sofa"
SIZES = [(40, 56), (36, 30), (48, 48), (33, 61)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Image paths (one folder, no other files) and each one's labels from Segmenter.predict."""
    folder = tmp_path_factory.mktemp("ray_photos")
    rng = np.random.default_rng(3)
    paths = []
    for i, hw in enumerate(SIZES):
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(paths[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in Ray's single-CPU actors: the same float sums
    try:
        seg = Segmenter(CLASSES, progress=False, **OPTIONS)
        return folder, {p: seg.predict(p) for p in paths}, seg
    finally:
        torch.set_num_threads(threads)


def _check_row(path, labels, error, expected):
    assert error == "", error
    np.testing.assert_array_equal(np.asarray(labels), expected[path], path)


def test_batch_formats_and_bad_rows_in_process(photos, tmp_path, one_thread):
    pd = pytest.importorskip("pandas", reason="pandas (installed with ray[data]) is needed for pandas batches")
    folder, expected, seg = photos
    paths = list(expected)
    udf = RaySegmenter(CLASSES, shares=True, overlay=True, **OPTIONS)
    assert udf.segmenter.backbone is seg.backbone  # the same weights, loaded once per process
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    # pandas batch of paths, one corrupt
    out = udf(pd.DataFrame({"path": [paths[0], str(bad), paths[1]], "id": [7, 8, 9]}))
    assert list(out["id"]) == [7, 8, 9] and "image" not in out  # other columns pass through
    assert out["error"][0] == "" and "cannot read image file" in out["error"][1] and out["error"][2] == ""
    assert out["labels"][1].shape == (0, 0) and np.isnan(out["shares"][1]).all()
    for i in (0, 2):
        labels = expected[out["path"][i]]
        _check_row(out["path"][i], out["labels"][i], out["error"][i], expected)
        np.testing.assert_allclose(out["shares"][i], np.bincount(labels.ravel(), minlength=3) / labels.size)
        assert out["overlay"][i].shape[:2] >= labels.shape and out["overlay"][i].shape[1] > labels.shape[1]
    # numpy batch, images stacked [B, H, W, 3] (equal sizes) as decoded uint8 arrays; a too-small one fails
    same = [np.asarray(Image.open(paths[0]))] * 2
    out = udf({"image": np.stack(same)})
    assert list(out["error"]) == ["", ""] and "path" not in out
    for labels in out["labels"]:
        np.testing.assert_array_equal(labels, expected[paths[0]])
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((4, 4, 3), np.uint8), np.asarray(Image.open(paths[2]))
    out = udf({"image": ragged})
    assert "row 0 is 4x4 pixels (W x H), smaller than one 16x16 patch" in out["error"][0]
    np.testing.assert_array_equal(out["labels"][1], expected[paths[2]])
    with pytest.raises(KeyError, match="neither an 'image' nor a 'path' column"):
        udf({"file": np.array(paths)})
    # writing files: the three outputs of `cdam-fast segment`, named by `names` (default the stem)
    writer = RaySegmenter(CLASSES, out=tmp_path / "o", names={paths[1]: "sub/two"}, **OPTIONS)
    out = writer({"path": np.array([paths[0], paths[1], str(bad)])})
    assert list(out["files"]) == [str(tmp_path / "o" / n) for n in ("img0_labels.png", "sub/two_labels.png")] + [""]
    for path, name in [(paths[0], "img0"), (paths[1], "sub/two")]:
        png = Image.open(tmp_path / "o" / f"{name}_labels.png")
        assert png.mode == "P"
        np.testing.assert_array_equal(np.asarray(png), expected[path])
        assert (tmp_path / "o" / f"{name}_overlay.png").exists() and (tmp_path / "o" / f"{name}_classes.json").exists()
    assert sorted(p.name for p in (tmp_path / "o").rglob("*")) == sorted(
        ["sub", "img0_labels.png", "img0_overlay.png", "img0_classes.json", "two_labels.png", "two_overlay.png",
         "two_classes.json"])  # nothing for the bad row, no temporary files


def test_ray_data_local_cluster(photos):
    ray = pytest.importorskip("ray", reason="the [ray] extra (ray[data]) is not installed")
    folder, expected, _ = photos
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ds = ray.data.read_images(str(folder), include_paths=True, mode="RGB")  # images of varying size
        # two actors of half a CPU each, so that the reader keeps a CPU of its own
        rows = ds.map_batches(RaySegmenter, fn_constructor_kwargs={"classes": CLASSES, **OPTIONS}, batch_size=2,
                              concurrency=2, num_cpus=0.5).take_all()
    finally:
        ray.shutdown()
    assert len(rows) == len(expected)
    for r in rows:
        path = next(p for p in expected if p.endswith(r["path"]))
        assert "image" not in r
        _check_row(path, r["labels"], r["error"], expected)
