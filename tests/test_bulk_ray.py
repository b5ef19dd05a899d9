"""The Ray Data adapter: labels equal the single-process Segmenter's in every batch format Ray
Data hands over; bad images are reported in the error column and the others still come back.
The batch handling runs in-process; one test runs it on a local 2-CPU Ray cluster."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cdam_fast.pipeline import Segmenter
from cdam_fast.pipeline.ray_data import RaySegmenter, output_name
from cdam_fast.validation import CdamInputError

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
    assert out["error"][0] == "" and out["error"][2] == ""
    assert out["error"][1].startswith(f"cannot read image file {str(bad)!r}: ")  # the path as a plain string
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
    # writing files: the three outputs of `cdam-fast segment`, named by `names`, else by the path below `root`
    writer = RaySegmenter(CLASSES, out=tmp_path / "o", names={paths[1]: "sub/two"}, root=folder, **OPTIONS)
    out = writer({"path": np.array([paths[0], paths[1], str(bad)])})
    assert list(out["files"]) == [str(tmp_path / "o" / n) for n in ("img0.png_labels.png", "sub/two_labels.png")] + [""]
    for path, name in [(paths[0], "img0.png"), (paths[1], "sub/two")]:
        png = Image.open(tmp_path / "o" / f"{name}_labels.png")
        assert png.mode == "P"
        np.testing.assert_array_equal(np.asarray(png), expected[path])
        assert (tmp_path / "o" / f"{name}_overlay.png").exists() and (tmp_path / "o" / f"{name}_classes.json").exists()
    assert sorted(p.name for p in (tmp_path / "o").rglob("*")) == sorted(
        ["sub", "img0.png_labels.png", "img0.png_overlay.png", "img0.png_classes.json", "two_labels.png",
         "two_overlay.png", "two_classes.json"])  # nothing for the bad row, no temporary files


def _same_stems(root, photos):
    """a/photo.png, b/photo.png and a/photo.jpg (lossless copies of three test images): one stem."""
    folder, expected, _ = photos
    sources = list(expected)
    made = {}
    for rel, src in zip(["a/photo.png", "b/photo.png", "a/photo.jpg"], sources):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).save(root / rel, format="PNG")  # PNG bytes whatever the extension: same pixels
        made[str(root / rel)] = expected[src]
    return made


def test_output_names_are_unique_by_default(tmp_path):
    assert output_name("/data/a/photo.png") == "data/a/photo.png"
    assert output_name("data/a/photo.png", root="/data") == "a/photo.png"  # Ray's form of an absolute path
    assert output_name("/data/a/photo.png", root="/data/") == "a/photo.png"
    names = {output_name(p) for p in ("/d/a/photo.png", "/d/b/photo.png", "/d/a/photo.jpg", "/d/a/photo")}
    assert len(names) == 4
    assert output_name("x/../y/p.png") == "y/p.png"
    assert output_name("../p.png") == os.path.abspath("../p.png").lstrip("/")  # never above the output folder
    with pytest.raises(CdamInputError, match="is not below root"):
        output_name("/elsewhere/p.png", root="/data")


def test_two_writers_same_stem_in_process(photos, tmp_path, one_thread):
    made = _same_stems(tmp_path / "in", photos)
    paths = list(made)
    # two actors, each with its own batch, into one folder (names from the paths below `root`)
    first = RaySegmenter(CLASSES, out=tmp_path / "o", root=tmp_path / "in", **OPTIONS)
    second = RaySegmenter(CLASSES, out=tmp_path / "o", root=tmp_path / "in", **OPTIONS)
    rows = [first({"path": np.array(paths[:2])}), second({"path": np.array(paths[2:])})]
    files = [f for r in rows for f in r["files"]]
    assert files == [str(tmp_path / "o" / n) for n in ("a/photo.png_labels.png", "b/photo.png_labels.png",
                                                        "a/photo.jpg_labels.png")]
    for path, f in zip(paths, files):
        np.testing.assert_array_equal(np.asarray(Image.open(f)), made[path], path)
    assert not [p for p in (tmp_path / "o").rglob(".*")]  # no temporary files left


def test_relative_path_read_here_and_absolute_path_never_share_outputs(photos, tmp_path, one_thread, monkeypatch):
    """A row read from a relative path is the file below this process's folder, not the absolute
    path of the same spelling (Ray's read_images form, which comes with its image): named by
    what was read, the two files get their own outputs."""
    folder, expected, _ = photos
    src_here, src_abs = list(expected)[:2]
    absolute = tmp_path / "abs" / "p.png"
    relative = str(absolute).lstrip(os.sep)  # the same spelling, read relative to the working folder
    here = tmp_path / "cwd"
    for target, src in ((absolute, src_abs), (here / relative, src_here)):
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).save(target, format="PNG")
    monkeypatch.chdir(here)
    seg = RaySegmenter(CLASSES, out=tmp_path / "o", **OPTIONS)
    rows = seg({"path": np.array([relative, str(absolute)], dtype=object)})
    assert list(rows["error"]) == ["", ""]
    assert rows["files"][0] != rows["files"][1]
    for f, src in zip(rows["files"], (src_here, src_abs)):
        np.testing.assert_array_equal(np.asarray(Image.open(f)), expected[src], f)


def test_names_giving_two_images_one_name_are_refused(tmp_path):
    """names= that map two images to one output name (e.g. by stem) would let one image's files
    overwrite the other's: refused when the stage is built, naming both."""
    names = {"/d/a/photo.png": "photo", "/d/b/photo.png": "photo", "/d/c.png": "c"}
    with pytest.raises(CdamInputError, match=r"'photo'.*/d/a/photo.png.*/d/b/photo.png"):
        RaySegmenter(CLASSES, out=tmp_path / "o", names=names, **OPTIONS)
    # spellings of one file share its name (as scripts/ray_segment.py passes them)
    rel = os.path.relpath(tmp_path / "p.png")
    ok = {rel: "p", str(tmp_path / "p.png"): "p", str(tmp_path / "p.png").lstrip(os.sep): "p"}
    RaySegmenter(CLASSES, out=tmp_path / "o", names=ok, **OPTIONS)


def test_ray_data_local_cluster(photos, tmp_path):
    ray = pytest.importorskip("ray", reason="the [ray] extra (ray[data]) is not installed")
    made = _same_stems(tmp_path / "in", photos)  # images of varying size, all named photo.*
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ds = ray.data.read_images(str(tmp_path / "in"), include_paths=True, mode="RGB")
        # two actors of half a CPU each, so that the reader keeps a CPU of its own; one row per
        # batch, so that both actors write files of the one stem (default names: no collision)
        rows = ds.map_batches(RaySegmenter, fn_constructor_kwargs={"classes": CLASSES, "out": str(tmp_path / "o"),
                                                                  **OPTIONS},
                              batch_size=1, concurrency=2, num_cpus=0.5).take_all()
    finally:
        ray.shutdown()
    assert len(rows) == len(made)
    for r in rows:
        path = next(p for p in made if p.endswith(r["path"]))  # Ray drops the leading "/"
        assert "image" not in r
        _check_row(path, r["labels"], r["error"], made)
        assert r["files"] == str(tmp_path / "o" / (output_name(path) + "_labels.png"))
        np.testing.assert_array_equal(np.asarray(Image.open(r["files"])), made[path], path)
    assert len({r["files"] for r in rows}) == len(made)
