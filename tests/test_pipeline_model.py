"""Model loading, the dense backbone and text embeddings, against open_clip's own forward."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdam_fast import CdamInputError
from cdam_fast.pipeline import WeightsUnavailableError, load_clip
from cdam_fast.pipeline import methods, model, text

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def vit_b16():
    """The random-weight ViT-B/16 (shared with the other pipeline test files through load_clip)."""
    return load_clip("ViT-B-16", None, DEVICE)


def test_random_weights_come_from_the_seed_and_leave_global_rng_alone(vit_b16):
    import open_clip

    torch.manual_seed(123)  # whatever the caller's RNG state, the weights are those of seed 5
    state = torch.random.get_rng_state()
    a = load_clip("ViT-S-32", "none", "cpu", seed=5, share=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        fresh = open_clip.create_model("ViT-S-32", pretrained=None).state_dict()
    sa = a.clip.state_dict()
    assert sa.keys() == fresh.keys() and all(torch.equal(sa[k], fresh[k]) for k in sa)
    assert load_clip("ViT-B-16", None, DEVICE) is vit_b16  # loaded once, shared


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(CdamInputError, match="unknown open_clip model name 'ViT-B-99'"):
        load_clip("ViT-B-99", None)
    with pytest.raises(CdamInputError, match="known tags: .*openai"):
        load_clip("ViT-B-16", "no-such-tag")
    with pytest.raises(CdamInputError, match="does not exist"):
        load_clip("ViT-B-16", str(tmp_path / "weights.pt"))
    with pytest.raises(CdamInputError, match="directory"):
        load_clip("ViT-B-16", str(tmp_path))
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="could not load checkpoint"):
        load_clip("ViT-S-32", str(bad), "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CdamInputError, match="no CUDA device"):
            load_clip("ViT-S-32", None, "cuda")

    import open_clip

    def offline(*args, **kwargs):  # what open_clip raises when the hub cannot be reached
        raise RuntimeError("Failed to download weights for tag 'openai': connection refused")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(WeightsUnavailableError, match="local path"):
        load_clip("ViT-B-16", "openai", "cpu", share=False)


def test_vanilla_last_block_reproduces_open_clip(vit_b16):
    """Embedding + blocks + the functional last block with CLIP's own attention = encode_image."""
    bb = vit_b16
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 224, 224, generator=g).to(DEVICE)
    with torch.inference_mode():
        x, grid = bb.embed(img)
        assert grid == bb.native_grid and x.shape == (2, 1 + 196, bb.width)
        x = bb.run_blocks(x, 0, bb.depth - 1)
        out = methods.Vanilla().first_pass(bb, x, grid).out
        ours = bb.project(out[:, 0])
        theirs = F.normalize(bb.clip.encode_image(img).float(), dim=-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_positional_embedding_cache(vit_b16):
    bb = vit_b16
    native = bb.positional_embedding(bb.native_grid)
    assert native.data_ptr() == bb.visual.positional_embedding.data_ptr()
    grid = model.Grid(3, 5)
    pos = bb.positional_embedding(grid)
    assert pos.shape == (16, bb.width) and bb.positional_embedding(grid) is pos
    torch.testing.assert_close(pos[0], bb.visual.positional_embedding[0].detach())
    assert bb.positional_embedding(grid, "size") is not pos
    with pytest.raises(CdamInputError, match="'published' or 'size'"):
        bb.positional_embedding(grid, "nearest")


def _bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """[n_out, n_in]: Keys' cubic convolution (a = -0.75) sampling output i at input coordinate
    (i + 0.5) / scale - 0.5, taps clamped to the border: the formula, written out."""
    a = -0.75
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) / scale - 0.5
        x0 = math.floor(x)
        for k in range(-1, 3):
            d = abs(x - (x0 + k))
            w = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            m[i, min(max(x0 + k, 0), n_in - 1)] += w
    return m


@pytest.mark.parametrize("grid", [(28, 28), (28, 42), (9, 5)])
def test_positional_embedding_follows_the_official_formula(vit_b16, grid):
    """published: bicubic with scale_factor (g + 0.1) / g0 per axis, the factor used as given
    (the table is sampled slightly shrunk); size: scale g / g0. Checked against the cubic
    convolution written out above in float64, not against torch's interpolate."""
    bb = vit_b16
    g0h, g0w = bb.native_grid.h, bb.native_grid.w
    table = bb.visual.positional_embedding.detach().double().cpu()
    patch = table[1:].reshape(g0h, g0w, -1).numpy()
    h, w = grid
    for how, (sh, sw) in (("published", ((h + 0.1) / g0h, (w + 0.1) / g0w)), ("size", (h / g0h, w / g0w))):
        expected = np.einsum("ij,jkc,lk->ilc", _bicubic_matrix(g0h, h, sh), patch, _bicubic_matrix(g0w, w, sw))
        got = bb.positional_embedding(model.Grid(h, w), how).double().cpu()
        np.testing.assert_allclose(got[1:].reshape(h, w, -1).numpy(), expected, rtol=0, atol=2e-6)
        torch.testing.assert_close(got[0], table[0])
    published = bb.positional_embedding(model.Grid(h, w), "published")
    size = bb.positional_embedding(model.Grid(h, w), "size")
    assert (published - size).abs().max() > 1e-3  # the two rules differ visibly: the test can tell them apart


def test_naclip_prior():
    prior = methods.gaussian_prior(model.Grid(3, 4), 5.0, "cpu", torch.float32)
    assert prior.shape == (13, 13)
    assert torch.all(prior[0] == 0) and torch.all(prior[:, 0] == 0)
    # patches 0 = (0, 0) and 6 = (1, 2): squared distance 5
    assert prior[1 + 0, 1 + 6].item() == pytest.approx(math.exp(-5 / 50))
    assert torch.allclose(prior.diagonal()[1:], torch.ones(12))


def test_method_registry():
    assert set(methods.METHODS) == {"maskclip", "sclip", "clearclip", "naclip", "gem"}
    assert methods.get_method("GEM").depth == 6
    with pytest.raises(CdamInputError, match="method must be one of"):
        methods.get_method("pamr")
    with pytest.raises(TypeError):
        methods.register_method(int)


def test_registry_drives_every_choice_list(monkeypatch):
    """A newly registered method appears in get_method, the segment / eval CLI choices and the
    evaluation's config check, with nothing else edited."""
    from cdam_fast.cli import build_parser
    from cdam_fast.evaluation.predictors import pipeline_config
    from cdam_fast.pipeline.options import DTYPES

    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))

    class Toy(methods.MaskClip):
        name = "toy"

    methods.register_method(Toy)
    assert isinstance(methods.get_method("toy"), Toy)
    parser = build_parser()
    for cmd in (["segment", "x.png", "--classes", "a"], ["eval", "--dataset", "voc21", "--root", "r"]):
        assert parser.parse_args([*cmd, "--method", "toy"]).method == "toy"
        args = parser.parse_args(cmd)
        # one set of defaults: unset protocol flags stay None (preset, then Segmenter default)
        assert args.method is None and args.background is None and args.resize is None
        sub = parser._subparsers._group_actions[0].choices[cmd[0]]
        assert tuple(next(a for a in sub._actions if a.dest == "dtype").choices) == DTYPES

    class Dataset:
        class spec:
            has_background = True
    assert pipeline_config(Dataset, method="toy", cdam=True, model="m", pretrained="p")["method"] == "toy"


def test_text_embeddings_match_open_clip(vit_b16):
    """Shortened text forward = encode_text; templates averaged then synonyms averaged."""
    bb = vit_b16
    templates = ("a photo of a {}.", "a drawing of the big {} in the corner.")
    emb = text.TextEmbedder(bb, templates, progress=False)
    cl = text.parse_classes("cat; kitten,sofa")
    got = emb.classes(cl)

    def direct(name):
        with torch.inference_mode():
            feats = bb.clip.encode_text(bb.tokenizer([t.replace("{}", name) for t in templates]).to(DEVICE)).float()
        return F.normalize(F.normalize(feats, dim=-1).mean(0), dim=-1)

    cat = F.normalize((direct("cat") + direct("kitten")) / 2, dim=0)
    torch.testing.assert_close(got, torch.stack([cat, direct("sofa")]).to(got.device), rtol=1e-4, atol=1e-5)
    assert ("kitten", templates) in bb.text_cache  # cached per prompt and template set
