"""Random inputs for a case, several sets of them so consecutive timed calls can rotate."""
from __future__ import annotations

import torch

from cdam_fast.opspec import OPS

from .cases import Case

# Rotate through enough sets that their total is about twice the GPU's L2 (a call never
# finds its inputs cached by the previous call), within these bounds.
MIN_SETS, MAX_SETS = 2, 8
MAX_ROTATION_BYTES = 2 << 30


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float64": torch.float64}[name]


def make_input_set(case: Case, device: torch.device, gen: torch.Generator) -> tuple:
    """The op's positional tensors: (p,) / (p, v) / (sim,) / (sim, v), in the case's dtype.

    Distributions are softmaxes of random logits (spread like CLIP similarities over tau);
    sim values look like raw cosine similarities (0.2 +- 0.05).
    """
    dt = dtype_of(case.dtype)

    def distributions(shape):
        return torch.softmax(3.0 * torch.randn(*shape, generator=gen), dim=-1)

    def similarities(shape):
        return 0.2 + 0.05 * torch.randn(*shape, generator=gen)

    def values(shape):
        return torch.randn(*shape, generator=gen)

    spec = OPS[case.op]
    args = spec.example_args(B=case.B, N=case.N, C=case.C, D=case.D, grid=case.grid, distributions=distributions,
                             values=values, similarities=similarities)
    return tuple(t.to(device=device, dtype=dt) for t in args.values())


def set_bytes(case: Case) -> int:
    elems = case.B * case.N * (case.C + case.D)
    return elems * dtype_of(case.dtype).itemsize


def rotation_count(case: Case, device: torch.device) -> int:
    if device.type != "cuda":
        return MIN_SETS
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    per_set = max(1, set_bytes(case))
    wanted = -(-2 * l2 // per_set)  # ceil
    by_memory = max(1, MAX_ROTATION_BYTES // per_set)
    return int(max(MIN_SETS, min(MAX_SETS, wanted, by_memory)))


def make_input_sets(case: Case, device: torch.device, seed: int = 0) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    return [make_input_set(case, device, gen) for _ in range(rotation_count(case, device))]
