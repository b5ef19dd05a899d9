"""Checks that make weight loading fail early and clearly: a local file that is not a
checkpoint, and a download that cannot happen (no network, or HF_HUB_OFFLINE=1 with an empty
cache), which would otherwise surface after the hub's retries as a long traceback.
"""
from __future__ import annotations

import os
import socket
import struct
from urllib.parse import urlparse

from ..validation import CdamInputError

# Seconds the connectivity probe waits for a TCP connection to the download host.
PROBE_TIMEOUT = 3.0
_HF_DEFAULT_ENDPOINT = "https://huggingface.co"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched or read."""


class NotACheckpointError(CdamInputError, WeightsUnavailableError):
    """A --pretrained file that is no model checkpoint (bad input, and weights not available)."""


def check_checkpoint_file(path: str) -> None:
    """Raise a CdamInputError (also a WeightsUnavailableError) unless `path` starts like a
    checkpoint open_clip can read: a torch zip archive (torch.save, TorchScript, .npz), a pickle
    (legacy torch.save) or safetensors."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CdamInputError(f"pretrained: cannot read checkpoint file {path!r} ({e})") from None
    if head.startswith(b"PK\x03\x04"):  # zip: torch.save (>= 1.6), TorchScript, numpy .npz
        return
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5
        return
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < (1 << 27) and head[8:9] == b"{":  # safetensors: header length, then JSON
            return
    what = "an empty file" if not head else f"a file starting with {head[:8]!r}"
    raise NotACheckpointError(
        f"pretrained: could not load checkpoint {path!r}: it is not a model checkpoint ({what}); expected an "
        "open_clip / OpenAI CLIP checkpoint (.pt / .pth / .bin saved by torch, or .safetensors)")


def _hub_cached(model_id: str, filename: str, cache_dir) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    for name in names:
        hit = try_to_load_from_cache(model_id, name, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return True
    return False


def _endpoint() -> str:
    try:
        from huggingface_hub import constants

        return getattr(constants, "ENDPOINT", None) or os.environ.get("HF_ENDPOINT") or _HF_DEFAULT_ENDPOINT
    except ImportError:
        return os.environ.get("HF_ENDPOINT") or _HF_DEFAULT_ENDPOINT


def _reachable(url: str, timeout: float) -> str | None:
    """None when a TCP connection to url's host opens within `timeout`, else the reason."""
    parts = urlparse(url)
    host = parts.hostname
    if not host:
        return f"no host in {url!r}"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} unreachable ({e or type(e).__name__})"


def check_download(model: str, tag: str, cfg: dict, cache_dir=None, timeout: float = PROBE_TIMEOUT) -> None:
    """Before open_clip downloads `tag`: if the weights are not cached and cannot be fetched
    (HF_HUB_OFFLINE=1, or the host does not answer within `timeout` seconds), raise
    WeightsUnavailableError with one line saying what to do."""
    if "file" in cfg:
        return
    try:  # open_clip prefers the hub when huggingface_hub is installed, else the URL
        import huggingface_hub  # noqa: F401

        hub = cfg.get("hf_hub") or ""
    except ImportError:
        hub = ""
    if hub:
        model_id, filename = os.path.split(hub)  # "org/name/" or "org/name/file.bin", as open_clip reads it
        if _hub_cached(model_id, filename, cache_dir):
            return
        where = _endpoint()
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            reason = "HF_HUB_OFFLINE is set and they are not in the local cache"
        else:
            why = _reachable(where, timeout)
            reason = None if why is None else f"no network: {why}"
    else:
        url = cfg.get("url") or ""
        folder = os.path.expanduser(cache_dir or "~/.cache/clip")
        if not url or os.path.isfile(os.path.join(folder, os.path.basename(url))):
            return
        why = _reachable(url, timeout)
        reason = None if why is None else f"no network: {why}"
    if reason is not None:
        raise WeightsUnavailableError(
            f"cannot download the {model!r} weights tagged {tag!r} ({reason}). Download them on a machine with "
            "network access (see docs/pipeline.md, 'Real weights') and pass their local path (--pretrained PATH, "
            "pretrained='/path/to/weights'), or use --pretrained none for random weights")
