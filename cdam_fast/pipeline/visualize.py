"""Label maps as files and pictures: the label PNG, a colour palette and an overlay with legend."""
from __future__ import annotations

import numpy as np

_ROW = 16  # legend row height, pixels
_PAD = 6


def palette(n: int) -> np.ndarray:
    """[n, 3] uint8 colours: the PASCAL VOC scheme (class 0 black), which spreads the bits of
    the class index over the three channels from the most significant bit down, so that
    neighbouring indices get clearly different colours."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        code, r, g, b = i, 0, 0, 0
        for bit in range(7, -1, -1):
            r |= (code & 1) << bit
            g |= ((code >> 1) & 1) << bit
            b |= ((code >> 2) & 1) << bit
            code >>= 3
        out[i] = (r, g, b)
    return out


def colorize(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """[H, W] class indices -> [H, W, 3] uint8 colours."""
    return palette(max(n_classes, int(labels.max()) + 1 if labels.size else 1))[labels]


def save_labels(labels: np.ndarray, path) -> None:
    """One byte per pixel (8-bit greyscale PNG) for up to 256 classes, 16-bit beyond."""
    from PIL import Image

    if labels.size and int(labels.max()) > 255:
        Image.fromarray(labels.astype(np.uint16)).save(path)
    else:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def class_shares(labels: np.ndarray, class_names) -> list:
    """[(class index, name, fraction of pixels)] of the classes present, largest first."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    order = np.argsort(-counts, kind="stable")
    return [(int(i), class_names[i], counts[i] / labels.size) for i in order if counts[i] > 0]


def overlay(image: np.ndarray, labels: np.ndarray, class_names, alpha: float = 0.5):
    """A PIL image: the input blended with the colour-coded labels, and a legend on the right
    listing the classes present (colour, name, share of the image)."""
    from PIL import Image, ImageDraw, ImageFont

    colors = colorize(labels, len(class_names))
    blend = (image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha).round().astype(np.uint8)
    H, W = labels.shape
    font = ImageFont.load_default()
    colours = palette(len(class_names))
    entries = class_shares(labels, list(class_names))
    texts = [f"{name} {100 * share:.1f}%" for _, name, share in entries]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((probe.textlength(t, font=font) for t in texts), default=0)
    legend_w = int(text_w) + _ROW + 3 * _PAD
    canvas = Image.new("RGB", (W + legend_w, max(H, _PAD * 2 + _ROW * len(entries))), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, ((index, _, _), text) in enumerate(zip(entries, texts)):
        y = _PAD + i * _ROW
        draw.rectangle([W + _PAD, y + 2, W + _PAD + _ROW - 4, y + _ROW - 2], fill=tuple(int(c) for c in colours[index]),
                       outline=(0, 0, 0))
        draw.text((W + 2 * _PAD + _ROW - 4, y + 2), text, fill=(0, 0, 0), font=font)
    return canvas
