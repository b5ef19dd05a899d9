"""An image's labels depend only on the image and the settings, never on which images are
segmented with it: together or alone, in any order, in calls of any size. Checked with the
real (CPU) forward pass, and with a forward pass whose rounding depends on the whole batch, as
GPU kernels' does (cuBLAS and attention kernels pick their tiling by batch shape)."""
import numpy as np
import pytest
import torch
from PIL import Image

from cdam_fast.pipeline import Segmenter, load_clip
from tiny_clip import register_tiny_clip

skdata = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
# 4 to 6 windows per photo (short side 64, 48-px windows at stride 32), 5 per forward pass
SETTINGS = dict(templates="single", background=None, progress=False, cache_dir=False, short_side=64,
                long_side=160, crop=48, stride=32, window_batch=5)


@pytest.fixture(scope="module")
def photos():
    out = []
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        im = Image.fromarray(getattr(skdata, name)())
        out.append(np.asarray(im.resize((im.width // 6, im.height // 6), Image.BILINEAR)))
    return out


@pytest.fixture(scope="module")
def seg():
    bb = load_clip(register_tiny_clip(), None, "cpu")
    return Segmenter("background,cat,person,rocket,cup", model=bb, **SETTINGS)


def batch_dependent(encode):
    """encode_windows plus a term that depends on everything in the forward pass: stands in
    for kernels whose result for one window depends on the batch around it."""
    def run(crops):
        out = encode(crops)
        shift = 0.05 * crops.mean() * crops.shape[0]
        sign = torch.tensor([(-1.0) ** k for k in range(out.shape[1])])
        return out + shift * sign[None, :, None, None]
    return run


def _all_ways(seg, photos):
    """Label maps of each photo, segmented in several groupings: {way: [maps in photo order]}."""
    n = len(photos)
    ways = {"together": seg.predict_batch(photos), "alone": [seg.predict(p) for p in photos]}
    reverse = seg.predict_batch(photos[::-1])
    ways["reversed"] = reverse[::-1]
    ways["pairs"] = seg.predict_batch(photos[:2]) + seg.predict_batch(photos[2:])
    ways["results"] = [seg.label_map(r) for r in seg.results(photos)]
    assert all(len(v) == n for v in ways.values())
    return ways


def _assert_identical(ways):
    base = ways["alone"]
    assert len({m.shape for m in base}) == len(base)  # four different photos
    for way, maps in ways.items():
        for i, (a, b) in enumerate(zip(base, maps)):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"photo {i}: {way} differs from alone"


def test_labels_do_not_depend_on_the_other_images(seg, photos):
    assert [seg.preprocess(p).layout.count for p in photos] != [1] * 4  # several windows, straddling batches
    _assert_identical(_all_ways(seg, photos))


def test_labels_do_not_depend_on_batching_with_batch_variant_kernels(seg, photos, monkeypatch):
    monkeypatch.setattr(seg, "encode_windows", batch_dependent(seg.encode_windows))
    ways = _all_ways(seg, photos)
    _assert_identical(ways)
    assert len(np.unique(np.concatenate([m.ravel() for m in ways["alone"]]))) > 1  # not all one class
