"""`Segmenter`: open-vocabulary segmentation with a CLIP last-layer method, optionally refined
by CDAM, at any image resolution.

Per image: it is resized to the protocol size and cut into windows (or kept whole in global
mode); its windows go through the image tower in batches of `window_batch`, never together
with another image's, so that an image's labels depend only on the image and the settings,
not on which images are segmented with it (GPU kernels round differently at other batch
compositions): re-running one image, resuming, or sharding a folder differently gives
byte-identical outputs. Each window yields token logits; they are assembled per image at token
resolution and upsampled once (see windows.py).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..dispatch import BACKENDS
from ..grids import CDAM_SCALES
from ..ops import MODES as CDAM_MODES
from ..ops import multiscale_cdam_attention
from ..validation import CdamInputError, check_alpha, check_positive, check_scales, check_tau
from . import background as bg
from . import native
from .images import require_opencv
from .images import resize as resize_pixels
from .images import to_pixels
from .methods import get_method, segmenter_class
from .model import DEFAULT_MODEL, DEFAULT_PRETRAINED, RANDOM_WEIGHTS_SEED, ClipBackbone, load_clip
from .pamr import pamr
from .presets import PAMR_DILATIONS, POS_INTERPOLATIONS, RESIZES, SYNONYM_RULES, check_choice
from .text import TextEmbedder, atp_prompts, parse_classes, resolve_templates
from .visualize import label_dtype
from .windows import CROP, LONG_SIDE_MAX, SHORT_SIDE, STRIDE, Assembler, global_size, protocol_size, \
    sliding_layout, whole_layout

MODES = ("window", "global")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_LABEL_CHUNK = 1 << 24  # logits elements materialised at once while labelling
_WINDOW_BAR_PASSES = 2  # a progress bar over windows when a group needs more forward passes than this


def _image_name(image, index: int, names) -> str:
    if names is not None:
        return str(names[index])
    if isinstance(image, (str, os.PathLike)):
        return f"image {os.fspath(image)!r}"
    return f"image {index}"


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CdamInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The autocast dtype for `device`, or a CdamInputError naming `dtype`."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise CdamInputError(f"dtype must be one of {sorted(set(_DTYPES))}, got {dtype!r}")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise CdamInputError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if dtype != torch.float32 and device.type != "cuda":
        raise CdamInputError(f"dtype {dtype} (autocast) needs a CUDA device; use float32 on {device.type}")
    return dtype


def plan_image(H: int, W: int, patch: tuple, mode: str, short_side: int, long_side: int, crop: int, stride: int,
               what: str = "image", model: str = "the model"):
    """(resized size (H', W'), window layout) of an H x W image, or a CdamInputError when it
    cannot be segmented. Needs only the patch size, so callers can check images before the
    model loads."""
    ph, pw = patch
    if H < ph or W < pw:
        raise CdamInputError(f"{what} is {W}x{H} pixels (W x H), smaller than one {pw}x{ph} patch of {model}")
    if mode == "window":
        if crop < ph or crop < pw:
            raise CdamInputError(f"crop ({crop}) is smaller than one {pw}x{ph} patch of {model}")
        size = protocol_size(H, W, short_side, long_side)
        layout = sliding_layout(size, crop, stride)
    else:
        size = global_size(H, W, (ph, pw), short_side, long_side)
        layout = whole_layout(size)
    if layout.window[0] < ph or layout.window[1] < pw:
        raise CdamInputError(f"{what} ({W}x{H}, W x H) is too elongated: resized to {size[1]}x{size[0]} its short "
                             f"side is below one {pw}x{ph} patch; raise long_side or crop the image")
    return size, layout


@dataclass
class _Prepared:
    pixels: torch.Tensor  # [3, H', W'] normalised, on the compute device
    original: tuple  # (H, W) of the input
    layout: object  # WindowLayout
    tokens: tuple  # patch grid of each window
    assembler: object = None  # native mode: its TapAssembler (else built from the layout)
    pamr_pixels: torch.Tensor | None = None  # native mode: PAMR's image at the input size


@dataclass
class ImageResult:
    """Window token logits of one image and what is needed to turn them into pixels."""
    window_logits: torch.Tensor  # [n_windows, C, h_tok, w_tok], float32
    threshold: torch.Tensor | float | None
    assembler: Assembler
    original: tuple
    pixels: torch.Tensor | None = None  # the normalised resized image, kept for PAMR only


class Segmenter:
    """Open-vocabulary semantic segmentation with CLIP (+ CDAM).

    classes: "cat,sofa,background" (synonyms joined by ';'), or a list of names / synonym lists.
    model: an open_clip model name or an already loaded `ClipBackbone` (shared between
    segmenters, text embeddings cached on it). pretrained: tag, local checkpoint or None (random
    weights from `seed`). method: maskclip | sclip | clearclip | naclip | gem; cdam: refine it
    with CDAM. mode: "window" (the published sliding windows) or "global" (the whole image at
    once, CDAM across all of its tokens). background: "auto" (entropy-adaptive when the first
    class is "background", else none), "entropy", "entropy-per-window", a fixed threshold, or
    None. dtype: autocast dtype on CUDA (default float16); float32 on CPU.
    Keyword-only: templates ("openai" 80, "single", a file or a list), atp (prompts that only
    shape the class distributions; default the 80 packaged ones), crop / stride / short_side /
    long_side (protocol), window_batch (windows of one image per forward pass;
    like backend and dtype it may change the last bits of GPU results), logit_scale, CDAM's scales /
    tau / alpha, cdam_mode / memory_budget (passed to the fused op), progress (text bars: prompt
    encoding, and the windows of a large image), cache_dir (disk cache of text embeddings, see
    pipeline/textcache.py; None: $CDAM_FAST_CACHE_DIR or ~/.cache/cdam_fast, False: off),
    and the protocol choices of presets.py: resize ("opencv", the published uint8 resize, the
    default; "torch" resizes the float image on self.device), pos_interp ("published" or
    "size"), synonyms ("max", the published rule, the default; or "mean"), pamr_steps /
    pamr_dilations (PAMR post-processing, off at 0 steps).
    scale: None (default: the published protocol's resize) or a factor (1.0: native
    resolution) at which windows of `crop` at `stride` cover the image, for large and aerial
    images; global_tokens bounds CDAM's tiles in global mode then (native.py, streamed.py).
    `Segmenter(classes, **presets.preset("cdam-voc21"))` reproduces a published configuration.
    """

    def __new__(cls, *args, **kwargs):
        # a segmenter method (methods.SEGMENTER_METHODS, e.g. "cliper") builds its own subclass
        sub = segmenter_class(kwargs.get("method", args[3] if len(args) > 3 else None)) if cls is Segmenter else None
        return super().__new__(sub or cls)

    def __init__(self, classes, model=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED, method: str = "maskclip",
                 cdam: bool = True, mode: str = "window", backend: str = "auto", device=None, dtype=None,
                 background="auto", *, templates=None, atp=None, crop: int = CROP, stride: int = STRIDE,
                 short_side: int = SHORT_SIDE, long_side: int = LONG_SIDE_MAX, window_batch: int = 16,
                 logit_scale: float = bg.LOGIT_SCALE, scales=CDAM_SCALES, tau: float = 0.1, alpha: float = 10.0,
                 cdam_mode: str = "auto", memory_budget: int | None = None, seed: int = RANDOM_WEIGHTS_SEED,
                 quick_gelu: bool | None = None, progress: bool = True, cache_dir=None, resize: str = "opencv",
                 pos_interp: str = "published", synonyms: str = "max", pamr_steps: int = 0,
                 pamr_dilations=PAMR_DILATIONS, scale: float | None = None,
                 global_tokens: int = native.DEFAULT_GLOBAL_TOKENS):
        self.classes = parse_classes(classes)
        self.scale = native.check_scale(scale)  # None: the published protocol's resize; else native.py
        self.global_tokens = native.check_global_tokens(global_tokens)
        self.method = get_method(method)
        self.method_name = self.method.name  # what outputs call the method (a segmenter method sets its own)
        if mode not in MODES:
            raise CdamInputError(f"mode must be one of {MODES}, got {mode!r}")
        if backend not in BACKENDS:
            raise CdamInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if cdam_mode not in CDAM_MODES:
            raise CdamInputError(f"cdam_mode must be one of {CDAM_MODES}, got {cdam_mode!r}")
        self.background = bg.check_background(background, self.classes.names)
        self.mode, self.backend, self.cdam = mode, backend, bool(cdam)
        self.crop, self.stride = _check_int("crop", crop), _check_int("stride", stride)
        if stride > crop:
            raise CdamInputError(f"stride ({stride}) must not exceed crop ({crop}): pixels between windows would "
                                 "get no prediction")
        self.short_side, self.long_side = _check_int("short_side", short_side), _check_int("long_side", long_side)
        self.window_batch = _check_int("window_batch", window_batch)
        self.logit_scale = check_positive("logit_scale", logit_scale)
        self.scales, self.tau, self.alpha = check_scales(scales), check_tau(tau), check_alpha(alpha)
        self.cdam_mode, self.memory_budget = cdam_mode, memory_budget
        self.resize = check_choice("resize", resize, RESIZES)
        self.pos_interp = check_choice("pos_interp", pos_interp, POS_INTERPOLATIONS)
        self.synonyms = check_choice("synonyms", synonyms, SYNONYM_RULES)
        self.pamr_steps = _check_int("pamr_steps", pamr_steps, 0)
        self.pamr_dilations = tuple(_check_int("pamr_dilations", d) for d in pamr_dilations)
        if self.resize == "opencv":
            require_opencv()  # a missing extra fails here, before the model load
        templates = resolve_templates(templates)  # cheap checks before the (slow) model load
        self.atp = tuple(atp_prompts() if atp is None else atp)
        if not all(isinstance(a, str) and a.strip() for a in self.atp):
            raise CdamInputError("atp must be a sequence of non-empty prompts")

        if isinstance(model, ClipBackbone):
            want = None if device is None else torch.device(device)
            if want is not None and (want.type != model.device.type or want.index not in (None, model.device.index)):
                raise CdamInputError(f"device {device!r} differs from the given model's device {model.device}")
            self.backbone = model
        else:
            self.backbone = load_clip(model, pretrained, device, seed=seed, quick_gelu=quick_gelu)
        self.device = self.backbone.device
        self.dtype = resolve_dtype(dtype, self.device)
        ph, pw = self.backbone.patch_size
        if crop < max(ph, pw):
            raise CdamInputError(f"crop ({crop}) is smaller than the model's {ph}x{pw} patches")

        self.progress = progress
        self._text_embedder = text = TextEmbedder(self.backbone, templates, progress=progress, cache_dir=cache_dir)
        self.owner = None  # class of each text row when synonyms are kept apart
        if self.synonyms == "max" and any(len(s) > 1 for s in self.classes.synonyms):
            self.text = text.prompts([n for syn in self.classes.synonyms for n in syn]).to(self.device)  # [S, E]
            self.owner = torch.tensor([c for c, syn in enumerate(self.classes.synonyms) for _ in syn],
                                      device=self.device)
        else:
            self.text = text.classes(self.classes).to(self.device)  # [C, E]
        self._atp_text = None  # the ATP embeddings, encoded when CDAM first needs them
        self._distribution_text = None  # (the text it was made from, [text; ATP])
        self._mean = torch.tensor(self.backbone.mean, device=self.device).reshape(3, 1, 1)
        self._std = torch.tensor(self.backbone.std, device=self.device).reshape(3, 1, 1)

    def __repr__(self):
        return (f"Segmenter({len(self.classes)} classes, {self.method_name}{' + CDAM' if self.cdam else ''}, "
                f"{self.backbone.name} ({self.backbone.source}), mode={self.mode}, backend={self.backend}, "
                f"device={self.device}, dtype={self.dtype})")

    @property
    def class_names(self) -> tuple:
        return self.classes.names

    @property
    def distribution_text(self) -> torch.Tensor:
        """[C + A, E]: the columns of S (class embeddings, then the augmented prompts). The ATP
        prompts are encoded on first use, so a run without CDAM never encodes them."""
        if self._atp_text is None:
            self._atp_text = (self._text_embedder.prompts(list(self.atp)).to(self.device) if self.atp
                              else self.text[:0])
        if self._distribution_text is None or self._distribution_text[0] is not self.text:
            self._distribution_text = (self.text, torch.cat([self.text, self._atp_text]))  # once per text
        return self._distribution_text[1]

    def use_class_embeddings(self, embeddings: torch.Tensor) -> None:
        """Replace the class text embeddings [C, E] (e.g. precomputed or image prototypes);
        they are L2-normalised. The ATP embeddings of the class distributions are kept."""
        C, E = len(self.classes), self.text.shape[1]
        if not isinstance(embeddings, torch.Tensor) or tuple(embeddings.shape) != (C, E):
            raise CdamInputError(f"embeddings must be a tensor of shape ({C}, {E}), got "
                                 f"{tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__}")
        if not bool(torch.isfinite(embeddings).all()):
            raise CdamInputError("embeddings contain NaN or infinite values")
        self.text, self.owner = F.normalize(embeddings.to(self.device, torch.float32), dim=-1), None

    # -- the network on a batch of windows ------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def encode_windows(self, crops: torch.Tensor) -> torch.Tensor:
        """Normalised crops [B, 3, h, w] (on self.device) -> token logits [B, S, h_tok, w_tok]
        (float32, cosine similarities to the text rows: one per class, or one per synonym with
        synonyms="max"; no logit scale). The unit of work that throughput benchmarks time."""
        bb, method = self.backbone, self.method
        dist_text = self.distribution_text if self.cdam else None  # (first call: ATP encoded outside autocast)
        with self._autocast():
            x, grid = bb.embed(crops, self.pos_interp)
            x = bb.run_blocks(x, 0, bb.depth - method.depth)
            first = method.first_pass(bb, x, grid)  # x_L1 stays cached in `first` for the re-run
            feats = bb.project(first.out[:, 1:])  # [B, N, E] float32
            if self.cdam:
                sim = feats @ dist_text.T  # S: raw cosine similarities [B, N, C']
                sim = sim.transpose(1, 2).reshape(sim.shape[0], -1, grid.h, grid.w)
                with torch.autocast(self.device.type, enabled=False):  # the divergence stays fp32
                    heads_out = multiscale_cdam_attention(
                        sim.contiguous(), first.v[:, 1:].contiguous(), self.scales, self.tau, self.alpha,
                        mode=self.cdam_mode, memory_budget=self.memory_budget, backend=self.backend)
                feats = bb.project(method.rerun(bb, first, heads_out))
        logits = feats @ self.text.T  # [B, N, C]
        return logits.transpose(1, 2).reshape(logits.shape[0], -1, grid.h, grid.w)

    # -- images -> windows -> results ---------------------------------------------------------
    def preprocess(self, image, what: str = "image") -> _Prepared:
        """Resize to the protocol size (or to `scale`, native.py) and normalise; plan the windows."""
        if self.scale is not None:
            return native.prepare(self, image, what, _Prepared)
        pixels = to_pixels(image, what)
        H, W = pixels.shape[-2:]
        ph, pw = self.backbone.patch_size
        size, layout = plan_image(H, W, (ph, pw), self.mode, self.short_side, self.long_side, self.crop,
                                  self.stride, what, self.backbone.name)
        pixels = resize_pixels(pixels, size, self.resize, self.device)
        tokens = (layout.window[0] // ph, layout.window[1] // pw)
        return _Prepared((pixels - self._mean) / self._std, (H, W), layout, tokens)

    def _threshold(self, window_logits: torch.Tensor):
        if self.background is None or isinstance(self.background, float):
            return self.background
        tokens = window_logits if self.background == "entropy" else window_logits[-1:]
        tokens = bg.class_logits(tokens.transpose(0, 1), self.owner, len(self.classes))  # [C, n, h, w]
        return bg.entropy_threshold(tokens.movedim(0, -1), self.logit_scale)

    def _run_group(self, items: list) -> list:
        crops: dict = {}
        for ii, it in enumerate(items):
            h, w = it.layout.window
            for wi, (y, x) in enumerate(it.layout.boxes()):
                # one image's windows per forward pass; native mode: one band (row of windows) of it
                key = (ii, h, w) if self.scale is None else (ii, h, w, y)
                crops.setdefault(key, []).append((ii, wi, it.pixels[:, y:y + h, x:x + w]))
        outs = [[None] * it.layout.count for it in items]
        total = sum(len(e) for e in crops.values())
        bar = None
        if self.progress and total > _WINDOW_BAR_PASSES * self.window_batch:  # e.g. one large image
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="windows", unit="window", leave=False)
        try:
            for entries in crops.values():
                for j in range(0, len(entries), self.window_batch):
                    chunk = entries[j:j + self.window_batch]
                    logits = self.encode_windows(torch.stack([c for _, _, c in chunk]))
                    for (ii, wi, _), lg in zip(chunk, logits):
                        outs[ii][wi] = lg
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        results = []
        for it, o in zip(items, outs):
            wl = torch.stack(o)
            asm = it.assembler or _assembler(it.layout, it.tokens, it.original, self.device)
            pixels = it.pixels if it.pamr_pixels is None else it.pamr_pixels
            results.append(ImageResult(wl, self._threshold(wl), asm, it.original, pixels if self.pamr_steps else None))
        return results

    def results(self, images, names=None):
        """ImageResult per image, in order, each computed on its own (see the module doc). The
        first failing image raises (see results_or_errors to go on past it)."""
        for _, result in self.results_or_errors(images, names):
            if isinstance(result, Exception):
                raise result
            yield result

    def results_or_errors(self, images, names=None):
        """(index, ImageResult or the exception it raised) per image, in order: one bad image
        costs only itself. names: what error messages call each image (default: its path, or
        "image i")."""
        for i, image in enumerate(images):
            try:
                yield i, self._run_group([self.preprocess(image, _image_name(image, i, names))])[0]
            except Exception as e:  # noqa: BLE001 - reported per image, the others go on
                yield i, e

    # -- public API ------------------------------------------------------------------------------
    def logits(self, image) -> torch.Tensor:
        """[C, H, W] float32 logits (cosine similarities, no logit scale) at the input's size,
        on self.device."""
        return self.logits_batch([image])[0]

    def logits_batch(self, images) -> list:
        """Per image [C, H, W] float32 logits; with synonyms kept apart a class's logit is its
        best synonym's; PAMR, when on, is applied."""
        return [bg.class_logits(self._full_logits(r), self.owner, len(self.classes)) for r in self.results(images)]

    def _full_logits(self, result: ImageResult) -> torch.Tensor:
        """[S, H, W] logits of one result at the input size (PAMR applied when on)."""
        if self.scale is not None:
            return native.full_logits(self, result)
        logits = result.assembler(result.window_logits)
        if self.pamr_steps and result.pixels is not None:
            # the published codes refine with the normalised image resized back to the input size
            image = F.interpolate(result.pixels[None].float(), size=result.original, mode="bilinear",
                                  align_corners=False)[0]
            logits = pamr(image, logits, self.pamr_steps, self.pamr_dilations)
        return logits

    def label_map(self, result: ImageResult) -> np.ndarray:
        """[H, W] class indices (uint8 for up to 256 classes, else int64) of one result, built
        in row chunks so that [C, H, W] logits of a large image are never all in memory."""
        if self.scale is not None:
            return native.label_map(self, result).cpu().numpy().astype(label_dtype(len(self.classes)))
        H, W = result.original
        if self.pamr_steps and result.pixels is not None:  # PAMR needs the whole logits map
            out = bg.label(self._full_logits(result), result.threshold, self.logit_scale, self.owner)
        else:
            half = result.assembler.half_apply(result.window_logits)
            rows = max(1, _LABEL_CHUNK // max(1, half.shape[0] * W))
            out = torch.cat([bg.label(result.assembler.rows_apply(half, a, a + rows), result.threshold,
                                      self.logit_scale, self.owner) for a in range(0, H, rows)])
        return out.cpu().numpy().astype(label_dtype(len(self.classes)))

    def predict(self, image, name: str | None = None) -> np.ndarray:
        """[H, W] class indices at the input's size (uint8 up to 256 classes, else int64). name:
        what error messages call it (default its path, or "image 0")."""
        return self.label_map(next(iter(self.results([image], None if name is None else [name]))))

    def predict_batch(self, images, progress: bool = False) -> list:
        """Label maps of several images, each computed on its own (the same maps as predict
        gives one by one). progress: a tqdm bar over the images."""
        results = self.results(images)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(images) if hasattr(images, "__len__") else None, desc="segment",
                           unit="image")
        return [self.label_map(r) for r in results]


@lru_cache(maxsize=64)
def _assembler(layout, tokens, original, device) -> Assembler:
    return Assembler.build(layout, tokens, original, device)


def prepare_benchmark(segmenter: Segmenter, size: tuple = (448, 448), batch: int | None = None, seed: int = 0):
    """(fn, crops): fn() runs `encode_windows` on `batch` random normalised crops of `size`;
    for timing the network + CDAM on a device without any image decoding."""
    g = torch.Generator().manual_seed(seed)
    crops = torch.randn(batch or segmenter.window_batch, 3, *size, generator=g).to(segmenter.device)
    return (lambda: segmenter.encode_windows(crops)), crops


__all__ = ["Segmenter", "ImageResult", "MODES", "plan_image", "prepare_benchmark"]
