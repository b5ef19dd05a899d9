"""The recipes of docs/extending.md hold: a backend added as one class plus one line in the
priority list works for auto, an explicit request and the backward, and says what it lacks;
and the checklist of files that name ops is complete."""
import ast
import re
import warnings
from pathlib import Path

import pytest
import torch

import cdam_fast as cf
from cdam_fast import dispatch, reference
from cdam_fast.backends.base import Backend
from cdam_fast.opspec import OP_NAMES, OPS
from conftest import random_distributions

ROOT = Path(__file__).resolve().parents[1]


class ToyBackend(Backend):
    """The recipe's few lines: the reference's pairwise_jsd as a CPU float32 backend."""

    name = "toy"
    devices = ("cpu",)
    dtypes = (torch.float32,)
    ops = ("pairwise_jsd",)
    calls = []

    def pairwise_jsd(self, p, q):
        self.calls.append("pairwise_jsd")
        return reference.pairwise_jsd(p, q)


@pytest.fixture
def toy(monkeypatch):
    """The toy backend first in the priority list, for this test only (monkeypatch restores it)."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "PRIORITY", (("toy", ToyBackend, None),) + dispatch.PRIORITY)
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    ToyBackend.calls = []
    return ToyBackend.calls


def test_toy_backend_runs_auto_explicit_and_backward(toy, gen):
    p = random_distributions(gen, 2, 7, 4)
    q = random_distributions(gen, 2, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an op it lacks is passed over quietly
        out = cf.pairwise_jsd(p, q)
        assert toy == ["pairwise_jsd"]
        torch.testing.assert_close(out, reference.pairwise_jsd(p, q), rtol=0, atol=0)
        cf.pairwise_jsd(p, q, backend="toy")
        assert toy == ["pairwise_jsd"] * 2
        cf.cdam_map(p)  # auto: the toy has no cdam_map, the next backend runs it
        assert toy == ["pairwise_jsd"] * 2
        leaf_p, leaf_q = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
        g = torch.randn(2, 7, 5, generator=gen)
        cf.pairwise_jsd(leaf_p, leaf_q, backend="toy").backward(g)  # its backward: the formulas
    assert toy == ["pairwise_jsd"] * 3
    exp_p, exp_q = p.double().requires_grad_(True), q.double().requires_grad_(True)
    cf.pairwise_jsd(exp_p, exp_q, backend="reference").backward(g.double())
    torch.testing.assert_close(leaf_p.grad.double(), exp_p.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(leaf_q.grad.double(), exp_q.grad, rtol=1e-4, atol=1e-5)


def test_toy_backend_names_the_op_it_lacks(toy, gen):
    p = random_distributions(gen, 2, 7, 4)
    with pytest.raises(cf.BackendUnavailableError, match="'toy'.*not supported: this backend has no cdam_map"):
        cf.cdam_map(p, backend="toy")
    call = OPS["cdam_map"].bind((p, 10.0, "toy", True))[0]
    assert ToyBackend().backward_not_supported_reasons("cdam_map", call) == [
        "not supported: this backend has no cdam_map backward"]
    with pytest.raises(cf.BackendUnavailableError, match="float64 inputs are computed by the reference backend"):
        cf.pairwise_jsd(p.double(), backend="toy")


def test_a_declaration_that_cannot_hold_fails_at_import():
    with pytest.raises(TypeError, match="declares cdam_map without a kernel"):
        type("Broken", (Backend,), {"name": "broken", "ops": ("cdam_map",)})
    with pytest.raises(TypeError, match="backward of cdam_map without its forward"):
        type("Broken", (Backend,), {"name": "broken", "backward_ops": ("cdam_map",)})


# ---------------------------------------------------------------------------------------------
# The checklist of docs/extending.md names every file that names ops.

_REGISTRY_NAMES = {"OPS", "OP_NAMES", "ATTENTION_OPS", "MULTISCALE_OPS", "MODE_OPS", "TRAINING_OPS",
                   "COMPOSITE_BACKWARD_OPS", "HOMES"}


def _op_of(name: str):
    for suffix in ("_backward", "_train", ""):
        if name.endswith(suffix) and name[:len(name) - len(suffix)] in OP_NAMES:
            return name[:len(name) - len(suffix)]
    return None


def _scan(path: Path) -> tuple[set, bool]:
    """(the ops a file names by hand, whether it reads the registry)."""
    named, reads = set(), False
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            elts = n.keys if isinstance(n, ast.Dict) else n.elts
            found = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in OP_NAMES}
            if len(found) >= 2:
                named |= found
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _op_of(n.name):
            named.add(_op_of(n.name))
        elif isinstance(n, ast.ImportFrom):
            named |= {_op_of(a.name) for a in n.names if _op_of(a.name)}
            if (n.module or "").endswith("opspec") and any(a.name in _REGISTRY_NAMES for a in n.names):
                reads = True
        elif isinstance(n, ast.Attribute) and n.attr in _REGISTRY_NAMES and isinstance(n.value, ast.Name) \
                and n.value.id == "opspec":
            reads = True
    return named, reads


def _checklist() -> set:
    text = (ROOT / "docs" / "extending.md").read_text()
    section = text[text.index("## Checklist"):]
    return set(re.findall(r"`([\w/.<>-]+)`", section))


def test_checklist_names_every_file_that_names_ops():
    listed = _checklist()
    homes = ROOT / "cdam_fast" / "opdefs"
    missing = []
    for top in ("cdam_fast", "kernels", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            named, reads = _scan(path)
            rel = path.relative_to(ROOT).as_posix()
            if path.parent == homes:
                continue  # the homes are the checklist's first entry, cdam_fast/opdefs/
            if (len(named) >= 2 or reads) and rel not in listed:
                missing.append(f"{rel} ({'names ' + ', '.join(sorted(named)) if len(named) >= 2 else 'reads the registry'})")
    assert not missing, f"docs/extending.md's checklist does not name: {missing}"
    stale = [p for p in listed if "/" in p and "<" not in p and not (ROOT / p).exists()]
    assert not stale, f"docs/extending.md's checklist names files that do not exist: {stale}"


def test_the_scan_finds_what_it_must():
    """The detector itself: the public wrappers and a backend name several ops, the library reads
    the registry (a detector that found nothing would pass the checklist test vacuously)."""
    assert len(_scan(ROOT / "cdam_fast" / "ops.py")[0]) == len(OP_NAMES)
    assert len(_scan(ROOT / "cdam_fast" / "backends" / "cpu_backend.py")[0]) == len(OP_NAMES)
    assert _scan(ROOT / "cdam_fast" / "_library.py")[1]
