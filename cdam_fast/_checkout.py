"""kernels/, csrc/ and benchmarks/ sit beside cdam_fast/ in the repository and install as
cdam_fast.kernels, cdam_fast.csrc and cdam_fast.benchmarks (setup.py's package_dir). Installed,
pip maps them; run from a plain checkout (the repository on sys.path, nothing installed) this
finder maps them the same way, to the folders beside the cdam_fast/ that was imported, so a
checkout never mixes in the files of another installed copy.
"""
from __future__ import annotations

import importlib.util
import sys
from importlib.abc import MetaPathFinder
from pathlib import Path

SUBPACKAGES = ("kernels", "csrc", "benchmarks")  # each installs from the top-level folder of its name


class CheckoutFinder(MetaPathFinder):
    """Finds cdam_fast.<subpackage> in <root>/<subpackage>; fails clearly where it is missing."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "cdam_fast" or name not in SUBPACKAGES:
            return None  # their modules are found through the subpackage's __path__
        init = self.root / name / "__init__.py"
        if not init.is_file():
            raise ModuleNotFoundError(
                f"{fullname} is missing: this cdam_fast ({self.root / 'cdam_fast'}) is neither installed nor in a "
                f"full checkout (no {init}); install the package (pip install -e REPOSITORY) or run from a "
                "complete clone", name=fullname)
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def install() -> None:
    """Put the finder in place unless the subpackages are inside cdam_fast/ (a normal install)."""
    package_dir = Path(__file__).resolve().parent
    if (package_dir / SUBPACKAGES[0]).is_dir() or any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        return
    finder = CheckoutFinder(package_dir.parent)
    if all((finder.root / name / "__init__.py").is_file() for name in SUBPACKAGES):
        sys.meta_path.insert(0, finder)  # before any other copy's mapping (an editable install elsewhere)
    else:
        sys.meta_path.append(finder)  # only reached when nothing else finds them: the clear error
