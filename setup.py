import runpy
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
# the supported torch / Triton range, stated once (read without importing the package)
VERSIONS = runpy.run_path(str(ROOT / "cdam_fast" / "versions.py"))

PUBLISHED = ["opencv-python-headless"]  # the published protocol's uint8 INTER_LINEAR resize (the pipeline's default)
RAY = ["ray[data]>=2.10"]  # the Ray Data adapter (cdam_fast.pipeline.ray_data); never imported by the core
TEST = ["pytest>=8", "pytest-benchmark>=4", "ninja", "open_clip_torch>=3", "matplotlib", "tqdm", "pillow",
        "scikit-image", *PUBLISHED, *RAY]

setup(
    name="cdam-fast",
    version="0.1.0",
    description="Fused GPU/CPU kernels and a thin CLIP pipeline for CDAM (class distribution-induced attention maps)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/, csrc/ and benchmarks/ live at the top level (design card) but ship inside the package.
    packages=["cdam_fast", "cdam_fast.autograd", "cdam_fast.backends", "cdam_fast.pipeline", "cdam_fast.evaluation",
              "cdam_fast.kernels", "cdam_fast.csrc", "cdam_fast.benchmarks"],
    package_dir={"cdam_fast.kernels": "kernels", "cdam_fast.csrc": "csrc", "cdam_fast.benchmarks": "benchmarks"},
    package_data={"cdam_fast": ["data/*.txt", "data/classes/*.txt"], "cdam_fast.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"]},
    install_requires=[VERSIONS["requirement"]("torch"), "numpy", "pillow", "tqdm", VERSIONS["requirement"]("triton")],
    extras_require={
        "clip": ["open_clip_torch>=3", "pillow", "tqdm", *PUBLISHED],
        "published": ["open_clip_torch>=3", "pillow", "tqdm", *PUBLISHED],  # the same as clip (older name)
        "bench": ["pytest-benchmark>=4", "matplotlib", "tqdm", "nvidia-ml-py"],
        "keops": ["pykeops>=2.2"],
        "build": ["ninja"],
        "sd": ["diffusers>=0.30", "transformers", "safetensors"],  # CLIPer's SD compensation
        "ray": RAY,
        "test": TEST,
    },
    entry_points={"console_scripts": ["cdam-fast=cdam_fast.cli:main"]},
)
