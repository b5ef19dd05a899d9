"""kernels/, csrc/ and benchmarks/ work from a plain checkout (the repository on sys.path,
nothing installed) as they do installed, and a cdam_fast/ copied without them says what to do.

Each case runs a fresh interpreter with -S (no site-packages processing, so no editable install
or .pth file is active) and PYTHONPATH = the checkout, then the folders holding torch and the
other dependencies.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from test_imports import package_folders

ROOT = Path(__file__).resolve().parents[1]


def _plain(code: str, first: Path, cwd: Path) -> subprocess.CompletedProcess:
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(first), *deps])
    return subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_plain_checkout_imports_kernels_csrc_and_benchmarks_from_its_folders(tmp_path):
    run = _plain("""
        import sys
        import cdam_fast
        import cdam_fast.benchmarks.cases, cdam_fast.csrc, cdam_fast.kernels.common
        from cdam_fast.benchmarks.cli import main
        for name in ("cdam_fast", "cdam_fast.kernels", "cdam_fast.kernels.common", "cdam_fast.csrc",
                     "cdam_fast.benchmarks", "cdam_fast.benchmarks.cases"):
            print("FILE", name, sys.modules[name].__file__)
        print("EDITABLE", [type(f).__name__ for f in sys.meta_path if "editable" in type(f).__module__.lower()])
        print("CPU", cdam_fast.available_backends()["cpu"])
        print("CASES", len(cdam_fast.benchmarks.cases.build_cases(["quick"])))
    """, ROOT, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    files = dict(line.split()[1:] for line in run.stdout.splitlines() if line.startswith("FILE"))
    assert files["cdam_fast.kernels"] == str(ROOT / "kernels" / "__init__.py")
    assert files["cdam_fast.kernels.common"] == str(ROOT / "kernels" / "common.py")
    assert files["cdam_fast.csrc"] == str(ROOT / "csrc" / "__init__.py")
    assert files["cdam_fast.benchmarks.cases"] == str(ROOT / "benchmarks" / "cases.py")
    assert "EDITABLE []" in run.stdout  # nothing installed was in play
    assert "CPU None" in run.stdout or "CPU no C++ compiler" in run.stdout, run.stdout
    assert int(run.stdout.split("CASES ")[1].split()[0]) > 0


def test_the_finder_maps_exactly_what_setup_installs():
    from cdam_fast import _checkout

    mapped = {name: path for name, path in package_folders().items() if name != "cdam_fast"}
    assert mapped == {f"cdam_fast.{name}": ROOT / name for name in _checkout.SUBPACKAGES}


def test_a_package_folder_without_the_top_level_folders_says_to_install(tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(ROOT / "cdam_fast", lone / "cdam_fast", ignore=shutil.ignore_patterns("__pycache__"))
    run = _plain("""
        try:
            import cdam_fast.kernels
        except ModuleNotFoundError as e:
            print("ERROR", e)
    """, lone, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ERROR cdam_fast." in run.stdout and "pip install -e" in run.stdout, run.stdout
