"""The torch and Triton versions cdam_fast supports, stated once.

setup.py declares them (install_requires, read from this file without importing the package),
scripts/gpu_check.sh refuses a machine outside them by running this file, and
docs/compatibility.md states them with the runs that prove the ends (tests/test_versions.py
cross-checks all three). The floor is the GPU machine's image (torch 2.11, Triton 3.6); the
ceiling excludes the first minor releases nothing here has run on.

Run as a script (``python cdam_fast/versions.py``) it checks the installed versions from their
package metadata, without importing torch, Triton or cdam_fast, in well under a second: exit 0
and one line when they are supported, else exit 4 and one line per problem.
"""
from __future__ import annotations

import re
import sys

# distribution -> (lowest supported release, first unsupported release), release numbers
SUPPORTED = {"torch": ((2, 11), (2, 15)), "triton": ((3, 6), (3, 9))}
# Triton wheels exist for Linux only; elsewhere the Triton backend reports itself unavailable
MARKERS = {"triton": "platform_system == 'Linux'"}
EXIT_UNSUPPORTED = 4


def _dotted(release: tuple) -> str:
    return ".".join(map(str, release))


def requirement(name: str) -> str:
    """The install_requires entry of `name`, e.g. 'torch>=2.11,<2.15'."""
    lo, hi = SUPPORTED[name]
    marker = f"; {MARKERS[name]}" if name in MARKERS else ""
    return f"{name}>={_dotted(lo)},<{_dotted(hi)}{marker}"


def release(version: str) -> tuple:
    """The leading release numbers of a version string: '2.11.0+cu130' -> (2, 11, 0)."""
    m = re.match(r"\d+(\.\d+)*", version.strip())
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(x) for x in m.group(0).split("."))


def problems(installed: dict) -> list[str]:
    """One message per distribution of SUPPORTED that is missing (None) or outside its range,
    given {name: installed version or None}."""
    out = []
    for name, (lo, hi) in SUPPORTED.items():
        version = installed.get(name)
        wanted = f"cdam_fast supports {name} >= {_dotted(lo)} and < {_dotted(hi)}"
        if version is None:
            out.append(f"{name} is not installed; {wanted}")
        elif not (lo <= release(version) < hi):
            out.append(f"{name} {version} is installed; {wanted}")
    return out


def installed_versions() -> dict:
    """{name: version or None} from the package metadata (nothing is imported)."""
    from importlib import metadata

    found = {}
    for name in SUPPORTED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def main() -> int:
    found = installed_versions()
    issues = problems(found)
    for line in issues:
        print(f"unsupported versions: {line}", file=sys.stderr)
    if issues:
        return EXIT_UNSUPPORTED
    print("versions supported: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
