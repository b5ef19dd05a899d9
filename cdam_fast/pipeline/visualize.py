"""Label maps as files and pictures: the label PNG, a colour palette and an overlay with legend."""
from __future__ import annotations

import numpy as np

PALETTE_CLASSES = 256  # class counts a one-byte label map (and the palette) hold

_MIN_FONT = 11  # legend text height, pixels, on small images
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


def label_dtype(n_classes: int, wide=np.int64):
    """The dtype of a label map of n_classes: uint8 up to PALETTE_CLASSES, else `wide` (int64 in
    memory, uint16 in files)."""
    return np.uint8 if n_classes <= PALETTE_CLASSES else wide


def colorize(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """[H, W] class indices -> [H, W, 3] uint8 colours."""
    return palette(max(n_classes, int(labels.max()) + 1 if labels.size else 1))[labels]


def save_labels(labels: np.ndarray, path, n_classes: int | None = None, palette_colours: bool = False) -> None:
    """One byte per pixel (8-bit PNG) for up to 256 classes, 16-bit greyscale beyond (up to
    65536). The depth follows n_classes, so every map of one run has the same format whatever
    labels it happens to contain (None: the largest label present decides, for loose maps).
    palette_colours: store the 8-bit map as a palette PNG whose colours are the overlay's (the
    pixel values stay the class indices; image viewers show the colours, and
    `np.asarray(PIL.Image.open(path))` gives the indices); else greyscale."""
    from PIL import Image

    top = int(labels.max()) if labels.size else 0
    if n_classes is None:
        n_classes = top + 1
    if top >= n_classes or (labels.size and int(labels.min()) < 0):
        raise ValueError(f"label values must lie in [0, {n_classes}), got [{int(labels.min())}, {top}]")
    if n_classes > 1 << 16:
        raise ValueError(f"a label PNG holds at most 65536 classes, got {n_classes}")
    if label_dtype(n_classes, np.uint16) == np.uint16:
        Image.fromarray(labels.astype(np.uint16)).save(path, format="PNG")
    elif palette_colours:
        im = Image.fromarray(labels.astype(np.uint8), mode="L").convert("P")
        im.putpalette(palette(PALETTE_CLASSES).reshape(-1).tolist())
        im.save(path, format="PNG")
    else:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(path, format="PNG")


def legend_font_size(height: int, width: int) -> int:
    """Legend text height in pixels: about 1/45 of the image's larger side, at least 11."""
    return max(_MIN_FONT, round(max(height, width) / 45))


def class_shares(labels: np.ndarray, class_names, counts=None) -> list:
    """[(class index, name, fraction of pixels)] of the classes present, largest first; counts:
    the pixel count of every class, when known exactly (else counted in labels)."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names)) if counts is None else np.asarray(counts)
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")
    return [(int(i), class_names[i], counts[i] / total) for i in order if counts[i] > 0]


def overlay(image: np.ndarray, labels: np.ndarray, class_names, alpha: float = 0.5, counts=None):
    """A PIL image: the input blended with the colour-coded labels, and a legend on the right
    listing the classes present (colour, name, share of the image; counts: the full-size map's
    pixel count per class, for a down-scaled preview). Names in any script are drawn with a font
    that has their glyphs (fonts.py); characters no installed font has are named once in a
    warning."""
    from PIL import Image, ImageDraw

    from .fonts import legend_font

    colors = colorize(labels, len(class_names))
    blend = (image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha).round().astype(np.uint8)
    H, W = labels.shape
    size = legend_font_size(H, W)
    font = legend_font(size)
    row, pad = round(1.6 * size), max(_PAD, size // 2)
    colours = palette(len(class_names))
    entries = class_shares(labels, list(class_names), counts)
    texts = [f"{name} {100 * share:.1f}%" for _, name, share in entries]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((font.length(probe, t) for t in texts), default=0)
    font.warn_missing()
    legend_w = int(text_w) + row + 3 * pad
    canvas = Image.new("RGB", (W + legend_w, max(H, pad * 2 + row * len(entries))), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    box = row - 2 * max(2, row // 8)
    for i, ((index, _, _), text) in enumerate(zip(entries, texts)):
        y = pad + i * row
        top = y + (row - box) // 2
        draw.rectangle([W + pad, top, W + pad + box, top + box], fill=tuple(int(c) for c in colours[index]),
                       outline=(0, 0, 0))
        font.draw(draw, (W + 2 * pad + box, y + row // 2), text, fill=(0, 0, 0))
    return canvas
