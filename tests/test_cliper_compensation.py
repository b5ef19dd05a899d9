"""CLIPer's SD compensation, offline: a tiny randomly initialised UNet / VAE saved as a local
diffusers folder in the test (the real one is Stable Diffusion 2.1-base, 5 GB)."""
import functools
import sys

import numpy as np
import pytest
import torch

from cdam_fast import CdamInputError

diffusers = pytest.importorskip("diffusers", reason="the 'sd' extra (diffusers) is not installed")

SIZE = 32  # UNet input side in the tests: VAE factor 2 -> 16 x 16 latents, 256-token maps


@functools.lru_cache(maxsize=None)
def _tiny_folder(root):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=4)
    unet.save_pretrained(f"{root}/unet")
    vae.save_pretrained(f"{root}/vae")
    diffusers.PNDMScheduler(skip_prk_steps=True).save_pretrained(f"{root}/scheduler")
    return root


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return _tiny_folder(str(tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def prompt():
    return torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def comp(sd_folder, prompt):
    from cdam_fast.pipeline.compensation import SdCompensation

    return SdCompensation(sd_folder, "cpu", threshold=0.1, seed=5, size=SIZE, prompt_embeds=prompt)


def _image(seed=0):
    return torch.rand(3, 40, 52, generator=torch.Generator().manual_seed(seed))


def test_capture_processor_keeps_the_unet_output(comp):
    """The capturing processor computes exactly what diffusers' own processor computes."""
    from diffusers.models.attention_processor import AttnProcessor

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(100)
    with torch.inference_mode():
        ours = comp.unet(latents, t, encoder_hidden_states=comp.prompt_embeds).sample
        modules = dict(comp.unet.named_modules())
        saved = {n: modules[n].processor for n in comp.layers}
        for n in comp.layers:
            modules[n].set_processor(AttnProcessor())
        theirs = comp.unet(latents, t, encoder_hidden_states=comp.prompt_embeds).sample
        for n, p in saved.items():
            modules[n].set_processor(p)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_maps_are_self_attention_at_latent_resolution_and_seeded(comp):
    a = comp.attention_maps(_image())
    heads = comp.unet.up_blocks[-1].attentions[0].transformer_blocks[0].attn1.heads
    assert a.shape == (2 * heads, 256, 256) and comp.grid == 16
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), rtol=0, atol=1e-5)
    torch.testing.assert_close(comp.attention_maps(_image()), a, rtol=0, atol=0)  # seeded noise
    assert (comp.attention_maps(_image(1)) - a).abs().max() > 1e-6


def test_propagation_matches_literal_chain(comp, gen):
    from functools import reduce

    att = comp.attention_maps(_image())
    maps = torch.rand(3, 16, 16, generator=gen)
    A = att.clone()
    A /= torch.amax(A, dim=-2, keepdim=True) + 1e-5
    A = torch.where(A < comp.threshold, 0, A)
    A /= A.sum(dim=-1, keepdim=True) + 1e-5
    assert (A == 0).any()
    R = reduce(torch.matmul, A.double(), torch.eye(256, dtype=torch.float64))
    expect = (R @ maps.flatten(1).T.double()).T.reshape(3, 16, 16)
    torch.testing.assert_close(comp.propagate(maps, att.clone()).double(), expect, rtol=1e-4, atol=1e-7)


def test_missing_folder_and_missing_parts_name_the_path(tmp_path):
    from cdam_fast.pipeline.compensation import SdCompensation

    with pytest.raises(CdamInputError, match="sd_weights"):
        SdCompensation(None, "cpu")
    with pytest.raises(CdamInputError, match=str(tmp_path / "nope")):
        SdCompensation(tmp_path / "nope", "cpu")
    (tmp_path / "unet").mkdir()
    with pytest.raises(CdamInputError, match="vae"):
        SdCompensation(tmp_path, "cpu")


def test_missing_diffusers_names_the_extra(sd_folder, monkeypatch):
    from cdam_fast.pipeline.compensation import SdCompensation

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"cdam-fast\[sd\]"):
        SdCompensation(sd_folder, "cpu", size=SIZE, prompt_embeds=torch.zeros(1, 7, 16))


def test_missing_text_encoder_is_named(sd_folder):
    from cdam_fast.pipeline.compensation import SdCompensation

    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"cdam-fast\[sd\]"):
            SdCompensation(sd_folder, "cpu", size=SIZE)
    else:
        with pytest.raises(CdamInputError, match="text_encoder"):
            SdCompensation(sd_folder, "cpu", size=SIZE)


def test_segmenter_with_compensation(sd_folder, prompt):
    """The compensated map is the propagation of the CLIPer map resized to the latent grid;
    class scores mix refined and unrefined maxima; results repeat."""
    from cdam_fast.pipeline import Segmenter
    from cdam_fast.pipeline.segmenter import _assembler
    from test_cliper import tiny_clip

    bb = tiny_clip()
    opts = dict(model=bb, method="cliper", mode="global", short_side=64, templates="single", progress=False,
                atp=["red"], background=None)
    plain = Segmenter("background,cat,sofa", **opts)
    seg = Segmenter("background,cat,sofa", compensation="sd", sd_weights=sd_folder,
                    sd_options=dict(size=SIZE, prompt_embeds=prompt), **opts)
    img = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    base = next(plain.results([img]))
    got = next(seg.results([img]))
    item = seg.preprocess(img)
    grid_maps = _assembler(item.layout, item.tokens, (16, 16), seg.device)(base.window_logits)
    image01 = (item.pixels * seg._std + seg._mean).clamp(0, 1)
    expect = seg.compensation.propagate(grid_maps, seg.compensation.attention_maps(image01))
    torch.testing.assert_close(got.window_logits[0], expect, rtol=1e-5, atol=1e-6)
    scores = 0.5 * expect.amax(dim=(1, 2)) + 0.5 * base.window_logits.amax(dim=(0, 2, 3))
    torch.testing.assert_close(got.class_scores, scores)
    labels = seg.predict(img)
    assert labels.shape == (50, 70) and (labels == seg.predict(img)).all()
    assert "SD compensation" in repr(seg)
