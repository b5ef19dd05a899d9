"""What `cdam-fast segment INPUTS...` means: image files, folders, globs and lists of paths,
expanded to one ordered list of images, each with the name its outputs are stored under.

* a folder: every image file below it, recursively (hidden files and folders skipped), in
  sorted order of the path relative to the folder; outputs keep that relative path, so
  `photos/2024/a.jpg` of the argument `photos` is stored as `OUT/2024/a_labels.png`;
* a glob (`*`, `?`, `[...]`; `**` matches any depth): the matching image files, sorted;
* a text file of paths (`.txt` or `.lst`): one image path per line, in the file's order; blank
  lines and lines starting with `#` are skipped, relative paths are relative to the list file;
* anything else: an image file (one that does not exist or cannot be read is a failed
  image of the run, like a corrupt one; it does not stop the others).

Order is the arguments' order, then the order above; a file named twice is segmented once.
Outputs of globs, lists and files are named by the file's stem; names that collide get -2,
-3, ... in input order.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from ..validation import CdamInputError

#: File name endings taken as images when expanding folders and globs.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
#: Arguments with these endings are lists of image paths.
LIST_EXTENSIONS = (".txt", ".lst")
_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class InputImage:
    path: str  # as given (joined to its folder or list file)
    name: str  # where its outputs go, relative to the output folder, without suffix ("2024/a")


def _is_image(path: str, extensions=IMAGE_EXTENSIONS) -> bool:
    return path.lower().endswith(extensions)


def _visible(rel: str) -> bool:
    return not any(part.startswith(".") for part in Path(rel).parts)


def _folder(arg: str, extensions=IMAGE_EXTENSIONS) -> list[InputImage]:
    found = []
    for root, dirs, files in os.walk(arg, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and _is_image(f, extensions):
                found.append(os.path.relpath(os.path.join(root, f), arg))
    if not found:
        raise CdamInputError(f"folder {arg!r} holds no image files ({', '.join(extensions)})")
    return [InputImage(os.path.join(arg, rel), Path(rel).with_suffix("").as_posix())
            for rel in sorted(found, key=lambda r: Path(r).parts)]


def _glob(arg: str, extensions=IMAGE_EXTENSIONS) -> list[InputImage]:
    paths = sorted(p for p in glob.glob(arg, recursive=True)
                   if os.path.isfile(p) and _is_image(p, extensions) and _visible(p))
    if not paths:
        raise CdamInputError(f"pattern {arg!r} matches no image files")
    return [InputImage(p, Path(p).stem) for p in paths]


def _list(arg: str) -> list[InputImage]:
    try:
        lines = Path(arg).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CdamInputError(f"list of images {arg!r} cannot be read: {e}") from None
    base = os.path.dirname(arg)
    entries = [ln.strip() for ln in lines]
    paths = [os.path.join(base, os.path.expanduser(e)) for e in entries if e and not e.startswith("#")]
    if not paths:
        raise CdamInputError(f"list of images {arg!r} names no files")
    return [InputImage(p, Path(p).stem) for p in paths]


def expand_inputs(args, exclude=None, extensions=IMAGE_EXTENSIONS) -> list[InputImage]:
    """The images named by the command-line INPUTS, in order, each once (see the module doc).
    exclude: a folder (the output folder) whose files folders and globs never pick up, so that
    a rerun into a folder inside an input folder does not segment its own outputs. extensions:
    the file names folders and globs pick up (native mode adds .npy)."""
    items, seen = [], set()
    skip = os.path.join(os.path.realpath(exclude), "") if exclude is not None else None
    for arg in map(os.fspath, args):
        if os.path.isdir(arg):
            found = _folder(arg, extensions)
        elif any(c in arg for c in _GLOB_CHARS) and not os.path.exists(arg):
            found = _glob(arg, extensions)
        elif arg.lower().endswith(LIST_EXTENSIONS):
            if not os.path.isfile(arg):
                raise CdamInputError(f"list of images {arg!r} does not exist")
            found = _list(arg)
        else:  # a missing or unreadable file fails on its own, as any bad image (the others go on)
            found = [InputImage(arg, Path(arg).stem)]
        searched = os.path.isdir(arg) or any(c in arg for c in _GLOB_CHARS)
        kept = [it for it in found if not (searched and skip is not None and os.path.realpath(it.path).startswith(skip))]
        if found and not kept:
            raise CdamInputError(f"every image file of {arg!r} lies inside the output folder {os.fspath(exclude)!r}, "
                                 "whose files are never inputs; choose another --out")
        for item in kept:
            key = os.path.realpath(item.path)
            if key not in seen:
                seen.add(key)
                items.append(item)
    return unique_names(items)


def unique_names(items: list[InputImage]) -> list[InputImage]:
    """The items with colliding output names made unique by -2, -3, ... in order."""
    count: dict = {}
    out = []
    for it in items:
        n = count.get(it.name, 0) + 1
        count[it.name] = n
        name = it.name if n == 1 else f"{it.name}-{n}"
        while n > 1 and name in count:  # "x-2" given by the inputs themselves
            n += 1
            name = f"{it.name}-{n}"
        count.setdefault(name, 1)
        out.append(InputImage(it.path, name))
    return out
