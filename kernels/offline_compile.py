"""Compile the kernels for a GPU target without a GPU and report what the hardware would run.

DIAGNOSTIC TOOL for tests and kernel work: the runtime never imports it.

    python -m cdam_fast.kernels.offline_compile [--arch 90]   # prints one JSON line per kernel

For each kernel at its production tile sizes: register spills (from ptxas -v), the count of
hardware lg2.approx and of libdevice-style slow logs, and the tensor-core instructions
(wgmma on sm_90, mma otherwise). Must run WITHOUT TRITON_INTERPRET (it needs real JIT
functions); the tests call it in a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from . import cdam, common, jsd, jsd_attention

# name -> (kernel, signature, constexprs, num_warps); signatures follow the kernels' argument order.
_P = "*fp32"


def _tiles(D: int, vdt: str, reads_j: bool, multi: bool = False, poly: bool = False) -> dict:
    return dict(zip(("BM", "BN", "BD"), common.value_tiles(D, vdt == "fp32", reads_j, multi, poly)))


def _cases():
    base_c = {"FAST_LOG": True, "POLY_LOGS": 0, "BM": 64, "BN": 64}
    scale_sig = {"pT": _P, "rp": _P, "wc": _P, "jfull": _P, "js_flat": _P, "js_off": "*i64", "js_n": "*i32",
                 "taps_idx": "*i32", "taps_w": _P}
    cases = {
        "pairwise_jsd": (jsd.pairwise_jsd_kernel,
                         {"pT": _P, "qT": _P, "rp": _P, "rq": _P, "w": _P, "out": _P, "N": "i32", "M": "i32",
                          "C": "i32"},
                         {"SELF": False, **base_c}, jsd.NUM_WARPS),
    }
    for src, multi, label in ((1, False, "recompute"), (2, False, "materialized"), (1, True, "multiscale,recompute"),
                              (2, True, "multiscale,materialized")):
        cases[f"row_stats[{label}]"] = (
            cdam.row_stats_kernel,
            {**scale_sig, "hi_out": _P, "lo_out": _P, "nhi_out": _P, "nlo_out": _P, "N": "i32", "C": "i32", "S": "i32"},
            {"FULL_SRC": src, "MULTI": multi, "COUNT_TIES": False, **base_c,
             **({"BN": cdam.ROW_STATS_BN_MULTI} if multi else {})}, cdam.NUM_WARPS)
        for vdt in ("fp16", "fp32"):  # bf16 compiles like fp16
            cases[f"cdam_product[{label},{vdt}]"] = (
                cdam.cdam_product_kernel,
                {**scale_sig, "hi_in": _P, "lo_in": _P, "weights": _P, "v": f"*{vdt}", "out": f"*{vdt}",
                 "N": "i32", "C": "i32", "D": "i32", "S": "i32", "alpha_log2e": "fp32", "exp_neg_alpha": "fp32",
                 "factor": "fp32"},
                {"FULL_SRC": src, "MULTI": multi, "WRITE_MAP": False, "V_IS_FP32": vdt == "fp32", "SMALL_ALPHA": False,
                 **base_c,
                 **_tiles(128, vdt, src == 2, multi)}, cdam.NUM_WARPS)
    for vdt in ("fp16", "fp32"):
        cases[f"jsd_attention[{vdt}]"] = (
            jsd_attention.jsd_attention_kernel,
            {"pT": _P, "qT": _P, "rp": _P, "rq": _P, "wc": _P, "v": f"*{vdt}", "out": f"*{vdt}", "lse": _P, "N": "i32",
             "M": "i32", "C": "i32", "D": "i32", "neg_log2e_over_tau": "fp32"},
            {"SELF": True, "V_IS_FP32": vdt == "fp32", "WRITE_LSE": False, **base_c, **_tiles(128, vdt, False)},
            jsd_attention.NUM_WARPS)
    # wide 16-bit values (D > 128) take BD = 256 in the kernels that recompute J
    for name, multi in (("cdam_product[recompute,fp16]", False), ("cdam_product[multiscale,recompute,fp16]", True),
                        ("jsd_attention[fp16]", False)):
        kernel, sig, consts, warps = cases[name]
        cases[name.replace("]", ",wide]")] = (kernel, sig, {**consts, **_tiles(768, "fp16", False, multi)}, warps)
    kernel, sig, consts, warps = cases["pairwise_jsd"]
    cases["pairwise_jsd[self]"] = (kernel, sig, {**consts, "SELF": True}, warps)
    # the FMA-polynomial share of the logs (CDAM_FAST_POLY_LOGS) unrolls the class loop by 4
    cases["pairwise_jsd[poly1]"] = (kernel, sig, {**consts, "POLY_LOGS": 1}, warps)
    for name in ("cdam_product[recompute,fp16]", "cdam_product[recompute,fp32]", "jsd_attention[fp16]",
                 "jsd_attention[fp32]"):
        kernel, sig, consts, warps = cases[name]
        vdt = "fp32" if consts["V_IS_FP32"] else "fp16"
        cases[name.replace("]", ",poly1]")] = (kernel, sig, {**consts, "POLY_LOGS": 1,
                                                             **_tiles(128, vdt, False, poly=True)}, warps)
    # the training forward also writes the row log-sum-exp (jsd_attention) or the row statistics'
    # tie counts (single-scale cdam_attention) for the backward
    for name in ("row_stats[recompute]", "row_stats[materialized]"):
        kernel, sig, consts, warps = cases[name]
        cases[name.replace("]", ",ties]")] = (kernel, sig, {**consts, "COUNT_TIES": True}, warps)
    for name in ("jsd_attention[fp16]", "jsd_attention[fp32]", "jsd_attention[fp16,wide]", "jsd_attention[fp16,poly1]",
                 "jsd_attention[fp32,poly1]"):
        kernel, sig, consts, warps = cases[name]
        cases[name.replace("]", ",lse]")] = (kernel, sig, {**consts, "WRITE_LSE": True}, warps)
    # alpha < SMALL_ALPHA_LIMIT adds a Taylor g(alpha X) = (1 - exp(-alpha X)) / (alpha X) to the transform
    for name in ("cdam_product[recompute,fp32]", "cdam_product[multiscale,recompute,fp32]",
                 "cdam_product[materialized,fp32]"):
        kernel, sig, consts, warps = cases[name]
        cases[name.replace("]", ",small_alpha]")] = (kernel, sig, {**consts, "SMALL_ALPHA": True}, warps)
    return cases


def _ptxas() -> str:
    candidates = [os.environ.get("TRITON_PTXAS_PATH"),
                  str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"),
                  shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"]
    for c in candidates:
        if c and Path(c).is_file():
            return c
    raise FileNotFoundError("no ptxas found (set TRITON_PTXAS_PATH)")


def _spills(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        res = subprocess.run([_ptxas(), f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(d) / "k.o")],
                             capture_output=True, text=True, check=True)
    info = res.stderr
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", info))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", info))
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", info)), default=-1)
    return {"spill_store_bytes": stores, "spill_load_bytes": loads, "registers": regs}


def inspect_kernel(kernel, signature: dict, constexprs: dict, num_warps: int, arch: int = 90) -> dict:
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    return {
        "lg2_approx": len(re.findall(r"\blg2\.approx", ptx)),
        # libdevice's accurate log shows up as an inlined polynomial without lg2.approx; a
        # call or the __nv_ prefix would betray an unlowered library log.
        "libdevice_calls": len(re.findall(r"__nv_log", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "mma": len(re.findall(r"\bmma\.sync", ptx)),
        **_spills(ptx, arch),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    for name, (kernel, sig, consts, warps) in _cases().items():
        print(json.dumps({"kernel": name, **inspect_kernel(kernel, sig, consts, warps, args.arch)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
