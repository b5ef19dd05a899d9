"""Class lists, prompt templates and text embeddings (spec section 1).

A class is one or more synonyms ("person; people; man"). Each synonym is encoded with every
prompt template, the template embeddings are L2-normalised, averaged and re-normalised; a
class's embedding is the re-normalised mean of its synonyms' embeddings (averaging keeps one
column per class, which the class distributions and the background threshold need).
Embeddings are cached per (prompt, templates) on the backbone, so class lists that share
names, and the augmented prompts (ATP), are encoded once per model, and on disk (textcache.py),
so that they are encoded once per machine.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from ..validation import CdamInputError

SINGLE_TEMPLATE = ("a photo of a {}.",)
_SYNONYM_SEP = ";"
_TEXT_BATCH = 256
_PROGRESS_FROM = 512  # prompts; fewer encode quickly enough to need no progress bar


class ClassFileWarning(UserWarning):
    """A class file that is probably not what its author meant (e.g. a comma-separated line)."""


@dataclass(frozen=True)
class ClassList:
    """Output classes, each a tuple of synonyms; the first synonym is the display name."""
    synonyms: tuple

    @property
    def names(self) -> tuple:
        return tuple(s[0] for s in self.synonyms)

    def __len__(self) -> int:
        return len(self.synonyms)


def _split_synonyms(entry, where: str) -> tuple:
    parts = entry.split(_SYNONYM_SEP) if isinstance(entry, str) else list(entry)
    if not all(isinstance(p, str) for p in parts):
        raise CdamInputError(f"classes: {where} must be a string or a sequence of strings, got {entry!r}")
    names = tuple(p.strip() for p in parts if p.strip())
    if not names:
        raise CdamInputError(f"classes: {where} is empty")
    return names


def parse_classes(classes) -> ClassList:
    """A ClassList from "cat,sofa,background" (synonyms joined by ';'), a sequence of such
    entries, a sequence of synonym sequences, or a ClassList."""
    if isinstance(classes, ClassList):
        return classes
    if isinstance(classes, str):
        entries = classes.split(",")
        if not classes.strip():
            raise CdamInputError("classes: the class list is empty")
    elif isinstance(classes, (list, tuple)):
        entries = list(classes)
    else:
        raise CdamInputError(f"classes must be a comma-separated string or a list of names, got {type(classes).__name__}")
    if not entries:
        raise CdamInputError("classes: the class list is empty")
    out = tuple(_split_synonyms(e, f"entry {i + 1} ({e!r})") for i, e in enumerate(entries))
    seen = {}
    for i, syn in enumerate(out):
        key = syn[0].lower()
        if key in seen:
            raise CdamInputError(f"classes: {syn[0]!r} appears twice (entries {seen[key] + 1} and {i + 1})")
        seen[key] = i
    return ClassList(out)


def packaged_class_lists() -> tuple:
    """Names of the class lists shipped in cdam_fast/data/classes (voc21, context60, ...)."""
    folder = resources.files("cdam_fast") / "data" / "classes"
    return tuple(sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt")))


def _read_lines(path, what: str) -> list:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CdamInputError(f"{what}: cannot read {str(path)!r} ({e})") from e
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def read_class_file(path) -> ClassList:
    """One class per line, synonyms separated by ';', '#' starts a comment line. A name of a
    packaged list (see packaged_class_lists) is accepted in place of a path."""
    path = os.fspath(path)
    packaged = not os.path.exists(path) and path in packaged_class_lists()
    if packaged:
        path = resources.files("cdam_fast") / "data" / "classes" / f"{path}.txt"
    elif not os.path.isfile(path):
        raise CdamInputError(f"classes file {path!r} does not exist (packaged lists: {', '.join(packaged_class_lists())})")
    lines = _read_lines(path, "classes file")
    if not lines:
        raise CdamInputError(f"classes file {str(path)!r} has no classes")
    with_commas = [ln for ln in lines if "," in ln]
    if with_commas and not packaged:  # a packaged list's commas are deliberate (CLIPer's names)
        warnings.warn(f"classes file {str(path)!r}: {len(with_commas)} line(s) contain commas, e.g. "
                      f"{with_commas[0]!r}, which is read as ONE class named with commas; the file takes one class "
                      "per line (synonyms joined by ';')", ClassFileWarning, stacklevel=2)
    return parse_classes(lines)


def atp_prompts() -> tuple:
    """The 80 augmented text prompts (colours, patterns, materials, super-categories)."""
    return tuple(_read_lines(resources.files("cdam_fast") / "data" / "atp.txt", "atp prompts"))


def _template_string(t) -> str:
    s = t("{}") if callable(t) else t
    if not isinstance(s, str) or "{}" not in s:
        raise CdamInputError(f"templates: each template must contain '{{}}' for the class name, got {s!r}")
    return s


def resolve_templates(templates=None) -> tuple:
    """Prompt templates as format strings: None or "openai" -> the 80 OpenAI ImageNet templates,
    "single" -> "a photo of a {}.", a path -> one template per line, or a sequence."""
    if templates is None or templates in ("openai", "imagenet80"):
        from .model import _open_clip

        open_clip = _open_clip()  # the install hint when the extra is missing
        return tuple(_template_string(t) for t in open_clip.OPENAI_IMAGENET_TEMPLATES)
    if templates == "single":
        return SINGLE_TEMPLATE
    if isinstance(templates, (str, os.PathLike)):
        if not os.path.isfile(templates):
            raise CdamInputError(f"templates: {str(templates)!r} is not 'openai', 'single' or an existing file")
        templates = _read_lines(templates, "templates file")
    out = tuple(_template_string(t) for t in templates)
    if not out:
        raise CdamInputError("templates: no prompt templates given")
    return out


class TextEmbedder:
    """Prompt embeddings of one backbone; the in-memory cache lives on the backbone (shared by
    every Segmenter built on it), the disk cache in `cache_dir` (see textcache.py; False: off)."""

    def __init__(self, backbone, templates=None, progress: bool = True, cache_dir=None):
        self.backbone = backbone
        self.templates = resolve_templates(templates)
        self.progress = progress
        self.cache_dir = cache_dir
        self._disk = False  # opened on first use: the weights digest costs a pass over the text tower

    def _disk_cache(self):
        if self._disk is False:
            from .textcache import TextCache

            self._disk = TextCache.open(self.cache_dir, self.backbone, self.templates)
        return self._disk

    def prompts(self, names) -> torch.Tensor:
        """[len(names), E] normalised template-averaged embeddings, one per prompt (float32)."""
        cache = self.backbone.text_cache
        missing = list(dict.fromkeys(n for n in names if (n, self.templates) not in cache))
        disk = self._disk_cache() if missing else None
        if disk is not None:
            for n in missing:
                e = disk.get(n)
                if e is not None:
                    cache[(n, self.templates)] = e.to(self.backbone.device)
            missing = [n for n in missing if (n, self.templates) not in cache]
        if missing:
            self._encode(missing)
            if disk is not None:
                for n in missing:
                    disk.put(n, cache[(n, self.templates)])
        return torch.stack([cache[(n, self.templates)] for n in names])

    def classes(self, class_list: ClassList) -> torch.Tensor:
        """[C, E]: each class the re-normalised mean of its synonyms' embeddings."""
        flat = [s for syn in class_list.synonyms for s in syn]
        emb = self.prompts(flat)
        rows, i = [], 0
        for syn in class_list.synonyms:
            rows.append(emb[i:i + len(syn)].mean(0))
            i += len(syn)
        return F.normalize(torch.stack(rows), dim=-1)

    @torch.inference_mode()
    def _encode(self, names: list) -> None:
        T = len(self.templates)
        texts = [t.replace("{}", n) for n in names for t in self.templates]
        bar = None
        if self.progress and len(texts) >= _PROGRESS_FROM:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="text prompts", unit="prompt", leave=False)
        feats = []
        for i in range(0, len(texts), _TEXT_BATCH):
            tokens = self.backbone.tokenizer(texts[i:i + _TEXT_BATCH])
            feats.append(F.normalize(self.backbone.encode_text(tokens), dim=-1))
            if bar is not None:
                bar.update(len(texts[i:i + _TEXT_BATCH]))
        if bar is not None:
            bar.close()
        feats = torch.cat(feats).reshape(len(names), T, -1)
        per_name = F.normalize(feats.mean(1), dim=-1)
        for n, e in zip(names, per_name):
            self.backbone.text_cache[(n, self.templates)] = e
