"""Native-resolution mode on bad input: every bad file is refused with a message naming it, at
open (the CLI: before the model loads), one bad file never costs the others, and nothing the
user gave is overwritten."""
import struct
import warnings

import numpy as np
import pytest
import torch

tifffile = pytest.importorskip("tifffile")

from PIL import Image  # noqa: E402

from cdam_fast.pipeline import Segmenter, native  # noqa: E402
from cdam_fast.pipeline.images import to_pixels  # noqa: E402
from cdam_fast.pipeline.model import load_clip  # noqa: E402
from cdam_fast.pipeline.rasters import open_raster  # noqa: E402
from cdam_fast.validation import CdamInputError  # noqa: E402
from tiny_clip import register_tiny_clip  # noqa: E402

CLASSES = "background,cat,sofa"
IMAGE = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)


def _patched_tiff(path, values: dict, **kw):
    """A TIFF of IMAGE with header fields overwritten (e.g. a zero or huge ImageWidth)."""
    tifffile.imwrite(path, IMAGE, **kw)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        tags = tf.pages[0].tags
        for name, value in values.items():
            struct.pack_into({3: "<H", 4: "<I"}[int(tags[name].dtype)], data, tags[name].valueoffset, value)
    path.write_bytes(bytes(data))
    return path


def _bad_files(folder) -> dict:
    """name -> what the refusal must say, for files that open_raster refuses at open."""
    tifffile.imwrite(folder / "c5.tif", np.concatenate([IMAGE, IMAGE[..., :2]], -1), photometric="minisblack",
                     planarconfig="contig")
    tifffile.imwrite(folder / "c2.tif", IMAGE[..., :2].copy(), photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(folder / "i8.tif", IMAGE.astype(np.int8), photometric="rgb")
    np.save(folder / "c5.npy", np.zeros((40, 40, 5), np.uint8))
    np.save(folder / "i64.npy", IMAGE.astype(np.int64))
    np.save(folder / "rec.npy", np.zeros((40, 40), dtype=[("a", "u1"), ("b", "f4")]))
    tifffile.imwrite(folder / "full.tif", IMAGE, tile=(32, 32), compression="zlib")
    data = (folder / "full.tif").read_bytes()
    (folder / "trunc.tif").write_bytes(data[:len(data) // 2])
    _patched_tiff(folder / "w0.tif", {"ImageWidth": 0})
    _patched_tiff(folder / "huge.tif", {"ImageWidth": 60000, "ImageLength": 60000}, tile=(16, 16))
    _patched_tiff(folder / "huge_strip.tif", {"ImageWidth": 60000, "ImageLength": 60000, "RowsPerStrip": 60000})
    tifffile.imwrite(folder / "rot.tif", IMAGE, photometric="rgb", extratags=[(274, "H", 1, 6, True)])  # 90 degrees
    _patched_tiff(folder / "ph99.tif", {"PhotometricInterpretation": 99})  # codes tifffile does not know
    _patched_tiff(folder / "cp99.tif", {"Compression": 34999})
    tifffile.imwrite(folder / "cmap.tif", IMAGE[..., 0].copy(), photometric="palette",
                     colormap=np.zeros((3, 256), np.uint16))
    data = bytearray((folder / "cmap.tif").read_bytes())
    with tifffile.TiffFile(folder / "cmap.tif") as tf:
        struct.pack_into("<I", data, tf.pages[0].tags["ColorMap"].offset + 4, 300)  # 100 colours, not 256
    (folder / "cmap.tif").write_bytes(bytes(data))
    return {"rot.tif": "Orientation 6", "ph99.tif": "photometric interpretation 99", "cp99.tif": "34999 compression",
            "cmap.tif": "colour map of 3 x 256", "c5.tif": "5 samples per pixel", "c2.tif": "2 samples per pixel", "i8.tif": "int8",
            "c5.npy": "5 samples per pixel", "i64.npy": "int64", "rec.npy": "must be uint8, uint16 or float",
            "trunc.tif": "truncated", "w0.tif": "0x100", "huge.tif": "corrupt",
            "huge_strip.tif": "corrupt"}


def test_bad_rasters_are_refused_at_open(tmp_path):
    for name, message in _bad_files(tmp_path).items():
        with pytest.raises(CdamInputError, match=message) as e:
            open_raster(tmp_path / name).close()
        assert name in str(e.value), e.value


def test_corrupt_tiff_data_is_not_blamed_on_a_codec(tmp_path):
    tifffile.imwrite(tmp_path / "full.tif", IMAGE, tile=(32, 32), compression="zlib")
    data = bytearray((tmp_path / "full.tif").read_bytes())
    data[len(data) // 2:len(data) // 2 + 200] = bytes(200)
    (tmp_path / "bad.tif").write_bytes(bytes(data))
    with open_raster(tmp_path / "bad.tif") as r, pytest.raises(CdamInputError, match="bad.tif") as e:
        r.read(0, r.height)
    assert "imagecodecs" not in str(e.value) and "corrupt" in str(e.value)


def test_missing_codec_is_refused_at_open(tmp_path):
    try:
        import imagecodecs  # noqa: F401
        pytest.skip("imagecodecs is installed: LZW decodes")
    except ImportError:
        pass
    Image.fromarray(IMAGE).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    with pytest.raises(CdamInputError, match=r"LZW.*imagecodecs"):
        open_raster(tmp_path / "lzw.tif")


def test_tiff_colours_read_as_pillow_shows_them_or_refused(tmp_path):
    """A palette TIFF's colours are its pixels (not the indices); CMYK and white-is-zero grey,
    whose samples are no RGB, are refused instead of being segmented as if they were."""
    from cdam_fast.pipeline.images import open_image

    Image.fromarray(IMAGE).convert("P").save(tmp_path / "p.tif")
    with open_raster(tmp_path / "p.tif") as r:
        assert np.array_equal(r.read(0, 100).permute(1, 2, 0).numpy(), np.asarray(open_image(tmp_path / "p.tif")))
    Image.fromarray(IMAGE).convert("CMYK").save(tmp_path / "cmyk.tif")
    tifffile.imwrite(tmp_path / "white.tif", IMAGE[..., 0], photometric="miniswhite")
    for name, what in (("cmyk.tif", "SEPARATED"), ("white.tif", "MINISWHITE")):
        with pytest.raises(CdamInputError, match=f"{name}': photometric interpretation {what} is not supported"):
            open_raster(tmp_path / name)


def test_other_byte_order_reads_like_native(tmp_path):
    np.save(tmp_path / "be.npy", IMAGE.astype(">u2") * 257)
    with open_raster(tmp_path / "be.npy") as r:
        assert np.array_equal(r.read(0, 100).permute(1, 2, 0).numpy(), IMAGE)
    assert np.array_equal(to_pixels((IMAGE / 255).astype(">f4")).permute(1, 2, 0).numpy(), (IMAGE / 255).astype("f4"))


def test_malformed_geotiff_tags_are_refused(tmp_path):
    for name, tag, message in [("ascii", (33550, "s", 0, "hello", True), "ModelPixelScale"),
                               ("short", (33922, "d", 4, (1.0, 2.0, 3.0, 4.0), True), "ModelTiepoint"),
                               ("keys", (34735, "H", 3, (1, 1, 0), True), "GeoKeyDirectory"),
                               ("keycount", (34735, "H", 8, (1, 1, 0, 5, 1024, 0, 1, 1), True), "GeoKeyDirectory")]:
        tifffile.imwrite(tmp_path / f"{name}.tif", IMAGE, extratags=[tag])
        with pytest.raises(CdamInputError, match=f"{name}.tif.*{message}"):
            open_raster(tmp_path / f"{name}.tif")
    tifffile.imwrite(tmp_path / "nodata.tif", IMAGE, extratags=[(42113, "B", 4, b"-99\x00", True)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_raster(tmp_path / "nodata.tif") as r:
            assert r.gdal == {"GDAL_NODATA": "-99"}


def test_scale_accepts_numpy_numbers_and_refuses_tiny_and_huge_scales_cleanly():
    assert native.check_scale(np.float32(0.5)) == 0.5 and native.check_scale(np.int64(2)) == 2.0
    with pytest.raises(CdamInputError, match="scale must be a positive number"):
        native.check_scale(np.float64("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warnings on the way to the refusal
        with pytest.raises(CdamInputError, match="at scale 1e-06 is 1x1: smaller than one 16x16 patch"):
            native.check_size(300, 260, (16, 16), 1e-6, "image 'a.tif'")
    # a huge scale is refused before planning (whose taps grow with the scaled size: a MemoryError)
    with pytest.raises(CdamInputError, match=r"at scale 1e\+06 would be 2\.6e\+08x3e\+08: more than 2097152"):
        native.check_size(300, 260, (16, 16), 1e6, "image 'a.tif'")
    with pytest.raises(CdamInputError, match="more than 2097152 pixels a side"):
        native.check_size(300, 260, (16, 16), 1e308, "image 'a.tif'")  # beyond any int: no OverflowError
    native.check_size(300, 260, (16, 16), 1000.0, "image 'a.tif'")  # 260000 x 300000: allowed
    native.check_size(1, 1 << 20, (1, 1), 2.0, "image 'a.tif'")  # exactly 2097152 a side: allowed
    with pytest.raises(CdamInputError, match="more than 2097152"):
        native.check_size(1, (1 << 20) + 1, (1, 1), 2.0, "image 'a.tif'")


# -- with the tiny model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return load_clip(register_tiny_clip(), None, "cpu")


def _options(tiny) -> dict:
    """The tests' Segmenter options (the Ray actors get the driver's)."""
    return {"model": tiny, "pretrained": None, "templates": "single", "progress": False, "cache_dir": False,
            "background": None, "crop": 64, "stride": 64, "window_batch": 4, "scale": 1.0, "cdam": False}


def _segmenter(tiny):
    return Segmenter(CLASSES, **_options(tiny))


def test_segment_file_never_replaces_its_input_and_names_a_bad_out(tiny, tmp_path):
    from cdam_fast.pipeline.streamed import segment_file

    tifffile.imwrite(tmp_path / "x_labels.tif", IMAGE)
    before = (tmp_path / "x_labels.tif").read_bytes()
    seg = _segmenter(tiny)
    with pytest.raises(CdamInputError, match="would replace an input image"):
        segment_file(seg, tmp_path / "x_labels.tif", tmp_path, name="x")
    assert (tmp_path / "x_labels.tif").read_bytes() == before
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CdamInputError, match="out '.*file' cannot be created: .* is a file"):
        segment_file(seg, tmp_path / "x_labels.tif", tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


def test_ray_bands_one_bad_file_costs_nothing_else(tiny, tmp_path, one_thread):
    from cdam_fast.pipeline.ray_bands import RayBandSegmenter, band_tasks

    for name in ("g", "h"):
        tifffile.imwrite(tmp_path / f"{name}.tif", IMAGE, tile=(32, 32))
    (tmp_path / "bad.tif").write_text("not a tiff")
    seg = _segmenter(tiny)
    with pytest.warns(UserWarning, match="bad.tif.*not a TIFF"):
        rows = band_tasks(seg, [tmp_path / "g.tif", tmp_path / "bad.tif", tmp_path / "h.tif"], tmp_path / "out")
    assert [(r["name"], r["band"]) for r in rows] == [("g", 0), ("g", 1), ("h", 0), ("h", 1)]
    actor = RayBandSegmenter(CLASSES, out=tmp_path / "out", **_options(tiny))
    part = [rows[0], {"path": str(tmp_path / "bad.tif"), "name": "bad", "band": 0}, rows[1]]
    batch = {k: np.array([r[k] for r in part], dtype=np.int64 if k == "band" else object) for k in part[0]}
    errors = list(actor(batch)["error"])
    assert errors[0] == errors[2] == "" and "bad.tif" in errors[1]


class _ModelLoaded(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """The CLI's segmenter construction raises _ModelLoaded: a run that gets there failed to
    refuse its inputs before the heavy work."""
    from cdam_fast.pipeline import cli

    def refuse(*a, **k):
        raise _ModelLoaded

    monkeypatch.setattr(cli, "_segmenter", refuse)


def _args(out, *extra):
    native = [] if "--scale" in extra else ["--native"]
    return ["segment", *native, "--no-cdam", *extra, "--classes", CLASSES, "--model", register_tiny_clip(),
            "--pretrained", "none", "--templates", "single", "--background", "none", "--device", "cpu",
            "--crop", "64", "--stride", "64", "--cache-dir", "off", "--out", str(out)]


def test_cli_refuses_bad_files_before_the_model_loads(tmp_path, capsys, no_model):
    from cdam_fast.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    messages = _bad_files(bad)
    files = [str(bad / n) for n in messages]
    assert main(_args(tmp_path / "out", *files)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{len(files)} failed" in err
    for name in messages:
        assert name in err, name
    # the folder itself: native mode picks up its .npy files too (the ordinary mode reads no .npy)
    (bad / "full.tif").unlink()  # the good file the truncated one was cut from
    assert main(_args(tmp_path / "out3", str(bad))) == 2
    err = capsys.readouterr().err
    assert f"{len(files)} failed" in err and all(name in err for name in messages)
    tifffile.imwrite(tmp_path / "ok.tif", IMAGE)
    assert main(_args(tmp_path / "out2", str(tmp_path / "ok.tif"), "--scale", "1e-6")) == 2
    assert "at scale 1e-06 is 1x1: smaller than one 16x16 patch" in capsys.readouterr().err


def test_cli_max_pixels_raises_the_header_check_too(tmp_path, capsys, monkeypatch, no_model):
    """A PNG beyond twice Pillow's limit passes the header check when --max-pixels allows it."""
    from cdam_fast.cli import main

    Image.fromarray(IMAGE).save(tmp_path / "big.png")  # 12,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    assert main(_args(tmp_path / "out", str(tmp_path / "big.png"))) == 2
    assert "more than the decoding limit of 5,000" in capsys.readouterr().err
    with pytest.raises(_ModelLoaded):
        main(_args(tmp_path / "out", str(tmp_path / "big.png"), "--max-pixels", "20000"))
    assert Image.MAX_IMAGE_PIXELS == 5000


def test_uncompressed_strips_are_read_by_rows_not_decoded_whole(tmp_path, monkeypatch):
    """A file stored as one uncompressed strip (or in big-endian strips) streams a band at a time
    from the rows' byte offsets, equal to the array; a big compressed strip warns at open."""
    from cdam_fast.pipeline import rasters
    from cdam_fast.pipeline.rasters import ArrayRaster

    big = np.ascontiguousarray(np.concatenate([IMAGE] * 3, 0))  # 300 rows
    wide = (np.arange(300 * 100 * 3, dtype=np.uint16).reshape(300, 100, 3) * 7)
    tifffile.imwrite(tmp_path / "one.tif", big, photometric="rgb", rowsperstrip=300)
    tifffile.imwrite(tmp_path / "be.tif", wide, photometric="rgb", rowsperstrip=64, byteorder=">")
    decoded = []
    monkeypatch.setattr(tifffile.TiffPage, "decode", lambda *a, **k: decoded.append(1) or 1 / 0)
    for name, array in (("one.tif", big), ("be.tif", wide)):
        with open_raster(tmp_path / name) as r:
            for a, b in ((0, 10), (37, 201), (250, 300)):
                assert torch.equal(r.read(a, b), ArrayRaster(array).read(a, b)), (name, a, b)
    assert decoded == []  # no strip was decoded (the spy would have raised)
    monkeypatch.undo()
    tifffile.imwrite(tmp_path / "z.tif", big, photometric="rgb", rowsperstrip=300, compression="zlib")
    monkeypatch.setattr(rasters, "_SEGMENT_WARN_BYTES", 1000)
    with pytest.warns(UserWarning, match="z.tif.*strips of 300 rows.*tiled TIFF"):
        open_raster(tmp_path / "z.tif").close()
