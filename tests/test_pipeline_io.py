"""The pipeline's files and environment: text-embedding disk cache, photo decoding (EXIF,
16-bit), class files, checkpoint / download checks, CPU thread settings, legend scaling."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cdam_fast.pipeline import load_clip, text, textcache, visualize, weights
from cdam_fast.pipeline.images import image_size, open_image, to_pixels, to_tensor
from cdam_fast.pipeline.model import WeightsUnavailableError
from cdam_fast.validation import CdamInputError
from tiny_clip import register_tiny_clip


@pytest.fixture(scope="module")
def tiny():
    return load_clip(register_tiny_clip(), None, "cpu")


# -- text-embedding cache ---------------------------------------------------------------------
def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(textcache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert textcache.resolve_cache_root() == tmp_path / "xdg" / "cdam_fast"
    monkeypatch.setenv(textcache.CACHE_ENV, str(tmp_path / "env"))
    assert textcache.resolve_cache_root() == tmp_path / "env"
    assert textcache.resolve_cache_root(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    assert textcache.resolve_cache_root(False) is None and textcache.resolve_cache_root("off") is None
    monkeypatch.setenv(textcache.CACHE_ENV, "off")
    assert textcache.resolve_cache_root() is None


def test_disk_cache_replaces_encoding(tiny, tmp_path, monkeypatch):
    """A second embedder (fresh in-memory cache) reads every prompt from disk, bit for bit, and
    encodes nothing; other template sets and prompts are separate entries."""
    templates = ("a photo of a {}.", "a {} in the wild.")
    tiny.text_cache.clear()
    first = text.TextEmbedder(tiny, templates, progress=False, cache_dir=tmp_path).prompts(["cat", "sofa"])
    tiny.text_cache.clear()

    def no_encoding(tokens):
        raise AssertionError("encoded although cached on disk")

    monkeypatch.setattr(tiny, "encode_text", no_encoding)
    again = text.TextEmbedder(tiny, templates, progress=False, cache_dir=tmp_path).prompts(["sofa", "cat"])
    assert torch.equal(again, first.flip(0))
    tiny.text_cache.clear()
    with pytest.raises(AssertionError, match="encoded"):  # another template set is another key
        text.TextEmbedder(tiny, ("art of a {}.",), progress=False, cache_dir=tmp_path).prompts(["cat"])
    with pytest.raises(AssertionError, match="encoded"):  # and so is the disk cache switched off
        text.TextEmbedder(tiny, templates, progress=False, cache_dir=False).prompts(["cat"])


def test_cache_key_covers_model_weights(tiny, tmp_path):
    other = load_clip(register_tiny_clip(), None, "cpu", seed=1)
    a = textcache.TextCache(tmp_path, tiny, ("{}",))
    b = textcache.TextCache(tmp_path, other, ("{}",))
    assert textcache.text_weights_digest(tiny) != textcache.text_weights_digest(other)
    a.put("cat", torch.ones(4))
    assert b.get("cat") is None and torch.equal(a.get("cat"), torch.ones(4))


def test_cache_key_covers_quick_gelu(tmp_path):
    """QuickGELU has no parameters: the same weights with and without it are two towers with one
    weights digest, and must not read each other's embeddings."""
    quick = load_clip(register_tiny_clip(), None, "cpu", quick_gelu=True)
    plain = load_clip(register_tiny_clip(), None, "cpu", quick_gelu=False)
    assert textcache.text_weights_digest(quick) == textcache.text_weights_digest(plain)
    quick.text_cache.clear()
    plain.text_cache.clear()
    first = text.TextEmbedder(quick, ("a photo of a {}.",), progress=False, cache_dir=tmp_path).prompts(["cat"])
    second = text.TextEmbedder(plain, ("a photo of a {}.",), progress=False, cache_dir=tmp_path).prompts(["cat"])
    plain.text_cache.clear()
    own = text.TextEmbedder(plain, ("a photo of a {}.",), progress=False, cache_dir=False).prompts(["cat"])
    assert torch.equal(second, own) and not torch.allclose(first, own, atol=1e-4)


def test_cache_key_covers_module_settings_and_format(tmp_path, monkeypatch):
    """Any text-side module setting (here a LayerNorm's eps) is another key; so is another
    cache format (old entries are ignored, never misread)."""
    a = load_clip(register_tiny_clip(), None, "cpu", share=False)
    b = load_clip(register_tiny_clip(), None, "cpu", share=False)
    b.clip.ln_final.eps = 1e-3
    assert textcache.text_weights_digest(a) == textcache.text_weights_digest(b)
    textcache.TextCache(tmp_path, a, ("{}",)).put("cat", torch.ones(4))
    assert torch.equal(textcache.TextCache(tmp_path, a, ("{}",)).get("cat"), torch.ones(4))
    assert textcache.TextCache(tmp_path, b, ("{}",)).get("cat") is None
    monkeypatch.setattr(textcache, "_FORMAT", textcache._FORMAT - 1)
    textcache.TextCache(tmp_path, a, ("{}",)).put("sofa", torch.ones(4))
    monkeypatch.undo()
    current = textcache.TextCache(tmp_path, a, ("{}",))
    assert current.get("sofa") is None
    old = textcache.TextCache.__new__(textcache.TextCache)  # an old entry copied to the current path
    monkeypatch.setattr(textcache, "_FORMAT", textcache._FORMAT - 1)
    old.__init__(tmp_path, a, ("{}",))
    monkeypatch.undo()
    current._path("sofa").parent.mkdir(parents=True, exist_ok=True)
    current._path("sofa").write_bytes(old._path("sofa").read_bytes())
    assert current.get("sofa") is None


def test_truncated_or_corrupt_entries_are_recomputed(tiny, tmp_path):
    cache = textcache.TextCache(tmp_path, tiny, ("{}",))
    emb = torch.randn(32, generator=torch.Generator().manual_seed(0))
    cache.put("cat", emb)
    path = cache._path("cat")
    whole = path.read_bytes()
    for broken in (whole[:-3], whole[:10], b"", whole[:-4] + b"\x00\x00\x80\x7f"):
        path.write_bytes(broken)
        assert cache.get("cat") is None
    path.write_bytes(whole)
    assert torch.equal(cache.get("cat"), emb)
    # an embedder meeting a truncated file encodes again and repairs the entry
    tiny.text_cache.clear()
    emb_cache = textcache.TextCache(tmp_path, tiny, text.SINGLE_TEMPLATE)
    want = text.TextEmbedder(tiny, "single", progress=False, cache_dir=tmp_path).prompts(["dog"])[0]
    emb_cache._path("dog").write_bytes(emb_cache._path("dog").read_bytes()[:-1])
    tiny.text_cache.clear()
    got = text.TextEmbedder(tiny, "single", progress=False, cache_dir=tmp_path).prompts(["dog"])[0]
    assert torch.equal(got, want) and torch.equal(emb_cache.get("dog"), want.cpu())


def test_concurrent_writers_leave_a_valid_entry(tiny, tmp_path):
    cache = textcache.TextCache(tmp_path, tiny, ("{}",))
    emb = torch.arange(4096, dtype=torch.float32)
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            got = cache.get("cat")
            if got is not None:
                seen.append(torch.equal(got, emb))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=lambda: [cache.put("cat", emb) for _ in range(20)]) for _ in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert all(seen) and torch.equal(cache.get("cat"), emb)
    assert [p.name for p in cache._path("cat").parent.iterdir()] == [cache._path("cat").name]  # no temp files left


def test_unwritable_cache_only_warns(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="not writable"):
        out = text.TextEmbedder(tiny, ("{}",), progress=False, cache_dir=blocker).prompts(["owl"])
    assert out.shape == (1, 32)


# -- photos -------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 32, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "phone.png", exif=exif)
    shown = np.asarray(open_image(tmp_path / "phone.png"))
    assert shown.shape == (32, 20, 3) and np.array_equal(shown, np.rot90(arr, k=-1))
    assert image_size(tmp_path / "phone.png") == (20, 32)  # (W, H) as shown


def test_sixteen_bit_images_are_scaled(tmp_path):
    grey = np.array([[0, 257, 32896], [65535, 1000, 40000]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    Image.fromarray(grey).save(tmp_path / "g16.tif")
    want = np.round(grey / 257.0).astype(np.uint8)
    for name in ("g16.png", "g16.tif"):
        got = np.asarray(open_image(tmp_path / name))
        assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want), name
    assert float(to_tensor(tmp_path / "g16.png").max()) == 1.0  # not clipped to white: 65535 -> 1.0 only
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(CdamInputError, match="float.tif.*floating-point pixels") as e:
        open_image(tmp_path / "float.tif")
    assert str(e.value).count("cannot read image file") == 1
    with pytest.raises(CdamInputError, match="floating-point pixels"):
        image_size(tmp_path / "float.tif")  # the header check before the model load refuses it too
    # a uint16 array from Python is scaled as a 16-bit file is
    assert np.array_equal(to_pixels(grey)[0].numpy(), want)


def test_class_file_line_with_commas_warns(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("background,cat,grass\nsofa\n")
    with pytest.warns(text.ClassFileWarning, match="1 line.*commas.*'background,cat,grass'"):
        classes = text.read_class_file(f)
    assert len(classes) == 2


def test_open_clip_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'cdam-fast\[clip\]'"):
        text.resolve_templates("openai")
    from cdam_fast.pipeline import Segmenter

    with pytest.raises(ImportError, match=r"cdam-fast\[clip\]"):
        Segmenter("cat", pretrained=None, device="cpu")


# -- weights ------------------------------------------------------------------------------------
def test_checkpoint_file_check(tmp_path):
    for name, data in [("notes.pt", b"e\x00hello world, not weights"), ("empty.bin", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CdamInputError, match="is not a model checkpoint"):
            weights.check_checkpoint_file(str(tmp_path / name))
    torch.save({"w": torch.ones(2)}, tmp_path / "real.pt")
    weights.check_checkpoint_file(str(tmp_path / "real.pt"))
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    weights.check_checkpoint_file(str(tmp_path / "legacy.pt"))
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (tmp_path / "w.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    weights.check_checkpoint_file(str(tmp_path / "w.safetensors"))


@pytest.fixture
def no_download(monkeypatch, tmp_path):
    """An empty hub cache, and open_clip forbidden to touch the network."""
    import open_clip

    def forbidden(*args, **kwargs):
        raise AssertionError("open_clip was asked to download")

    monkeypatch.setattr(open_clip, "create_model", forbidden)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_offline_tag_fails_in_seconds(no_download, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE is set.*--pretrained PATH") as e:
        load_clip("ViT-B-16", "openai", "cpu", share=False, cache_dir=str(no_download))
    assert time.perf_counter() - t < 5 and "\n" not in str(e.value)


def test_unreachable_hub_fails_in_seconds(no_download, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="no network: 127.0.0.1:9 unreachable") as e:
        load_clip("ViT-B-16", "openai", "cpu", share=False, cache_dir=str(no_download))
    assert time.perf_counter() - t < weights.PROBE_TIMEOUT + 2 and "\n" not in str(e.value)


# -- CPU threads --------------------------------------------------------------------------------
def test_cli_sleeps_idle_openmp_threads():
    """The wait policy must be in the environment before torch loads libgomp: importing
    cdam_fast as the `cdam-fast` command sets it; importing it as a library does not."""
    from cdam_fast import _threads

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import sys; sys.argv = ['/usr/bin/cdam-fast']; import cdam_fast, os; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "True"]
    assert not _threads.launched_as_cli()  # this pytest process: a library user


def test_thread_count(monkeypatch):
    from cdam_fast import _threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert _threads.configure_threads() is None  # the user's setting stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
        assert _threads.configure_threads() == 1 == torch.get_num_threads()  # cores shared by torchrun ranks
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        n = _threads.physical_cores()
        assert 1 <= n <= len(os.sched_getaffinity(0)) and _threads.configure_threads() == n
    finally:
        torch.set_num_threads(before)


# -- outputs ------------------------------------------------------------------------------------
def test_legend_scales_with_the_image():
    names = ["background", "cat", "sofa"]
    small, large = (np.zeros((h, w), np.uint8) for h, w in ((60, 80), (1800, 2400)))
    small[:, 40:], large[:, 1200:] = 1, 1
    ov_small = visualize.overlay(np.zeros((60, 80, 3), np.uint8), small, names)
    ov_large = visualize.overlay(np.zeros((1800, 2400, 3), np.uint8), large, names)
    assert visualize.legend_font_size(1800, 2400) >= 4 * visualize.legend_font_size(60, 80)
    assert (ov_large.width - 2400) >= 4 * (ov_small.width - 80)  # the legend (text) grows with the image


# -- Segmenter: no ATP without CDAM, a progress bar over the windows of one large image ------------
def test_no_augmented_prompts_without_cdam(tiny):
    from cdam_fast.pipeline import Segmenter, atp_prompts

    tiny.text_cache.clear()
    seg = Segmenter("background,cat", model=tiny, cdam=False, templates="single", progress=False, cache_dir=False,
                    short_side=64, crop=48, stride=32)
    seg.predict(np.zeros((40, 50, 3), np.uint8))
    encoded = {prompt for prompt, _ in tiny.text_cache}
    assert encoded == {"background", "cat"} and not encoded & set(atp_prompts())
    assert seg.distribution_text.shape[0] == 2 + len(atp_prompts())  # CDAM's columns, encoded on demand


def test_predict_shows_window_progress(tiny, capsys):
    from cdam_fast.pipeline import Segmenter

    seg = Segmenter("background,cat", model=tiny, templates="single", cache_dir=False, window_batch=1,
                    short_side=48, crop=32, stride=16)
    capsys.readouterr()
    seg.predict(np.zeros((48, 96, 3), np.uint8))  # 2 x 5 windows, one per forward pass
    assert "windows" in capsys.readouterr().err
    seg.progress = False
    seg.predict(np.zeros((48, 96, 3), np.uint8))
    assert "windows" not in capsys.readouterr().err
