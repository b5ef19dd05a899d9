"""Just-in-time build of the C++ (CPU) and CUDA extensions in csrc/, shared by both backends.

The extensions are compiled with torch.utils.cpp_extension.load and ninja on first use and
cached on disk under ``$TORCH_EXTENSIONS_DIR/cdam_fast`` (default ``~/.cache/torch_extensions``),
in a folder keyed by the sources, the flags and the torch/Python versions, so later runs only
import the cached library. A build is attempted at most once per process: success or failure
is remembered, so asking again is free. A failure becomes a one-line reason (with the first
compiler error line), and so does a cache folder that cannot be written. Reporting whether an
extension can run (``_Cached.report``, for ``available_backends``) never builds: it looks for a
complete cached build, a toolchain and a writable cache; running it (``failure``/``module``)
builds.

Builds are atomic: compiled in a private temporary folder, checksummed, then renamed into
place, so a crash or a concurrent build never leaves a half-written library under the final
name. A cached library is loaded only if its SHA-256 matches the one recorded at build time; a
damaged one (e.g. truncated: loading it would SIGBUS) is discarded and rebuilt.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import sysconfig
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cdam_fast.csrc

SOURCE_DIR = Path(cdam_fast.csrc.__file__).parent
# Set to 1 / true / yes to never compile: an extension already in the cache still loads; one
# that is not makes the backend report itself unavailable.
NO_BUILD_ENV = "CDAM_FAST_NO_BUILD"
_TRUE = ("1", "true", "yes")
CHECKSUM_SUFFIX = ".sha256"


def building_disabled() -> bool:
    return os.environ.get(NO_BUILD_ENV, "").strip().lower() in _TRUE
# The CUDA kernels use bf16 tensor cores (sm_80+); Hopper gets its own cubin.
CUDA_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


class ExtensionBuildError(RuntimeError):
    """The extension could not be built or imported; str(e) is a one-line reason."""


@dataclass(frozen=True)
class ExtensionSpec:
    """What to compile: a stable base name, the sources and the compiler flags."""

    base_name: str
    sources: tuple[Path, ...]
    cflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    label: str = "C++"
    headers: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def with_cuda(self) -> bool:
        return any(s.suffix == ".cu" for s in self.sources)

    def fingerprint(self) -> str:
        """Changes whenever anything that affects the compiled library changes."""
        h = hashlib.sha256()
        for path in sorted(self.sources + self.headers):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        h.update(repr((self.cflags, self.cuda_cflags, self.ldflags, torch.__version__, sys.version_info[:2])).encode())
        return h.hexdigest()[:12]

    @property
    def module_name(self) -> str:
        return f"{self.base_name}_{self.fingerprint()}"


def cpu_isa_flags(cpuinfo: str | None = None) -> list[str]:
    """AVX2/FMA code (and ATen's AVX2 Vectorized, with its vector log2) only if this CPU has them."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    if {"avx2", "fma"} <= flags:
        return ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _headers() -> tuple[Path, ...]:
    return tuple(sorted(SOURCE_DIR.glob("*.h")))


def cpu_spec() -> ExtensionSpec:
    # -fopenmp: at::parallel_for is a header template that only runs in parallel under OpenMP.
    return ExtensionSpec("cdam_fast_cpu", (SOURCE_DIR / "cdam_cpu.cpp",),
                         cflags=("-O3", "-fopenmp", *cpu_isa_flags()), ldflags=("-fopenmp",),
                         label="CPU", headers=_headers())


def cuda_spec() -> ExtensionSpec:
    # Kernels in the .cu (CUDA headers only, quick to compile); torch bindings in the .cpp.
    return ExtensionSpec("cdam_fast_cuda", (SOURCE_DIR / "cdam_cuda.cpp", SOURCE_DIR / "cdam_cuda_kernels.cu"),
                         cflags=("-O3",),
                         cuda_cflags=(*CUDA_ARCH_FLAGS, "-O3"), label="CUDA", headers=_headers())


def build_root() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    return Path(base) / "cdam_fast"


def _cache_error(root: Path, detail: str) -> str:
    return (f"the extension cache folder {root} cannot be written ({detail}); set TORCH_EXTENSIONS_DIR to a "
            "writable folder")


def cache_problem(root: Path) -> str | None:
    """Why no build can be written under `root`, else None; creates nothing. (As root, every
    existing folder is writable to os.access; build() still turns a failing mkdir into a reason.)"""
    existing = root
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return _cache_error(root, f"{existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        return _cache_error(root, f"{existing} is not writable")
    return None


def _first_error_line(text: str) -> str:
    """The first line a human needs from a failed build log: the first compiler diagnostic
    ("file:line:col: error: ..."), else the first line that mentions an error or a missing tool."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    noise = ("Error building extension", "FAILED:", "ninja: build stopped", "[")
    candidates = [ln for ln in lines if not ln.startswith(noise) and " -c " not in ln]
    for pattern in (r":\s*(fatal )?error\b", r"\berror\b", r"not found|No such file|undefined"):
        for ln in candidates:
            if re.search(pattern, ln, re.IGNORECASE):
                return ln[:300]
    return (candidates or lines or ["no compiler output"])[-1][:300]


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its import-time guess-of-CUDA_HOME warning,
    which means nothing to a CPU build (the CUDA build checks CUDA_HOME itself)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def toolchain_problem(spec: ExtensionSpec) -> str | None:
    """Why this machine cannot even try to build `spec` (missing compiler or ninja), else None."""
    cpp_extension = _cpp_extension()

    if building_disabled():
        return f"building the {spec.label} extension is disabled by {NO_BUILD_ENV} (and none is built)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found (looked for {cxx!r}; install g++ or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if spec.with_cuda:
        if cpp_extension.CUDA_HOME is None:
            return "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
        if shutil.which(str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")) is None:
            return f"nvcc not found under CUDA_HOME={cpp_extension.CUDA_HOME}"
    return None


def _library_path(folder: Path, name: str) -> Path | None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return next((folder / f"{name}{s}" for s in (".so", suffix) if (folder / f"{name}{s}").exists()), None)


def _library_exists(folder: Path, name: str) -> bool:
    return _library_path(folder, name) is not None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(folder: Path, name: str) -> str | None:
    """None if folder holds a complete build of `name` (library + matching checksum), else why not."""
    lib = _library_path(folder, name)
    if lib is None:
        return "no library"
    record = lib.with_name(lib.name + CHECKSUM_SUFFIX)
    if not record.exists():
        return f"{lib.name} has no checksum record (an interrupted or pre-atomic build)"
    if record.read_text().strip() != _sha256(lib):
        return f"{lib.name} does not match its checksum (damaged or truncated)"
    return None


def _import(name: str, lib: Path):
    spec = importlib.util.spec_from_file_location(name, str(lib))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _discard(folder: Path) -> None:
    """Move a damaged build out of the way (rename first: atomic for concurrent readers)."""
    trash = folder.with_name(f".{folder.name}.broken-{uuid.uuid4().hex[:8]}")
    try:
        folder.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def build(spec: ExtensionSpec, root: Path | None = None):
    """Load `spec` from the cache, or compile it (atomically) and import it; raises ExtensionBuildError."""
    cpp_extension = _cpp_extension()
    name = spec.module_name
    root = root or build_root()
    folder = root / name
    if folder.exists():
        problem = verify(folder, name)
        if problem is None:
            try:
                return _import(name, _library_path(folder, name))
            except ImportError as e:
                problem = f"it could not be imported ({e})"
        print(f"cdam_fast: discarding the cached {spec.label} extension in {folder}: {problem}", file=sys.stderr,
              flush=True)
        _discard(folder)
    why = toolchain_problem(spec)
    if why is not None:
        raise ExtensionBuildError(why)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:  # read-only, under a file, no permission: the backend is unavailable, not broken
        raise ExtensionBuildError(_cache_error(root, e.strerror or str(e))) from e
    print(f"building cdam_fast {spec.label} extension (first use, ~1 min)...", file=sys.stderr, flush=True)
    # torch versions a JIT module whose build folder changed within a process (name_v1, ...);
    # every build here has its own folder, and the final name must stay `name`
    cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(name, None)
    try:
        module = cpp_extension.load(
            name=name, sources=[str(s) for s in spec.sources], extra_cflags=list(spec.cflags),
            extra_cuda_cflags=list(spec.cuda_cflags) or None, extra_ldflags=list(spec.ldflags) or None,
            extra_include_paths=[str(SOURCE_DIR)], build_directory=str(tmp), with_cuda=spec.with_cuda,
            verbose=False)
    except Exception as e:  # compiler errors arrive as RuntimeError with the whole build log
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExtensionBuildError(
            f"building the {spec.label} extension failed: {_first_error_line(str(e))} (build folder {tmp})") from e
    lib = _library_path(tmp, name)
    try:
        lib.with_name(lib.name + CHECKSUM_SUFFIX).write_text(_sha256(lib))
        tmp.rename(folder)  # atomic; fails if another process put its build there first
    except OSError:  # this process still uses the module it built; the cache just keeps none
        shutil.rmtree(tmp, ignore_errors=True)
    return module


class _Cached:
    """Builds one extension at most once per process and remembers the module or the failure."""

    def __init__(self, make_spec):
        self._make_spec = make_spec
        self._lock = threading.Lock()
        self._result = None  # the module, or an ExtensionBuildError

    def report(self) -> str | None:
        """Why the extension cannot run here, without building it: the remembered outcome once
        built, else None for a complete cached build or for one that can be built (toolchain
        present, cache writable), else the reason. Cheap: no compiler runs, nothing is written,
        and it does not wait for a build another thread is running."""
        result = self._result
        if result is not None:
            return str(result) if isinstance(result, ExtensionBuildError) else None
        spec, root = self._make_spec(), build_root()
        if verify(root / spec.module_name, spec.module_name) is None:
            return None
        return toolchain_problem(spec) or cache_problem(root)

    def failure(self) -> str | None:
        """None once the extension is importable, else the one-line reason (building if needed)."""
        with self._lock:
            if self._result is None:
                try:
                    self._result = build(self._make_spec())
                except ExtensionBuildError as e:
                    self._result = e
        return str(self._result) if isinstance(self._result, ExtensionBuildError) else None

    def module(self):
        why = self.failure()
        if why is not None:
            raise ExtensionBuildError(why)
        return self._result


cpu_extension = _Cached(cpu_spec)
cuda_extension = _Cached(cuda_spec)
