"""The package's import graph points one way: no circles, and the low layers never import the
high ones.

Every module of the package (cdam_fast/ plus kernels/, csrc/ and benchmarks/, which install as
cdam_fast.kernels, .csrc and .benchmarks: setup.py's package_dir) is parsed, not imported. An
edge is any import statement of a cdam_fast module, at module level or inside a function (a
deferred import still runs, just later), with relative imports resolved. `import a.b.c` also
runs the __init__ of a and a.b; those implicit parent edges are left out (every module would
otherwise depend on cdam_fast/__init__.py, which imports the whole op layer). `from pkg import
name` is an edge to pkg.name when that is a module, else to pkg. Imports by string
(importlib.import_module) are not seen.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cdam_fast"
# Layers above the kernels and the backends: neither may reach them through any chain of imports.
UPPER_LAYERS = ("cdam_fast.autograd", "cdam_fast.pipeline", "cdam_fast.evaluation", "cdam_fast.benchmarks")
# The only modules outside kernels/ that kernels may import: constants shared with csrc/ and the
# centring shift the backward must reproduce bit for bit. They import nothing above themselves.
KERNEL_LEAVES = ("cdam_fast.constants", "cdam_fast.centring")
LEAF_MAY_IMPORT = (*KERNEL_LEAVES, "cdam_fast.csrc")  # csrc: a folder of sources, no code


def package_folders(root: Path = ROOT, top: str = PACKAGE) -> dict[str, Path]:
    """{package name: folder}: the package and the top-level folders setup.py maps into it."""
    setup = ast.parse((root / "setup.py").read_text())
    mapped = next(kw.value for node in ast.walk(setup) if isinstance(node, ast.Call)
                  for kw in node.keywords if kw.arg == "package_dir")
    folders = {top: root / top}
    folders.update({k: root / v for k, v in ast.literal_eval(mapped).items()})
    return folders


def find_modules(folders: dict[str, Path]) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under the folders."""
    modules = {}
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def import_edges(name: str, path: Path, modules: dict[str, Path], top: str = PACKAGE) -> dict[str, int]:
    """{imported module of the package: first line importing it} for module `name` at `path`;
    an import of the package that matches no module is reported under '?' + its name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        edges.setdefault(target if target in modules else "?" + target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == top:
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            if source.split(".")[0] != top:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source, node.lineno)
    return edges


def import_graph(folders: dict[str, Path], top: str = PACKAGE) -> dict[str, dict[str, int]]:
    modules = find_modules(folders)
    return {name: import_edges(name, path, modules, top) for name, path in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt in graph and nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def describe(chain: list[str], graph) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(chain, chain[1:])) + f" -> {chain[-1]}"


def reaching(graph, sources, forbidden) -> list[str]:
    """Import chains from any of `sources` to a module under one of the `forbidden` prefixes."""
    found = []
    for source in sources:
        parent = {source: None}
        queue = [source]
        while queue:
            node = queue.pop(0)
            for nxt in sorted(graph.get(node, ())):
                if nxt in parent or nxt not in graph:
                    continue
                parent[nxt] = node
                if any(in_layer(nxt, layer) for layer in forbidden):
                    chain = [nxt]
                    while parent[chain[-1]] is not None:
                        chain.append(parent[chain[-1]])
                    found.append(describe(chain[::-1], graph))
                else:
                    queue.append(nxt)
    return found


def in_layer(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


@pytest.fixture(scope="module")
def graph():
    return import_graph(package_folders())


# --- the walker itself, on a package written for the purpose -------------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_walker_resolves_imports_and_finds_circles(tmp_path):
    _write(tmp_path, {
        "setup.py": "setup(package_dir={'pkg.low': 'low'})\n",
        "pkg/__init__.py": "from .mid import thing\n",
        "pkg/mid/__init__.py": "",
        "pkg/mid/a.py": "from .. import top\nfrom . import b\nimport os\n",
        "pkg/mid/b.py": "def f():\n    from pkg.mid.c import x\n",  # deferred: still an edge
        "pkg/mid/c.py": "import pkg.mid.a\nfrom pkg.low.k import y\n",
        "pkg/top.py": "from pkg import NAME\nfrom pkg.nothing import z\n",
        "low/__init__.py": "",
        "low/k.py": "from .. import top\n",  # mapped folder: '..' is pkg
    })
    g = import_graph(package_folders(tmp_path, "pkg"), "pkg")
    assert set(g) == {"pkg", "pkg.mid", "pkg.mid.a", "pkg.mid.b", "pkg.mid.c", "pkg.top", "pkg.low", "pkg.low.k"}
    assert set(g["pkg"]) == {"pkg.mid"}  # `thing` is no module: the edge goes to the package
    assert set(g["pkg.mid.a"]) == {"pkg.top", "pkg.mid.b"}
    assert set(g["pkg.mid.b"]) == {"pkg.mid.c"}
    assert set(g["pkg.mid.c"]) == {"pkg.mid.a", "pkg.low.k"}  # no implicit edge to pkg or pkg.mid
    assert set(g["pkg.top"]) == {"pkg", "?pkg.nothing"}
    assert set(g["pkg.low.k"]) == {"pkg.top"}
    cycle = find_cycle(g)
    assert cycle == ["pkg.mid.a", "pkg.mid.b", "pkg.mid.c", "pkg.mid.a"]
    assert describe(cycle, g).startswith("pkg.mid.a (line 2) -> pkg.mid.b (line 2) -> pkg.mid.c (line 1)")
    assert reaching(g, ["pkg.mid"], ("pkg.low",)) == []
    assert reaching(g, ["pkg.low.k"], ("pkg.mid",)) == ["pkg.low.k (line 1) -> pkg.top (line 1) -> pkg (line 1) -> pkg.mid"]
    assert reaching(g, ["pkg.mid.c"], ("pkg.top",)) == ["pkg.mid.c (line 2) -> pkg.low.k (line 1) -> pkg.top"]
    del g["pkg.mid.b"]["pkg.mid.c"]
    assert find_cycle(g) is None


# --- the package -----------------------------------------------------------------------------------

def test_the_package_layout_is_what_setup_installs(graph):
    for name in ("cdam_fast", "cdam_fast.kernels", "cdam_fast.csrc", "cdam_fast.benchmarks",
                 "cdam_fast.kernels.common", "cdam_fast.backends.extension_build"):
        assert name in graph
    assert "cdam_fast.constants" in graph["cdam_fast.kernels.common"]  # `from .. import constants` in kernels/


def test_every_import_of_the_package_names_a_module(graph):
    unresolved = [f"{m} line {line}: {t[1:]}" for m, edges in graph.items() for t, line in edges.items()
                  if t.startswith("?")]
    assert not unresolved, "imports of modules that do not exist:\n" + "\n".join(unresolved)


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {describe(cycle, graph)}"


def test_torch_distributed_plumbing_is_beside_the_run_store(graph):
    assert "cdam_fast.distributed" in graph and "cdam_fast.evaluation.distributed" not in graph
    users = {m for m, edges in graph.items() if "cdam_fast.distributed" in edges}
    assert any(in_layer(m, "cdam_fast.pipeline") for m in users) and any(in_layer(m, "cdam_fast.evaluation")
                                                                          for m in users)


def test_backends_never_reach_the_upper_layers(graph):
    backends = [m for m in graph if in_layer(m, "cdam_fast.backends")]
    chains = reaching(graph, backends, UPPER_LAYERS)
    assert not chains, "backends import upper layers:\n" + "\n".join(chains)


def test_kernels_never_reach_the_upper_layers(graph):
    kernels = [m for m in graph if in_layer(m, "cdam_fast.kernels")]
    chains = reaching(graph, kernels, UPPER_LAYERS)
    assert not chains, "kernels import upper layers:\n" + "\n".join(chains)


def test_kernels_import_only_kernels_and_leaf_modules(graph):
    bad = [f"{m} line {line}: {t}" for m, edges in graph.items() if in_layer(m, "cdam_fast.kernels")
           for t, line in edges.items() if not in_layer(t, "cdam_fast.kernels") and t not in KERNEL_LEAVES]
    assert not bad, "kernels import modules above them:\n" + "\n".join(bad)


def test_the_kernels_leaf_modules_import_nothing_above_them(graph):
    bad = [f"{m} line {line}: {t}" for m in KERNEL_LEAVES for t, line in graph[m].items() if t not in LEAF_MAY_IMPORT]
    assert not bad, "\n".join(bad)


def test_scripts_import_the_package_not_the_tests():
    """scripts/ run against the package: they neither edit sys.path (to reach tests/) nor import
    the test-suite's modules."""
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
    bad = []
    for script in sorted((ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                bad.append(f"{script.name} line {node.lineno}: sys.path")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{script.name} line {node.lineno}: imports {n}" for n in names if n.split(".")[0] in test_modules]
    assert not bad, "\n".join(bad)
