"""The documentation holds together: the README stays short, every relative link in the README,
docs/ and benchmarks/RESULTS.md resolves (file and, where given, heading anchor), and the README's
test command is the one CI runs."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250

# Documents that other work in progress adds; links to them are allowed to dangle until it is merged.
# Empty this set once they exist (test_pending_documents_do_not_exist_yet fails as soon as one does).
PENDING: set = set()

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def documents():
    return [README, ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(path):
    """The lines outside fenced code blocks (links in code are not links)."""
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield line


def slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"`|\*\*|__", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for line in prose_lines(path):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return out


def relative_links(path):
    for line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            yield target


def broken_links(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if rel in PENDING:
            continue
        if not dest.exists():
            broken.append(f"{target} (no file {rel})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading '#{anchor}' in {rel})")
    return broken


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it <= {MAX_README_LINES} and move detail to docs/"


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_pending_documents_do_not_exist_yet():
    exist = sorted(name for name in PENDING if (ROOT / name).exists())
    assert not exist, f"{exist} exist now: remove them from PENDING in tests/test_docs.py so their links are checked"


def test_pending_documents_are_linked():
    linked = set()
    for path in documents():
        for target in relative_links(path):
            file_part = target.partition("#")[0]
            if file_part:
                dest = (path.parent / file_part).resolve()
                if dest.is_relative_to(ROOT):
                    linked.add(dest.relative_to(ROOT).as_posix())
    assert PENDING <= linked, f"PENDING names documents nothing links to: {sorted(PENDING - linked)}"


def test_readme_test_command_is_what_ci_runs():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [ln for ln in ci_lines if ln and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    assert len(ci) == 1, f".ci/run should run exactly one command (the README's), found {ci}"
    readme = [m.group(1) for m in re.finditer(r"^Testing: `([^`]+)`\s*$", README.read_text(), re.M)]
    assert readme == [ci[0]], f"README's 'Testing: `...`' line {readme} differs from .ci/run's {ci[0]!r}"


def test_the_link_checker_catches_what_it_should(tmp_path, monkeypatch):
    """The checks above can fail: a missing file, a missing anchor, and links inside code are skipped."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Title\n\n## The `ops`: contract\n")
    doc = tmp_path / "docs" / "a.md"
    doc.write_text("[ok](b.md) [ok](b.md#the-ops-contract) [web](https://x.org/y)\n"
                   "[gone](missing.md) [bad anchor](b.md#nope)\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(doc) == ["missing.md (no file docs/missing.md)", "b.md#nope (no heading '#nope' in docs/b.md)"]
