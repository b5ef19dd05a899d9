"""The suite's backend fixture: absent hardware or optional packages skip with their reason; a
backend that is present but broken fails, so it can never hide behind skips."""
import importlib.util

import pytest
import torch

import conftest
from cdam_fast import dispatch
from cdam_fast.backends.cpu_backend import CpuBackend


def test_an_import_error_inside_the_kernels_fails(monkeypatch):
    """Triton installed, cdam_fast.kernels broken: an error, not a skip."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else None)
    monkeypatch.setitem(dispatch._loaded, "triton", ImportError("cannot import name 'jsd_tile' from 'cdam_fast.kernels.common'"))
    with pytest.raises(pytest.fail.Exception, match="present but broken.*jsd_tile"):
        conftest.usable_backend("triton")


def test_an_absent_optional_package_skips(monkeypatch):
    monkeypatch.setattr(conftest.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setitem(dispatch._loaded, "triton", ImportError("No module named 'triton'"))
    with pytest.raises(pytest.skip.Exception, match="triton is not installed"):
        conftest.usable_backend("triton")


def test_a_failed_cpu_build_fails(monkeypatch):
    """A toolchain is present (or a build is cached) but the extension does not build or load."""
    from cdam_fast.backends import extension_build as eb

    monkeypatch.setattr(eb, "toolchain_problem", lambda spec: None)
    monkeypatch.setattr(CpuBackend, "unavailable_reason",
                        lambda self, device, dtype: "building the CPU extension failed: cdam_cpu.cpp:1: error: boom")
    with pytest.raises(pytest.fail.Exception, match="present but broken.*boom"):
        conftest.usable_backend("cpu")


def test_a_missing_toolchain_skips(monkeypatch, tmp_path):
    from cdam_fast.backends import extension_build as eb

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing cached here
    monkeypatch.setattr(eb, "toolchain_problem", lambda spec: "no C++ compiler found")
    monkeypatch.setattr(CpuBackend, "unavailable_reason", lambda self, device, dtype: "no C++ compiler found")
    with pytest.raises(pytest.skip.Exception, match="no toolchain"):
        conftest.usable_backend("cpu")


def test_cuda_without_a_gpu_skips():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(pytest.skip.Exception, match="no CUDA GPU"):
        conftest.usable_backend("cuda")
