"""Turning the images users pass (paths, PIL images, numpy arrays, tensors) into RGB float
tensors [3, H, W] in [0, 1], with errors that say what is wrong with which image."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ..validation import CdamInputError


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(im, path: str):
    """A decoded PIL image -> 8-bit RGB. 16-bit greyscale (PNG / TIFF) is scaled to 0-255
    (v / 257, so 65535 -> 255); Pillow itself scales 16-bit colour images. Modes without a
    defined 8-bit scale (float or 32-bit integer data) raise."""
    from PIL import Image

    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise CdamInputError(f"cannot read image file {path!r}: {im.mode} pixels outside the 16-bit range "
                                 f"[{int(arr.min())}, {int(arr.max())}]; save it as 8- or 16-bit PNG/TIFF")
        grey = np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode == "F":
        raise CdamInputError(f"cannot read image file {path!r}: floating-point pixels (mode F) have no defined "
                             "0-255 scale; save it as 8- or 16-bit PNG/TIFF")
    return im.convert("RGB")


def open_image(path):
    """A PIL RGB image from a file, as viewers show it (EXIF orientation applied, 16-bit data
    scaled to 8 bits), or a CdamInputError naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CdamInputError(f"image file {path!r} does not exist")
    if not os.path.isfile(path):
        raise CdamInputError(f"image path {path!r} is not a file")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # phone photos are stored sideways with an orientation tag
            return _to_rgb(im, path)
    except CdamInputError:
        raise  # already names the file
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CdamInputError(f"cannot read image file {path!r}: {e}") from e


def image_size(path) -> tuple:
    """(width, height) of an image file as viewers show it (EXIF orientation applied), from its
    header only; a CdamInputError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        open_image(path)  # the same message as for reading
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation
            if im.mode == "F":  # refused by open_image too: say so before any model loads
                _to_rgb(im, path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CdamInputError(f"cannot read image file {path!r}: {e}") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def check_dtype(dtype, what: str) -> None:
    """A CdamInputError unless numpy `dtype` holds pixels to_pixels reads: uint8, uint16, bool or
    float (either byte order); raised when a file is opened, before its pixels are read."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b" or (dtype.kind == "u" and dtype.itemsize <= 2) or (dtype.kind == "f" and dtype.itemsize <= 8):
        return
    raise CdamInputError(f"{what} must be uint8, uint16 or float, got {dtype.name if dtype.kind in 'iuc' else dtype}")


def _from_uint_or_float(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype == torch.bool:
        return t.float()
    if not t.is_floating_point():
        raise CdamInputError(f"{what} must be uint8, uint16 or float, got {str(t.dtype).replace('torch.', '')}")
    t = t.float()
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise CdamInputError(f"{what} contains NaN or infinite values")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise CdamInputError(f"{what}: float images must lie in [0, 1] (got values in "
                             f"[{t.min().item():.3g}, {t.max().item():.3g}]); pass uint8 for 0-255 data")
    return t


def to_tensor(image, what: str = "image") -> torch.Tensor:
    """[3, H, W] float32 in [0, 1] on the CPU (tensors keep their device).

    Accepted: a path, a PIL image, a numpy array [H, W] or [H, W, 1|3|4] (channels last, alpha
    dropped), a tensor [H, W] or [1|3, H, W] (channels first); uint8 (0-255), uint16 (0-65535, scaled to 8 bits as 16-bit files are) or float (0-1).
    """
    pixels = to_pixels(image, what)
    return pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels


def to_pixels(image, what: str = "image") -> torch.Tensor:
    """Like to_tensor, but uint8 data stays uint8 [3, H, W] (the published resize works on
    the 8-bit values); other data is float32 in [0, 1]."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
            raise CdamInputError(f"{what}: numpy images are channels-last [H, W, 3]; got shape {image.shape}"
                                 + (" (looks channels-first: use arr.transpose(1, 2, 0))" if image.shape[0] in (1, 3) else ""))
        check_dtype(image.dtype, what)
        if not image.dtype.isnative:  # e.g. a big-endian file: torch reads native byte order only
            image = image.astype(image.dtype.newbyteorder("="))
        if image.ndim == 3:
            image = image[..., :3]
            image = np.ascontiguousarray(image).transpose(2, 0, 1)
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise CdamInputError(f"{what} must be a file path, PIL image, numpy array or torch tensor, "
                             f"got {type(image).__name__}")
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise CdamInputError(f"{what}: expected [H, W] or [1|3, H, W] (channels first for tensors), "
                             f"got shape {tuple(image.shape)}")
    if image.dtype == torch.uint16:  # 16-bit data, scaled to 8 bits as 16-bit image files are
        image = torch.round(image.to(torch.float32) / 257.0).to(torch.uint8)
    if image.dtype != torch.uint8:
        image = _from_uint_or_float(image, what)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def require_opencv():
    """The cv2 module, or a CdamInputError naming the extra that provides it."""
    try:
        import cv2
    except ImportError as e:
        raise CdamInputError("resize='opencv' (the default: the published protocol's uint8 resize) needs OpenCV, "
                             "which the pipeline's extra installs: pip install 'cdam-fast[clip]' "
                             "(opencv-python-headless); or pass resize='torch' (CLI: --resize torch)") from e
    return cv2


def resize(pixels: torch.Tensor, size: tuple, how: str = "torch", device=None) -> torch.Tensor:
    """pixels [3, H, W] (uint8, or float in [0, 1]) -> float32 [3, *size] in [0, 1] on `device`.

    how="opencv": cv2.resize with INTER_LINEAR on the HWC array, as mmseg's test pipeline does;
    exact for uint8 (fixed-point weights, rounded to uint8 before normalisation), float32 data
    is resized by OpenCV in float. how="torch": bilinear (align_corners=False, no antialias)
    on the float image, on `device`.
    """
    device = pixels.device if device is None else device
    if how == "opencv":
        cv2 = require_opencv()
        arr = np.ascontiguousarray(pixels.cpu().permute(1, 2, 0).numpy())
        if tuple(size) != arr.shape[:2]:
            arr = cv2.resize(arr, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)
        out = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).to(device)
        return out.float() / 255.0 if out.dtype == torch.uint8 else out.float()
    if how != "torch":
        raise CdamInputError(f"resize must be 'opencv' or 'torch', got {how!r}")
    x = pixels.to(device)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if tuple(size) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=False)[0]
