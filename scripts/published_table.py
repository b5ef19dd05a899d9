#!/usr/bin/env python
"""Rerun the published CDAM table (MaskCLIP, SCLIP, ClearCLIP, GEM, each with and without CDAM, on
VOC21 / Context60 / COCO-Object) and print it beside the paper's numbers.

    python scripts/published_table.py --voc21 VOC2012_ROOT --context60 VOC2010_ROOT --coco-object COCO_ROOT
    torchrun --nproc_per_node=8 scripts/published_table.py --voc21 ...   # one GPU per process

See `python scripts/published_table.py --help` and cdam_fast/evaluation/table.py.
"""
import sys

from cdam_fast.evaluation.table import main

if __name__ == "__main__":
    sys.exit(main())
