"""`cdam-fast` command line: one sub-command per job, each defined beside the code it drives."""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command modules; each exposes register(subparsers) that adds its parser and sets `func`.
_COMMANDS = (
    "cdam_fast.demo",
    "cdam_fast.pipeline.cli",
    "cdam_fast.evaluation.cli",
    "cdam_fast.benchmarks.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdam-fast", description="cdam-fast: fused CDAM kernels, CLIP segmentation, evaluation and benchmarks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module
                raise
            continue
        mod.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import torch

    from ._threads import configure_threads

    before = torch.get_num_threads()
    configure_threads()  # physical cores unless OMP_NUM_THREADS says otherwise
    try:
        return int(args.func(args) or 0)
    finally:
        torch.set_num_threads(before)  # in-process callers (tests) get their setting back


if __name__ == "__main__":
    sys.exit(main())
