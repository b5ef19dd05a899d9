"""Text embeddings cached on disk, so that a second run does not re-encode thousands of prompts.

One small file per embedding, keyed by everything that decides it: the model name, a digest of
the text tower's weights, a digest of its structure (module types and their settings: QuickGELU
or GELU, LayerNorm eps, attention heads, ...; a parameter-free change such as --quick-gelu is
a different tower with the same weights), the open_clip version (its code is the tower's
forward), the tokenizer, the template set, the device type and the prompt. Files are written to a temporary name and
renamed into place (concurrent writers never expose a partial file; the last rename wins with
an identical payload), and each file carries its own key and a checksum, so a truncated,
corrupted or mismatched file reads as missing and is recomputed.

Location: the `cache_dir` argument, else $CDAM_FAST_CACHE_DIR, else $XDG_CACHE_HOME/cdam_fast,
else ~/.cache/cdam_fast; embeddings go to its `text/` folder. `cache_dir=False` (or the
environment value "off") disables the disk cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path

import torch

CACHE_ENV = "CDAM_FAST_CACHE_DIR"
_OFF = ("off", "none", "0", "false", "no")
_MAGIC = b"CDAMTXT1"
# Bump when the way embeddings are computed or keyed changes (e.g. pipeline/text.py's encoding);
# entries of another format are never read (another folder, and a header that does not match).
_FORMAT = 2
_SCALARS = (type(None), bool, int, float, str)


def default_cache_root() -> Path | None:
    """The cache folder from the environment (None when the environment switches it off)."""
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip():
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and xdg.strip() else Path.home() / ".cache"
    return base / "cdam_fast"


def resolve_cache_root(cache_dir=None) -> Path | None:
    """cache_dir: None (environment / default), False (off) or a folder."""
    if cache_dir is False:
        return None
    if cache_dir is None:
        return default_cache_root()
    if isinstance(cache_dir, str) and cache_dir.strip().lower() in _OFF:
        return None
    return Path(os.fspath(cache_dir)).expanduser()


def text_weights_digest(backbone) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every parameter and buffer outside the
    image tower (about 0.15 s for ViT-B/16); computed once per backbone."""
    digest = getattr(backbone, "_text_digest", None)
    if digest is None:
        h = hashlib.sha256()
        tensors = list(backbone.clip.named_parameters()) + list(backbone.clip.named_buffers())
        for name, t in sorted(tensors, key=lambda kv: kv[0]):
            if name.startswith("visual."):
                continue
            t = t.detach().cpu().reshape(-1).contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digest = h.hexdigest()
        backbone._text_digest = digest
    return digest


def _setting(value):
    """A module attribute as a JSON value when it is configuration (numbers, strings, dtypes,
    functions by name, sequences of those), else None (tensors, submodules, hook tables)."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (tuple, list, set, frozenset)):
        items = [_setting(v) for v in value]
        if any(i is None and v is not None for i, v in zip(items, value)):
            return None
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if callable(value) and hasattr(value, "__qualname__"):  # e.g. an activation stored as a function
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return None


def text_tower_signature(backbone) -> dict:
    """What the text tower computes apart from its weights: QuickGELU or not, and a sha256 of
    every text-side module's type and settings (public attributes that are configuration, e.g.
    eps, num_heads, batch_first, context_length) plus the tokenizer's; computed once per backbone."""
    signature = getattr(backbone, "_text_signature", None)
    if signature is None:
        import open_clip

        h, quick = hashlib.sha256(), False
        for name, module in backbone.clip.named_modules():
            if name == "visual" or name.startswith("visual."):
                continue
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            quick = quick or type(module).__name__ == "QuickGELU"
            settings = {k: _setting(v) for k, v in sorted(vars(module).items())
                        if not k.startswith("_") and k != "training" and _setting(v) is not None}
            h.update(f"{name}|{kind}|{json.dumps(settings, sort_keys=True)}\n".encode())
        tok = backbone.tokenizer
        settings = {k: _setting(v) for k, v in sorted(vars(tok).items()) if _setting(v) is not None} \
            if hasattr(tok, "__dict__") else {}
        h.update(f"tokenizer|{type(tok).__module__}.{type(tok).__qualname__}|"
                 f"{json.dumps(settings, sort_keys=True)}\n".encode())
        signature = {"quick_gelu": quick, "structure": h.hexdigest(), "open_clip": open_clip.__version__}
        backbone._text_signature = signature
    return signature


class TextCache:
    """Embeddings of one (backbone, template set) on disk."""

    def __init__(self, root: Path, backbone, templates: tuple):
        self.model_key = {"format": _FORMAT, "model": backbone.name, "weights": text_weights_digest(backbone),
                          **text_tower_signature(backbone), "device": backbone.device.type}
        model_digest = hashlib.sha256(json.dumps(self.model_key, sort_keys=True).encode()).hexdigest()[:24]
        self.templates_digest = hashlib.sha256("\n".join(templates).encode()).hexdigest()
        self.folder = root / "text" / model_digest
        self._warned = False

    @classmethod
    def open(cls, cache_dir, backbone, templates) -> "TextCache | None":
        root = resolve_cache_root(cache_dir)
        return None if root is None else cls(root, backbone, templates)

    def _key(self, prompt: str) -> dict:
        return {**self.model_key, "templates": self.templates_digest, "prompt": prompt}

    def _path(self, prompt: str) -> Path:
        name = hashlib.sha256(f"{self.templates_digest}\n{prompt}".encode()).hexdigest()[:32]
        return self.folder / name[:2] / f"{name}.emb"

    def get(self, prompt: str) -> torch.Tensor | None:
        """The stored embedding, or None when absent, unreadable, truncated or someone else's."""
        try:
            data = self._path(prompt).read_bytes()
        except OSError:
            return None
        return _decode(data, self._key(prompt))

    def put(self, prompt: str, embedding: torch.Tensor) -> None:
        """Store atomically (temporary file + rename); a cache that cannot be written only warns."""
        path = self._path(prompt)
        payload = embedding.detach().float().cpu().contiguous().numpy().tobytes()
        header = json.dumps({**self._key(prompt), "dim": int(embedding.numel()),
                             "sha256": hashlib.sha256(payload).hexdigest()}, sort_keys=True).encode()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".emb")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_MAGIC + struct.pack("<I", len(header)) + header + payload)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            if not self._warned:
                warnings.warn(f"text-embedding cache {str(self.folder)!r} is not writable ({e}); embeddings are "
                              f"recomputed next time (set {CACHE_ENV} to another folder, or 'off')", stacklevel=2)
                self._warned = True


def _decode(data: bytes, key: dict) -> torch.Tensor | None:
    if len(data) < len(_MAGIC) + 4 or not data.startswith(_MAGIC):
        return None
    (n,) = struct.unpack_from("<I", data, len(_MAGIC))
    start = len(_MAGIC) + 4
    try:
        header = json.loads(data[start:start + n])
    except ValueError:
        return None
    payload = data[start + n:]
    if not isinstance(header, dict) or any(header.get(k) != v for k, v in key.items()):
        return None
    dim = header.get("dim")
    if not isinstance(dim, int) or len(payload) != 4 * dim:
        return None
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        return None
    return torch.frombuffer(bytearray(payload), dtype=torch.float32)
