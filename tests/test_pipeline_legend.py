"""Class names in any script are drawn as glyphs in the overlay legend, not as boxes (tofu),
wherever an installed font has them; characters no font has are named once in a warning."""
import shutil
import subprocess
import warnings

import numpy as np
import pytest

from cdam_fast.pipeline import fonts, visualize

NAMES = {"Latin": "café", "Cyrillic": "кошка", "CJK": "猫"}
NOWHERE = "\U0010fffc"  # plane-16 private use: no font has it


def installed_font_with(ch: str) -> bool | None:
    """Whether some installed font has `ch`, asked of fontconfig and of matplotlib's DejaVu
    Sans's character map (independently of fonts.py); None when neither can be asked."""
    answers = []
    if shutil.which("fc-list") is not None:
        out = subprocess.run(["fc-list", f":charset={ord(ch):x}", "file"], capture_output=True, text=True,
                             timeout=60)
        answers.append(bool(out.stdout.strip()))
    bundled = fonts._matplotlib_dejavu()
    if bundled is not None:
        try:
            from fontTools.ttLib import TTFont
        except ImportError:
            pass
        else:
            answers.append(ord(ch) in TTFont(str(bundled), lazy=True).getBestCmap())
    return any(answers) if answers else None


def legend(name: str) -> np.ndarray:
    labels = np.zeros((60, 80), np.uint8)
    return np.asarray(visualize.overlay(np.zeros((60, 80, 3), np.uint8), labels, [name]))


@pytest.mark.parametrize("script", NAMES)
def test_no_tofu_where_a_font_has_the_glyphs(script):
    name = NAMES[script]
    for ch in name:
        if installed_font_with(ch) is False:
            pytest.skip(f"no installed font has {ch!r} (U+{ord(ch):04X}): no {script} font on this machine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        box = legend(NOWHERE)  # what a character without a glyph looks like (the .notdef box)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: every glyph is found
        for ch in name:
            drawn = legend(ch)
            assert drawn.shape != box.shape or not np.array_equal(drawn, box), f"{ch!r} drawn as a box"
        legend(name)


@pytest.mark.parametrize("script", NAMES)
def test_the_chosen_font_maps_the_characters(script):
    """The font fonts.py picks for each character has it in its character map (read with
    fontTools, independently of the rendering test fonts.py uses)."""
    ttlib = pytest.importorskip("fontTools.ttLib", reason="fontTools is not installed")
    lf = fonts.LegendFont(20)
    for ch in NAMES[script]:
        font = lf.font_for(ch)
        if ch in lf.missing:
            assert installed_font_with(ch) is not True, f"{ch!r}: fontconfig knows a font with it, fonts.py none"
            pytest.skip(f"no installed font has {ch!r} (U+{ord(ch):04X}): no {script} font on this machine")
        path = getattr(font, "path", None)
        assert isinstance(path, str), "a TrueType file is used"
        cmap = ttlib.TTFont(path, fontNumber=getattr(font, "index", 0), lazy=True).getBestCmap()
        assert ord(ch) in cmap, (ch, path)


def test_missing_glyphs_are_named_once(monkeypatch):
    monkeypatch.setattr(fonts, "_warned", set())
    with pytest.warns(UserWarning, match=r"U\+10FFFC"):
        legend(f"cat {NOWHERE}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        legend(f"sofa {NOWHERE}")  # already named
    emoji = "\U0001f431"
    if installed_font_with(emoji) is False:
        with pytest.warns(UserWarning, match=r"U\+1F431"):
            legend(f"cat {emoji}")
