"""The fused backward kernels (kernels/jsd_backward.py, kernels/cdam_backward.py) compiled offline for Hopper (sm_90),
as tests/test_kernels_compile.py does for the forward: no spills, hardware lg2.approx for the
divergence logs, tensor cores for the products of the attention gradient."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json
from cdam_fast.kernels.offline_compile import inspect_kernel
from cdam_fast.kernels import cdam_backward, jsd_backward
cases = {**jsd_backward.offline_cases(), **cdam_backward.offline_cases()}
for name, (k, sig, consts, warps) in cases.items():
    print(json.dumps({"kernel": name, **inspect_kernel(k, sig, consts, warps, 90)}), flush=True)
"""


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # needs real JIT functions
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {r["kernel"]: r for r in rows}


def test_every_backward_kernel_compiles_without_spills(report):
    assert len(report) == 17, sorted(report)  # 14 + the three value-gradient-only key passes
    spilling = {k: (r["spill_store_bytes"], r["spill_load_bytes"]) for k, r in report.items()
                if r["spill_store_bytes"] or r["spill_load_bytes"]}
    assert not spilling, f"backward kernels spill registers on sm_90 (store, load bytes): {spilling}"
    assert all(0 < r["registers"] <= 255 for r in report.values())


def test_backward_uses_hardware_lg2_and_tensor_cores(report):
    for name, r in report.items():
        assert r["libdevice_calls"] == 0 and r["lg2_approx"] > 0, name
        if name.startswith(("jsd_attention_grad", "cdam_grad")):
            assert r["wgmma"] + r["mma"] > 0, f"{name} multiplies without tensor-core instructions"
