"""The JIT extension cache: atomic builds, damaged libraries rebuilt instead of crashing the
process, CDAM_FAST_NO_BUILD blocking only building, a cache folder that cannot be written
(a reason, never an OSError), and available_backends() reporting without building. A tiny
Python C-API module stands in for the real extensions (about a second to compile instead of a
minute)."""
import errno
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from cdam_fast.backends import extension_build as eb

pytestmark = pytest.mark.skipif(eb.toolchain_problem(eb.ExtensionSpec("x", ())) is not None,
                                reason=f"no C++ toolchain: {eb.toolchain_problem(eb.ExtensionSpec('x', ()))}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(spec, root) of a small extension built once into a private cache root."""
    src_dir = tmp_path_factory.mktemp("src")
    src = src_dir / "tiny.cpp"
    src.write_text(textwrap.dedent("""
        #include <Python.h>
        #define CAT2(a, b) a##b
        #define CAT(a, b) CAT2(a, b)
        #define STR2(a) #a
        #define STR(a) STR2(a)
        static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
        static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
        static PyModuleDef def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
        PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
    """))
    spec = eb.ExtensionSpec("cdam_fast_tiny", (src,), cflags=("-O0",))
    root = tmp_path_factory.mktemp("cache")
    os.environ.pop(eb.NO_BUILD_ENV, None)
    assert eb.build(spec, root=root).answer() == 42
    return spec, root


def _load_in_fresh_process(spec, root, no_build: str | None):
    """Run build(spec, root) in a new interpreter (a crash there cannot take the tests down)."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from cdam_fast.backends import extension_build as eb
        spec = eb.ExtensionSpec({spec.base_name!r}, (Path({str(spec.sources[0])!r}),), cflags={spec.cflags!r})
        try:
            print("ANSWER", eb.build(spec, root=Path({str(root)!r})).answer())
        except eb.ExtensionBuildError as e:
            print("UNAVAILABLE", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != eb.NO_BUILD_ENV}
    if no_build is not None:
        env[eb.NO_BUILD_ENV] = no_build
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_build_is_atomic_and_checksummed(tiny):
    spec, root = tiny
    folder = root / spec.module_name
    assert eb.verify(folder, spec.module_name) is None
    assert not [p for p in root.iterdir() if ".tmp-" in p.name], "the temporary build folder was left behind"


def test_no_build_still_loads_a_built_extension(tiny, monkeypatch):
    spec, root = tiny
    monkeypatch.setenv(eb.NO_BUILD_ENV, "1")
    assert eb.build(spec, root=root).answer() == 42


@pytest.mark.parametrize("value,disabled", [("1", True), ("true", True), ("Yes", True), ("0", False),
                                            ("false", False), ("no", False), ("", False), ("maybe", False)])
def test_only_1_true_yes_disable_building(monkeypatch, value, disabled):
    monkeypatch.setenv(eb.NO_BUILD_ENV, value)
    assert eb.building_disabled() is disabled


def test_a_truncated_library_is_rebuilt_not_loaded(tiny):
    """ninja would call a truncated .so up to date; loading it would SIGBUS every later process."""
    spec, root = tiny
    folder = root / spec.module_name
    lib = eb._library_path(folder, spec.module_name)
    # a new inode: truncating the mapped file in place would SIGBUS this process, which loaded it
    cut = lib.with_name("cut.tmp")
    cut.write_bytes(lib.read_bytes()[:4096])
    os.replace(cut, lib)
    damaged = shutil.copytree(folder, root.parent / "damaged-copy")
    # building disabled: a clear reason, no crash
    run = _load_in_fresh_process(spec, root, "1")
    assert run.returncode == 0, f"the process died (rc {run.returncode}): {run.stderr[-2000:]}"
    assert "UNAVAILABLE" in run.stdout and eb.NO_BUILD_ENV in run.stdout, run.stdout
    assert "discarding" in run.stderr
    # building allowed (the damaged build put back): rebuilt and loaded (safe in this process:
    # the damaged file is never mapped, only the checksum is read)
    if not folder.exists():
        shutil.copytree(damaged, folder)
    assert eb.verify(folder, spec.module_name) is not None
    assert eb.build(spec, root=root).answer() == 42
    assert eb.verify(folder, spec.module_name) is None


def test_no_build_without_a_built_extension_names_the_variable(monkeypatch, tmp_path, tiny):
    spec, _ = tiny
    monkeypatch.setenv(eb.NO_BUILD_ENV, "1")
    with pytest.raises(eb.ExtensionBuildError, match=eb.NO_BUILD_ENV):
        eb.build(spec, root=tmp_path)


# ------------------------------------------------------------- a cache folder that cannot be written


def _deny_mkdir(monkeypatch, under):
    """Creating a folder under `under` fails, as on a read-only cache (this suite may run as
    root, which chmod does not stop)."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # os.makedirs and Path.mkdir call it too
        if str(path).startswith(str(under)):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


def test_a_cache_folder_under_a_file_is_a_reason_naming_it(tiny, tmp_path):
    spec, _ = tiny
    (tmp_path / "file").write_text("")
    root = tmp_path / "file" / "cache"
    with pytest.raises(eb.ExtensionBuildError, match=re.escape(str(root))):
        eb.build(spec, root=root)
    assert str(root) in eb.cache_problem(root) and "TORCH_EXTENSIONS_DIR" in eb.cache_problem(root)


def test_a_read_only_cache_loads_its_complete_build_and_refuses_new_ones(tiny, tmp_path, monkeypatch):
    spec, root = tiny
    read_only = tmp_path / "read-only"
    shutil.copytree(root / spec.module_name, read_only / spec.module_name)
    missing = eb.ExtensionSpec(spec.base_name, spec.sources, cflags=("-O1",))  # not in the copied cache
    _deny_mkdir(monkeypatch, read_only)
    assert eb.build(spec, root=read_only).answer() == 42
    with pytest.raises(eb.ExtensionBuildError, match=re.escape(str(read_only)) + ".*TORCH_EXTENSIONS_DIR"):
        eb.build(missing, root=read_only)


def test_cache_problem_reads_permissions_without_creating_anything(tmp_path, monkeypatch):
    root = tmp_path / "a" / "b"
    assert eb.cache_problem(root) is None
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    why = eb.cache_problem(root)
    assert why is not None and str(root) in why and "not writable" in why
    assert not (tmp_path / "a").exists()


def _run(code: str, cache, **env):
    """code in a fresh interpreter whose extension cache is `cache` (nothing inherited that
    blocks building or forces a backend)."""
    full = {k: v for k, v in os.environ.items() if k not in (eb.NO_BUILD_ENV, "CDAM_FAST_BACKEND")}
    full.update(TORCH_EXTENSIONS_DIR=str(cache), **env)
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_auto_falls_back_and_cpu_refuses_when_the_cache_folder_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "torch_extensions"
    run = _run("""
        import warnings
        import torch
        import cdam_fast as cf
        p = torch.softmax(3 * torch.randn(2, 5, 4, dtype=torch.float64), -1).float().requires_grad_()
        v = torch.randn(2, 5, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # auto: the forward and the backward, twice
                out = cf.cdam_attention(p, v)
                out.sum().backward()
        print("FALLBACKS", [str(w.message) for w in caught if "falling back" in str(w.message)])
        print("REFERENCE", torch.equal(out.detach(), cf.cdam_attention(p.detach(), v, backend="reference")))
        print("GRADIENT", bool(torch.isfinite(p.grad).all()))
        try:
            cf.pairwise_jsd(p.detach(), backend="cpu")
        except cf.BackendUnavailableError as e:
            print("REFUSED", e)
    """, cache)
    out = run.stdout
    fallbacks = eval(re.search(r"^FALLBACKS (.*)$", out, re.M).group(1))
    assert len(fallbacks) == 1 and "'cpu'" in fallbacks[0] and str(cache) in fallbacks[0], out
    assert "REFERENCE True" in out and "GRADIENT True" in out
    assert re.search(r"^REFUSED backend 'cpu' cannot run .*" + re.escape(str(cache)), out, re.M), out


def test_available_backends_reports_without_building(tmp_path):
    cache = tmp_path / "torch_extensions"
    cache.mkdir()
    run = _run("""
        import time
        import cdam_fast as cf
        start = time.perf_counter()
        reasons = cf.available_backends("cpu")
        print("REPORT", reasons["cpu"], round(time.perf_counter() - start, 1))
    """, cache)
    assert list(cache.iterdir()) == [], "available_backends() started a build"
    assert "building cdam_fast" not in run.stderr
    report, seconds = re.search(r"^REPORT (.*) (\S+)$", run.stdout, re.M).groups()
    assert report == "None", report  # a toolchain is here (else this module is skipped): buildable
    assert float(seconds) < 30, f"available_backends() took {seconds} s"


def test_report_names_what_blocks_a_build_and_builds_nothing(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.delenv(eb.NO_BUILD_ENV, raising=False)
    assert eb._Cached(eb.cpu_spec).report() is None  # a toolchain here and a cache it can create
    monkeypatch.setenv(eb.NO_BUILD_ENV, "1")
    assert eb.NO_BUILD_ENV in eb._Cached(eb.cpu_spec).report()
    monkeypatch.delenv(eb.NO_BUILD_ENV)
    compiler = os.environ.get("CXX", "c++")
    monkeypatch.setenv("CXX", "/nonexistent/bin/c++")
    assert "no C++ compiler" in eb._Cached(eb.cpu_spec).report()
    monkeypatch.setenv("CXX", compiler)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "file" / "cache"))
    assert str(tmp_path / "file" / "cache") in eb._Cached(eb.cpu_spec).report()
    assert not cache.exists()
