"""Fonts for the overlay legend, so that class names in any script are drawn as glyphs, not boxes.

The legend is drawn with DejaVu Sans (matplotlib's copy, or the system's) at the legend size. A
character it lacks is drawn with the first installed font that has it (the usual font folders,
broad-coverage families first). Whether a font has a character is read from what it draws: a
font lacks it when it draws it exactly as it draws a code point no font has (its .notdef box);
Pillow exposes no character map, and this needs no extra package. Characters that no installed
font has are named once per process in a warning and stay boxes. Without any TrueType font,
Pillow's built-in font is used.
"""
from __future__ import annotations

import importlib.util
import os
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

NO_GLYPH = "\U0010fffd"  # plane-16 private use: in no font, so every font draws its .notdef for it
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts", "~/Library/Fonts",
             "/Library/Fonts", "/System/Library/Fonts", "C:/Windows/Fonts")
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
# Tried first, in this order (lower-case file-name prefixes): wide coverage of Latin / Greek /
# Cyrillic, then CJK and the other large fallbacks.
PREFERRED = ("dejavusans.", "dejavusans-", "notosans-regular", "notosanscjk", "notoserifcjk", "sourcehansans",
             "droidsansfallback", "wqy", "arialuni", "notosans", "unifont", "freesans")
_MAX_FONT_FILES = 500  # files considered as fallbacks (a desktop may have thousands)
_PROBE_SIZE = 24  # pixels: the size fallbacks are searched at (coverage does not depend on size)
_warned: set = set()  # characters already named in a warning


def _matplotlib_dejavu() -> Path | None:
    """matplotlib's DejaVu Sans, found without importing matplotlib (slow, and optional)."""
    try:
        spec = importlib.util.find_spec("matplotlib")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or ()) if spec is not None else ():
        path = Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return path
    return None


def _rank(path: Path) -> tuple:
    name = path.name.lower()
    first = next((i for i, p in enumerate(PREFERRED) if name.startswith(p)), len(PREFERRED))
    return first, name


@lru_cache(maxsize=1)
def font_files() -> tuple:
    """TrueType / OpenType files to draw with, DejaVu Sans first, then the preferred families."""
    found = []
    for folder in FONT_DIRS:
        root = Path(os.path.expanduser(folder))
        if not root.is_dir():
            continue
        for dirpath, _, files in os.walk(root):
            found.extend(Path(dirpath) / f for f in files if f.lower().endswith(FONT_EXTENSIONS))
            if len(found) > 4 * _MAX_FONT_FILES:
                break
    ordered = sorted(set(found), key=_rank)[:_MAX_FONT_FILES]
    bundled = _matplotlib_dejavu()
    return tuple(([bundled] if bundled is not None else []) + ordered)


@lru_cache(maxsize=256)
def _load(path: Path, size: int):
    from PIL import ImageFont

    try:
        return ImageFont.truetype(str(path), size)
    except (OSError, ValueError, ImportError):  # e.g. bitmap-only colour emoji fonts at this size
        return None


def _mask(font, text: str) -> tuple:
    m = font.getmask(text)
    return m.size, bytes(m)


def has_glyph(font, ch: str) -> bool:
    """Whether `font` draws `ch` as something other than its .notdef box."""
    if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf"):  # controls and format characters: nothing to draw
        return True
    return _mask(font, ch) != _mask(font, NO_GLYPH)


def _covers(font, ch) -> bool:
    try:
        return has_glyph(font, ch)
    except (OSError, ValueError, UnicodeEncodeError):  # e.g. a bitmap font outside its range
        return False


@lru_cache(maxsize=4096)
def fallback_file(ch: str) -> Path | None:
    """The first of font_files() that has `ch` (None: no installed font has it)."""
    for path in font_files():
        font = _load(path, _PROBE_SIZE)
        if font is not None and _covers(font, ch):
            return path
    return None


class LegendFont:
    """The fonts of the legend at one size: the main font and per-character fallbacks."""

    def __init__(self, size: int):
        from PIL import ImageFont

        self.size = size
        # the main font: DejaVu Sans or another preferred family (never an arbitrary file, which
        # could be a symbol font that maps letters to pictures)
        candidates = [p for p in font_files() if p.name == "DejaVuSans.ttf" or _rank(p)[0] < len(PREFERRED)]
        self.main = next((f for f in (_load(p, size) for p in candidates) if f is not None), None)
        if self.main is None:  # no such font installed: Pillow's own
            try:
                self.main = ImageFont.load_default(size=size)
            except (TypeError, ValueError, OSError, ImportError):
                self.main = ImageFont.load_default()
        self._font_of: dict = {}
        self.missing: set = set()  # characters no installed font has

    def font_for(self, ch: str):
        font = self._font_of.get(ch)
        if font is None:
            font = self.main if _covers(self.main, ch) else None
            if font is None:
                path = fallback_file(ch)
                font = None if path is None else _load(path, self.size)
            if font is None:
                self.missing.add(ch)
                font = self.main
            self._font_of[ch] = font
        return font

    def runs(self, text: str) -> list:
        """[(piece, font)]: text cut where the drawing font changes."""
        out = []
        for ch in text:
            font = self.font_for(ch)
            if out and out[-1][1] is font:
                out[-1] = (out[-1][0] + ch, font)
            else:
                out.append((ch, font))
        return out

    def length(self, draw, text: str) -> float:
        return sum(draw.textlength(piece, font=font) for piece, font in self.runs(text))

    def draw(self, draw, xy: tuple, text: str, fill) -> None:
        """Draw text with its left end at xy, vertically centred on xy's row (top-aligned with
        Pillow's built-in bitmap font, which has no anchors)."""
        x, y = xy
        for piece, font in self.runs(text):
            if hasattr(font, "font_variant"):  # FreeType: centre on the row
                draw.text((x, y), piece, fill=fill, font=font, anchor="lm")
            else:
                draw.text((x, y - font.getbbox(piece)[3] // 2), piece, fill=fill, font=font)
            x += draw.textlength(piece, font=font)

    def warn_missing(self) -> None:
        """Name, once per process, the characters drawn as boxes because no font has them."""
        new = sorted(self.missing - _warned)
        if new:
            _warned.update(new)
            names = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in new)
            warnings.warn(f"no installed font has a glyph for {names}: drawn as boxes in the overlay legend "
                          "(install a font that covers them, e.g. Noto Sans CJK or Noto Color Emoji)",
                          UserWarning, stacklevel=3)


@lru_cache(maxsize=16)
def legend_font(size: int) -> LegendFont:
    return LegendFont(size)


__all__ = ["FONT_DIRS", "LegendFont", "fallback_file", "font_files", "has_glyph", "legend_font"]
