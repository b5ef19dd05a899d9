"""The JIT extension cache: atomic builds, damaged libraries rebuilt instead of crashing the
process, CDAM_FAST_NO_BUILD blocking only building. A tiny Python C-API module stands in for
the real extensions (about a second to compile instead of a minute)."""
import os
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
