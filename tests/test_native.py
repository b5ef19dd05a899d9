"""Native-resolution mode (Segmenter(scale=...), cdam-fast segment --native): the tap assembly
against the protocol's dense matrices, streamed (band by band, from disk) == in-memory labels
to the bit, GeoTIFF tags carried, Pillow's limit, global tiles, bounded memory, resume after a
kill -9, and the bands sharded over torchrun ranks and over Ray actors (in-process
and on a local Ray cluster)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

tifffile = pytest.importorskip("tifffile")

from PIL import Image  # noqa: E402

from cdam_fast.pipeline import Segmenter  # noqa: E402
from cdam_fast.pipeline import native  # noqa: E402
from cdam_fast.pipeline.model import load_clip  # noqa: E402
from cdam_fast.pipeline.pamr import pamr  # noqa: E402
from cdam_fast.pipeline.rasters import ArrayRaster, open_raster  # noqa: E402
from cdam_fast.pipeline.streamed import segment_file  # noqa: E402
from cdam_fast.pipeline.taps import assembly_taps, resize_taps  # noqa: E402
from cdam_fast.pipeline.windows import Assembler, _resize_matrix, axis_matrix, window_starts  # noqa: E402
from cdam_fast.validation import CdamInputError  # noqa: E402
from tiny_clip import register_tiny_clip  # noqa: E402

HERE = Path(__file__).parent
DRIVER = HERE / "native_driver.py"
CLASSES = "background,cat,sofa"
GEO = [(33550, "d", 3, (0.5, 0.5, 0.0), True), (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), True),
       (34735, "H", 8, (1, 1, 0, 1, 1024, 0, 1, 1), True), (42113, "s", 2, "0", True)]


def _dense(taps) -> torch.Tensor:
    m = torch.zeros(taps.size, taps.inputs, dtype=torch.float64)
    rows = torch.arange(taps.size)[:, None].expand_as(taps.index)
    return m.index_put_((rows.reshape(-1), taps.index.reshape(-1)), taps.weight.reshape(-1), accumulate=True)


def test_taps_equal_the_dense_protocol_matrices():
    for out, inp in [(10, 4), (448, 28), (13, 13), (100, 37)]:  # enlarging: torch's bilinear
        assert torch.allclose(_dense(resize_taps(out, inp)), _resize_matrix(out, inp), atol=1e-12)
    for out, inp in [(7, 20), (30, 97)]:  # shrinking: torch's antialiased bilinear
        eye = torch.eye(inp, dtype=torch.float64).reshape(1, inp, 1, inp)
        ref = F.interpolate(eye, size=(1, out), mode="bilinear", antialias=True, align_corners=False)[0, :, 0].T
        assert torch.allclose(_dense(resize_taps(out, inp)), ref, atol=1e-12)
    # window assembly (upsample, place, average overlaps, resize to the original) == windows.axis_matrix
    for length, crop, stride, tokens, original in [(500, 224, 224, 14, 500), (500, 224, 160, 14, 500),
                                                   (300, 224, 100, 14, 700), (1100, 448, 224, 28, 1100),
                                                   (64, 64, 48, 4, 64)]:
        starts = window_starts(length, crop, stride)
        window = min(crop, length)
        ref = axis_matrix(tuple(starts), window, tokens, length, original)
        assert torch.allclose(_dense(assembly_taps(starts, window, tokens, length, original)), ref, atol=1e-12)


@pytest.fixture(scope="module")
def tiny():
    return load_clip(register_tiny_clip(), None, "cpu")


def _options(tiny, **kw) -> dict:
    """The tests' Segmenter options (also given to the Ray actors, which must get the driver's)."""
    return {"model": tiny, "pretrained": None, "templates": "single", "progress": False, "cache_dir": False,
            "background": None, "crop": 224, "stride": 224, "window_batch": 4, **kw}


def _segmenter(tiny, **kw):
    return Segmenter(CLASSES, **_options(tiny, **kw))


def _photo(h, w, seed=0):
    """Blocky random colours: label maps with all three classes under the random model."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 40 + 1, w // 40 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(small, np.ones((40, 40, 1), np.uint8))[:h, :w])


@pytest.fixture(scope="module")
def geotiff(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native")
    image = _photo(1100, 1500)
    tifffile.imwrite(folder / "scene.tif", image, tile=(256, 256), compression="zlib", extratags=GEO)
    return folder / "scene.tif", image


CASES = {  # (H, W): sizes and strides whose windows do not divide the image evenly
    "1100x1500 crop 224 stride 224": dict(),
    "1100x1500 stride 160": dict(stride=160),
    "scale 0.6, threshold 0.5": dict(scale=0.6, stride=160, background=0.5),
    "global tiles of 64 tokens": dict(mode="global", global_tokens=64),
    "cliper (mmseg protocol)": dict(method="cliper", stride=160),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_equals_in_memory(tiny, geotiff, tmp_path, case, one_thread):
    path, image = geotiff
    seg = _segmenter(tiny, **{"scale": 1.0, **CASES[case]})
    result = next(iter(seg.results([image])))
    expected = seg.predict(image)
    paths, counts = segment_file(seg, path, tmp_path, progress=False)
    got = tifffile.imread(paths.labels)
    assert got.dtype == np.uint8 and got.shape == image.shape[:2]
    assert np.array_equal(got, expected)
    assert (np.bincount(expected.ravel(), minlength=3) == counts).all() and (counts > 0).sum() >= 2
    assert not (tmp_path / ".bands").exists()  # the band store is gone once the outputs are published
    # the tap assembly equals the protocol's dense assembler up to float rounding
    dense = Assembler.build(seg.preprocess(image).layout, result.assembler.tokens, result.original, "cpu")
    assert torch.allclose(result.assembler(result.window_logits), dense(result.window_logits), atol=1e-5)
    # the entropy thresholds pooled band by band (as streamed.py does) equal the whole image's
    for rule in ("entropy", "entropy-per-window"):
        seg.background = rule
        pool = native.ThresholdPool(seg)
        for band in result.window_logits.split(result.assembler.grid[1]):
            pool.add(band)
        wl = seg._pseudo_logits(result.window_logits, 1) if case.startswith("cliper") else result.window_logits
        assert torch.equal(pool.value(), Segmenter._threshold(seg, wl))  # CLIPer: on its pseudo-logits


def test_sources_and_pamr(tiny, tmp_path, one_thread):
    """Striped TIFF, .npy (memory-mapped), PNG (Pillow) and 16-bit data stream like the array;
    PAMR per chunk (with its halo) == the whole image's PAMR up to rounding."""
    image = _photo(300, 260, seed=3)
    seg = _segmenter(tiny, scale=1.0, crop=64, stride=48, pamr_steps=2, pamr_dilations=(2, 4))
    expected = seg.predict(image)
    tifffile.imwrite(tmp_path / "s.tif", image, rowsperstrip=7, compression="zlib")
    np.save(tmp_path / "m.npy", image)
    Image.fromarray(image).save(tmp_path / "p.png")
    tifffile.imwrite(tmp_path / "w.tif", image.astype(np.uint16) * 257, tile=(64, 64))
    for name in ("s.tif", "m.npy", "p.png", "w.tif"):
        paths, _ = segment_file(seg, tmp_path / name, tmp_path / "out", progress=False)
        assert np.array_equal(tifffile.imread(paths.labels), expected), name
    res = next(iter(seg.results([image])))
    whole = pamr(native.original_rows(seg, ArrayRaster(image).read, 0, 300), res.assembler(res.window_logits), 2,
                 (2, 4))
    assert seg.pamr_steps and torch.allclose(seg._full_logits(res), whole, atol=1e-5)


def test_geotiff_tags_carried(tiny, geotiff, tmp_path):
    path, image = geotiff
    seg = _segmenter(tiny, scale=1.0, stride=160)
    paths, _ = segment_file(seg, path, tmp_path, progress=False)
    with tifffile.TiffFile(paths.labels) as tf:
        page = tf.pages[0]
        tags = {t.code: t.value for t in page.tags.values()}
        assert page.is_tiled and page.compression == 8 and page.photometric == 3  # deflate, palette
        assert tuple(tags[33550]) == (0.5, 0.5, 0.0) and tuple(tags[33922])[3:5] == (500000.0, 4000000.0)
        assert tuple(tags[34735]) == (1, 1, 0, 1, 1024, 0, 1, 1)
        assert 42113 not in tags  # the image's nodata value would mask class 0 of the labels
        assert tuple(page.colormap[:, 1] // 257) == (128, 0, 0)  # the overlay's colour of class 1
    mapping = json.loads(paths.classes.read_text())
    assert mapping["georeference"] == ["ModelPixelScale", "ModelTiepoint", "GeoKeyDirectory"]
    assert mapping["gdal"] == {"GDAL_NODATA": "0"} and mapping["scale"] == 1.0
    assert abs(sum(c["share"] for c in mapping["classes"]) - 1) < 1e-9
    preview = Image.open(paths.overlay)
    assert preview.height == 1100 and preview.width > 1500  # below the preview size: 1:1, plus legend
    from cdam_fast.pipeline import visualize

    legends, real = [], visualize.class_shares
    visualize.class_shares = lambda labels, names, counts=None: legends.append(real(labels, names, counts)) or \
        legends[-1]
    try:
        small, _ = segment_file(seg, path, tmp_path / "small", preview_side=150, progress=False)
    finally:
        visualize.class_shares = real
    assert json.loads(small.classes.read_text())["preview"] == {"width": 150, "height": 110}
    assert Image.open(small.overlay).width < 400  # the preview and its legend, not a full-size overlay
    # the legend's shares are the full-size map's, not the 150 x 110 preview's
    full = np.bincount(tifffile.imread(small.labels).ravel(), minlength=3) / (1100 * 1500)
    assert [(i, share) for i, _, share in legends[-1]] == [(i, full[i]) for i in np.argsort(-full, kind="stable")
                                                           if full[i] > 0]


def test_pillow_limit_is_explicit(tmp_path):
    from PIL import Image as PILImage

    Image.fromarray(_photo(100, 120)).save(tmp_path / "big.png")
    before = PILImage.MAX_IMAGE_PIXELS
    with pytest.raises(CdamInputError, match=r"120x100 = 12,000 pixels, more than the decoding limit of 8,000.*--max"):
        open_raster(tmp_path / "big.png", max_pixels=8000)
    with pytest.raises(CdamInputError, match="more than 10,000 pixels"):  # Pillow's own guard, at twice the limit
        open_raster(tmp_path / "big.png", max_pixels=5000)
    assert open_raster(tmp_path / "big.png", max_pixels=12000).size == (100, 120)
    assert PILImage.MAX_IMAGE_PIXELS == before  # never left changed


def test_global_mode_bounds_cdam_tokens(tiny, monkeypatch):
    from cdam_fast.pipeline import segmenter as segmenter_module

    seen = []
    real = segmenter_module.multiscale_cdam_attention
    monkeypatch.setattr(segmenter_module, "multiscale_cdam_attention",
                        lambda sim, v, *a, **k: seen.append(sim.shape[-2] * sim.shape[-1]) or real(sim, v, *a, **k))
    image = _photo(200, 330)
    seg = _segmenter(tiny, scale=1.0, mode="global", global_tokens=30)  # 5 x 5 tokens: 80-pixel tiles
    labels = seg.predict(image)
    assert labels.shape == (200, 330) and seen and max(seen) == 25
    assert native.plan(seg, 200, 330).layout.window == (80, 80)
    with pytest.raises(CdamInputError, match="global_tokens must be an integer >= 1"):
        _segmenter(tiny, scale=1.0, mode="global", global_tokens=0)
    with pytest.raises(CdamInputError, match="scale must be a positive number"):
        _segmenter(tiny, scale=0.0)


def _args(out, *extra):
    # without CDAM: these tests are about runs (resume, shards), and CDAM is the slow part on CPU
    return ["segment", "--native", "--no-cdam", *extra, "--classes", CLASSES, "--model", "cdam-test-tiny-vit",
            "--pretrained", "none",
            "--templates", "single", "--background", "none", "--device", "cpu", "--crop", "224", "--stride", "160",
            "--window-batch", "4", "--cache-dir", "off", "--out", str(out)]


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)


@pytest.fixture
def band_log(monkeypatch):
    """The bands this process stores, in order."""
    from cdam_fast.pipeline.bandstore import BandStore

    saved, real = [], BandStore.save
    monkeypatch.setattr(BandStore, "save", lambda self, band, *a, **k: saved.append(band) or real(self, band, *a, **k))
    return saved


def test_resume_after_kill(tiny, geotiff, tmp_path, band_log, one_thread, capsys):
    from cdam_fast.cli import main

    path, image = geotiff
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(DRIVER), *_args(out, str(path))], env=_env(CDAM_TEST_BAND_DELAY="0.5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = out / ".bands" / "scene"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(store.glob("band*.npy"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: some of the 7 bands stored
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in store.glob("band*.npy")}
    assert 2 <= len(before) < 7, before
    assert not (out / "scene_labels.tif").exists()
    assert main(_args(out, str(path), "--keep-bands")) == 0
    stored = {int(n[4:10]) for n in before}
    assert sorted(band_log) == sorted(set(range(7)) - stored)  # nothing lost, nothing doubled
    assert all(store.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())  # kept, not redone
    expected = _segmenter(tiny, scale=1.0, stride=160, cdam=False).predict(image)
    assert np.array_equal(tifffile.imread(out / "scene_labels.tif"), expected)
    records = [json.loads(line) for line in (out / "manifest.rank0.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done"]
    capsys.readouterr()
    assert main(_args(out, str(path))) == 0
    assert "1 skipped (already done)" in capsys.readouterr().err


def test_torchrun_bands_sharded_equal_one_process(geotiff, tmp_path, one_thread, band_log):
    from cdam_fast.cli import main

    path, _ = geotiff
    log = tmp_path / "bands.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DRIVER),
           *_args(tmp_path / "two", str(path))]
    proc = subprocess.run(cmd, env=_env(CDAM_TEST_BAND_LOG=str(log)), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 done" in proc.stderr and "on 2 processes" in proc.stderr
    ranks = sorted(tuple(map(int, line.split())) for line in log.read_text().splitlines())
    assert ranks == sorted((b % 2, b) for b in range(7))  # every other band per rank, each once
    assert main(_args(tmp_path / "one", str(path))) == 0 and sorted(band_log) == list(range(7))
    assert (tmp_path / "two" / "scene_labels.tif").read_bytes() == (tmp_path / "one" / "scene_labels.tif").read_bytes()


def test_ray_actors_share_the_bands(tiny, geotiff, tmp_path, band_log, one_thread):
    """Two RayBandSegmenter actors (called as Ray Data calls them, without a cluster) compute
    the bands; segment_file then only assembles, and the labels equal the in-memory ones."""
    from cdam_fast.pipeline.ray_bands import RayBandSegmenter, band_tasks

    path, image = geotiff
    seg = _segmenter(tiny, scale=1.0, stride=160)
    rows = band_tasks(seg, [path], tmp_path)
    assert [r["band"] for r in rows] == list(range(7))
    options = _options(tiny, scale=1.0, stride=160)
    for part in (rows[:4], rows[4:]):
        actor = RayBandSegmenter(CLASSES, out=tmp_path, **options)
        batch = {k: np.array([r[k] for r in part], dtype=object if k != "band" else np.int64) for k in part[0]}
        assert list(actor(batch)["error"]) == [""] * len(part)
    assert sorted(band_log) == list(range(7))
    band_log.clear()
    paths, _ = segment_file(seg, path, tmp_path, progress=False)
    assert band_log == []  # nothing recomputed
    assert np.array_equal(tifffile.imread(paths.labels), seg.predict(image))



def test_ray_actors_refuse_a_store_prepared_for_other_options(tiny, geotiff, tmp_path, band_log, one_thread):
    """An actor whose options differ from the driver's (here alpha), or that runs before
    band_tasks, reports the row as failed naming why and adds no band: bands of another
    configuration would otherwise be mixed silently into the driver's labels."""
    from cdam_fast.pipeline.ray_bands import RayBandSegmenter, band_tasks

    path, _ = geotiff
    options = _options(tiny, scale=1.0, stride=160)
    batch = {"path": np.array([str(path)], dtype=object), "name": np.array(["scene"], dtype=object),
             "band": np.array([0], dtype=np.int64)}
    early = RayBandSegmenter(CLASSES, out=tmp_path, **options)(batch)["error"][0]
    assert "no band store has been prepared" in early and "band_tasks" in early
    band_tasks(_segmenter(tiny, scale=1.0, stride=160), [path], tmp_path)
    other = RayBandSegmenter(CLASSES, out=tmp_path, **{**options, "alpha": 3.0})(batch)["error"][0]
    assert "another configuration" in other and "settings.alpha" in other, other
    assert band_log == [] and not list((tmp_path / ".bands" / "scene").glob("band*.npy"))
    assert RayBandSegmenter(CLASSES, out=tmp_path, **options)(batch)["error"][0] == ""  # the driver's options
    assert band_log == [0]

def test_ray_data_local_cluster_bands(tiny, geotiff, tmp_path, band_log, one_thread):
    """On a local 2-CPU Ray cluster, two actors compute the bands of one image through Ray Data;
    segment_file then only assembles, and the label TIFF is byte-identical to a one-process run's."""
    ray = pytest.importorskip("ray", reason="the [ray] extra (ray[data]) is not installed")
    from cdam_fast.pipeline.ray_bands import RayBandSegmenter, band_tasks

    path, _ = geotiff
    seg = _segmenter(tiny, scale=1.0, stride=160)
    one, _ = segment_file(seg, path, tmp_path / "one", progress=False)
    band_log.clear()
    rows = band_tasks(seg, [path], tmp_path / "ray")
    assert [r["band"] for r in rows] == list(range(7))
    options = _options(tiny, scale=1.0, stride=160)  # the driver's segmenter, its weights pickled
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # one band per batch and two actors of half a CPU each (single-threaded, as this process is)
        done = ray.data.from_items(rows).map_batches(
            RayBandSegmenter, fn_constructor_kwargs={"classes": CLASSES, "out": str(tmp_path / "ray"), **options},
            batch_size=1, concurrency=2, num_cpus=0.5).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["band"] for r in done) == list(range(7)) and [r["error"] for r in done] == [""] * 7
    assert band_log == []  # every band was computed by the actors, in their own processes
    two, _ = segment_file(seg, path, tmp_path / "ray", progress=False)
    assert band_log == []  # nothing recomputed: the assembly read the actors' bands
    assert two.labels.read_bytes() == one.labels.read_bytes()


_PEAKS = """
import resource, sys
import torch
sys.path.insert(0, {tests!r})
from tiny_clip import register_tiny_clip
from cdam_fast.pipeline import Segmenter
from cdam_fast.pipeline.streamed import segment_file
torch.set_num_threads(1)
seg = Segmenter({classes!r}, model=register_tiny_clip(), pretrained=None, templates="single", background=None,
                device="cpu", crop=224, stride=224, window_batch=4, cache_dir=False, progress=False, scale=1.0,
                cdam=False)
for rows in (512, 8192):
    segment_file(seg, {folder!r} + f"/h{{rows}}.tif", {folder!r} + "/out")
    print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)  # KiB: the peak so far
"""


def test_peak_memory_does_not_grow_with_height(tmp_path):
    """Peak RSS after segmenting a 512 x 1536 TIFF, then an 8192 x 1536 one in the same fresh
    process: the tall image's label map alone is 12 MB, its RGB pixels 36 MB, its logits 144 MB."""
    for rows in (512, 8192):
        image = np.kron(np.random.default_rng(rows).integers(0, 256, (rows // 64, 24, 3), dtype=np.uint8),
                        np.ones((64, 64, 1), np.uint8))
        tifffile.imwrite(tmp_path / f"h{rows}.tif", image, tile=(256, 256), compression="zlib")
    code = _PEAKS.format(tests=str(HERE), classes=CLASSES, folder=str(tmp_path))
    # a fixed mmap threshold: glibc returns freed large blocks, so the high-water mark follows live memory
    proc = subprocess.run([sys.executable, "-c", code], env=_env(MALLOC_MMAP_THRESHOLD_="131072"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = {int(a): int(b) / 1024 for a, b in (line.split() for line in proc.stdout.split("\n") if line.strip())}
    assert peaks[8192] < peaks[512] + 8, peaks  # MiB


def test_cli_refuses_bad_native_options(tmp_path, capsys):
    from cdam_fast.cli import main

    image = tmp_path / "a.png"
    Image.fromarray(_photo(64, 64)).save(image)
    for extra, message in [(["--native", "--scale", "2"], "--native means --scale 1; got --scale 2 too"),
                           (["--scale", "-1"], "scale must be a positive number"),
                           (["--native", "--global-tokens", "0"], "global_tokens must be an integer >= 1"),
                           (["--native", "--preview-size", "0"], "--preview-size must be a positive integer")]:
        assert main(["segment", str(image), "--classes", CLASSES, "--out", str(tmp_path / "out"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
