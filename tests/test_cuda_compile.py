"""The CUDA sources compile (no GPU needed), and on a GPU the cuda backend agrees with triton.

Every csrc/*.cu is compiled with nvcc to an object file for sm_80 and for sm_90 with the flags
torch's extension builder uses, and the torch bindings (csrc/cdam_cuda.cpp) are checked by the
C++ compiler, so a CUDA build break fails the suite on machines without a GPU (CI). The tests
skip only when no CUDA toolkit is installed at all.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import cdam_fast as cf
from cdam_fast import dispatch
from cdam_fast.backends.extension_build import CUDA_ARCH_FLAGS, SOURCE_DIR

CU_SOURCES = sorted(SOURCE_DIR.glob("*.cu"))
ARCHS = ["80", "90"]
# What torch.utils.cpp_extension passes to nvcc for every extension.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def cuda_root() -> Path | None:
    """The CUDA toolkit folder (holding bin/nvcc and include/cuda_runtime.h), if any."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


CUDA_ROOT = cuda_root()
needs_nvcc = pytest.mark.skipif(CUDA_ROOT is None, reason="no CUDA toolkit (nvcc) installed")


def torch_include_flags() -> list[str]:
    from torch.utils import cpp_extension

    try:
        paths = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        paths = cpp_extension.include_paths(cuda=True)
    paths = [p for p in paths if Path(p).is_dir()] + [str(CUDA_ROOT / "include"), sysconfig.get_paths()["include"]]
    return [f"-I{p}" for p in dict.fromkeys(paths)]


def torch_cxx_standard() -> str:
    """The -std torch's extension builder uses (C++20 on recent torch, C++17 before)."""
    from torch.utils import cpp_extension

    return "-std=c++20" if "-std=c++20" in Path(cpp_extension.__file__).read_text() else "-std=c++17"


def run(cmd: list[str], timeout: int = 240) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:3])} ... failed:\n{proc.stderr[-4000:]}"


def test_the_cuda_sources_exist():
    assert CU_SOURCES, f"no .cu files in {SOURCE_DIR}"
    assert [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS] == CUDA_ARCH_FLAGS


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_with_nvcc(source, arch, tmp_path):
    obj = tmp_path / f"{source.stem}_sm{arch}.o"
    run([str(CUDA_ROOT / "bin" / "nvcc"), "-c", str(source), "-o", str(obj), torch_cxx_standard(), "-O3",
         f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC", "-Werror", "all-warnings",
         f"-I{SOURCE_DIR}", *TORCH_NVCC_FLAGS, *torch_include_flags()])
    assert obj.stat().st_size > 0
    cuobjdump = CUDA_ROOT / "bin" / "cuobjdump"
    if cuobjdump.exists():  # the object really holds sm_<arch> machine code
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(obj)], capture_output=True, text=True).stdout
        assert f"sm_{arch}" in listing, listing


@needs_nvcc
def test_cuda_bindings_compile(tmp_path):
    """csrc/cdam_cuda.cpp against the torch and CUDA headers (syntax and types; no link)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    includes = [f.replace("-I", "-isystem", 1) for f in torch_include_flags()]
    run([cxx, "-fsyntax-only", torch_cxx_standard(), "-Wall", "-Werror", "-DTORCH_EXTENSION_NAME=cdam_fast_cuda_check",
         "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{SOURCE_DIR}", *includes, str(SOURCE_DIR / "cdam_cuda.cpp")])


# ------------------------------------------------------------------ GPU tests (skipped without CUDA)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs a CUDA GPU")


def _usable(name: str) -> None:
    why = dispatch.unavailable_reason(name, torch.device("cuda"), torch.float32)
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable: {why}")


@gpu
@pytest.mark.parametrize("vdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_backend_matches_triton(vdtype):
    _usable("cuda")
    _usable("triton")
    gen = torch.Generator().manual_seed(7)
    dev = torch.device("cuda")
    p = torch.softmax(torch.randn(2, 150, 101, generator=gen) * 3, -1).to(dev)
    q = torch.softmax(torch.randn(2, 90, 101, generator=gen), -1).to(dev)
    v = torch.randn(2, 150, 200, generator=gen).to(dev, vdtype)
    vq = torch.randn(2, 90, 200, generator=gen).to(dev, vdtype)
    sim = (torch.randn(2, 101, 10, 15, generator=gen) * 0.3).to(dev)
    vs = torch.randn(2, 150, 72, generator=gen).to(dev, vdtype)
    rtol = {torch.float32: 3e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[vdtype]

    def both(fn):
        return fn("cuda").double(), fn("triton").double()

    def close(pair, atol):
        a, b = pair
        assert (a - b).abs().max().item() <= atol * max(1.0, b.abs().max().item())

    close(both(lambda bk: cf.pairwise_jsd(p, q, backend=bk)), 2e-5)
    close(both(lambda bk: cf.cdam_map(p, backend=bk)), 2e-4)
    close(both(lambda bk: cf.multiscale_cdam_map(sim, backend=bk)), 2e-4)
    for mode in ("materialize", "recompute"):
        close(both(lambda bk: cf.cdam_attention(p, v, mode=mode, backend=bk)), rtol)
        close(both(lambda bk: cf.multiscale_cdam_attention(sim, vs, mode=mode, backend=bk)), rtol)
    close(both(lambda bk: cf.jsd_attention(p, vq, 0.1, q=q, backend=bk)), rtol)
    close(both(lambda bk: cf.jsd_attention(p, v, 0.05, backend=bk)), rtol)


@gpu
def test_auto_on_gpu_prefers_triton_then_cuda(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    _usable("cuda")
    chosen = dispatch.resolve("auto", torch.device("cuda"), torch.float32)
    expected = "triton" if dispatch.unavailable_reason("triton", torch.device("cuda"), torch.float32) is None else "cuda"
    assert chosen.__name__.endswith(f"{expected}_backend")
