"""A tiny open_clip ViT (2 blocks of width 64, 16-pixel patches) registered under TINY_MODEL, so
pipeline tests exercise the real code paths in a fraction of ViT-B/16's time."""
import json
import tempfile
from pathlib import Path

TINY_MODEL = "cdam-test-tiny-vit"
_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_clip() -> str:
    """Add the tiny config to open_clip's model registry (idempotent); returns its name."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="cdam-tiny-clip-"))
        (folder / f"{TINY_MODEL}.json").write_text(json.dumps(_CONFIG))
        open_clip.add_model_config(folder)
    return TINY_MODEL
