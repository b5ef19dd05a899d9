"""The supported torch / Triton range (cdam_fast/versions.py) is the one that setup.py declares,
docs/compatibility.md states, and scripts/gpu_check.sh enforces: a machine outside it is refused
in seconds, before anything is installed or built."""
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdam_fast import versions

ROOT = Path(__file__).resolve().parent.parent


def test_release_numbers():
    assert versions.release("2.11.0+cu130") == (2, 11, 0)
    assert versions.release("3.6.0") == (3, 6, 0)
    assert versions.release("2.15.0a0+git1234") == (2, 15, 0)
    with pytest.raises(ValueError):
        versions.release("nightly")


@pytest.mark.parametrize("torch_v,triton_v,bad", [
    ("2.11.0+cu130", "3.6.0", []), ("2.14.1", "3.8.0", []), ("2.11.0.dev20260101", "3.8.9", []),
    ("2.10.1", "3.6.0", ["torch"]), ("2.15.0", "3.6.0", ["torch"]), ("2.15.0a0", "3.6.0", ["torch"]),
    ("2.12.0", "3.5.1", ["triton"]), ("2.12.0", "3.9.0", ["triton"]), (None, None, ["torch", "triton"]),
])
def test_problems_name_each_distribution_outside_the_range(torch_v, triton_v, bad):
    found = versions.problems({"torch": torch_v, "triton": triton_v})
    assert [line.split()[0] for line in found] == bad
    assert all("cdam_fast supports" in line for line in found)


def test_setup_py_declares_the_range(monkeypatch):
    """setup.py's install_requires come from versions.requirement (setup() itself is not run)."""
    seen = {}
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    runpy.run_path(str(ROOT / "setup.py"))
    assert versions.requirement("torch") == "torch>=2.11,<2.15"
    assert versions.requirement("torch") in seen["install_requires"]
    assert versions.requirement("triton") in seen["install_requires"]
    assert not [r for r in seen["install_requires"] if r.startswith(("torch", "triton")) and
                r not in (versions.requirement("torch"), versions.requirement("triton"))]


def test_docs_state_the_range():
    text = (ROOT / "docs" / "compatibility.md").read_text()
    for name in versions.SUPPORTED:
        assert versions.requirement(name).split(";")[0] in text, name


def _fake_distribution(root: Path, name: str, version: str) -> None:
    """A dist-info that importlib.metadata finds before the installed one (PYTHONPATH first)."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.mark.parametrize("name,version", [("torch", "2.10.0"), ("triton", "3.9.1")])
def test_gpu_check_refuses_unsupported_versions_in_seconds(tmp_path, name, version):
    site = tmp_path / "site"
    _fake_distribution(site, name, version)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(site))
    env.pop("CDAM_GPU_CHECK_ANY_VERSION", None)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == versions.EXIT_UNSUPPORTED, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{name} {version} is installed" in proc.stderr and "refusing to run" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing ran
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_the_installed_versions_are_supported():
    """This environment (CI's, a developer's) is inside the range it declares."""
    proc = subprocess.run([sys.executable, str(ROOT / "cdam_fast" / "versions.py")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
