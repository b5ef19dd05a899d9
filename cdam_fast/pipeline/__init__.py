"""The CLIP pipeline: open-vocabulary segmentation with CDAM at any resolution.

Needs the `clip` extra (open_clip_torch, pillow, tqdm). Main entry point: `Segmenter`.
"""
from .model import ClipBackbone, WeightsUnavailableError, load_clip
from .segmenter import ImageResult, Segmenter, prepare_benchmark
from .text import ClassList, atp_prompts, packaged_class_lists, parse_classes, read_class_file

__all__ = ["ClassList", "ClipBackbone", "ImageResult", "Segmenter", "WeightsUnavailableError", "atp_prompts",
           "load_clip", "packaged_class_lists", "parse_classes", "prepare_benchmark", "read_class_file"]
