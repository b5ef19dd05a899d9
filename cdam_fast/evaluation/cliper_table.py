"""CLIPer rows of the published table, printed beside CLIPer's published numbers.

CLIPer's public README reports, for ViT-B/16 under its own protocol (whole image, short side
336, its thresholds and background words; no sliding window): 60.7 / 34.7 / 36.3 mIoU on
VOC21 / Context60 / COCO-Object without the fine-grained compensation and 66.4 / 37.5 / 39.2
with it (Stable Diffusion 2.1-base). Its configs enable the sliding-window variant for these
three datasets (62.1 / 35.7 / 37.5 and 66.5 / 38.3 / 40.0 in their comments), so the rows here
turn it off (sliding_crop=0) to match the README's numbers. CLIPer + CDAM has no published
number: it is measured only. Each cell is an ordinary resumable `eval` run.
"""
from __future__ import annotations

from pathlib import Path

from ..pipeline.cliper_options import settings
from .datasets import TABLE_DATASETS, open_dataset
from .runner import evaluate

# mIoU (%) from CLIPer's public README (ViT-B/16, its protocol), by compensation
CLIPER_PUBLISHED = {None: (60.7, 34.7, 36.3), "sd": (66.4, 37.5, 39.2)}


def cliper_rows(sd_weights=None) -> list:
    """(label, cdam, compensation, published or None) of the rows to run."""
    rows = [("CLIPer", False, None, CLIPER_PUBLISHED[None])]
    if sd_weights:
        rows.append(("CLIPer + SD compensation", False, "sd", CLIPER_PUBLISHED["sd"]))
    rows.append(("CLIPer + CDAM", True, None, None))
    return rows


def run_cliper_rows(roots: dict, make_predictor, config_for, *, sd_weights=None, limit=None, output=".",
                    dist=None, progress=True) -> dict:
    """mIoU (%) per (row label, dataset). config_for(dataset, cdam, settings) -> stored config."""
    from .predictors import run_name

    results = {}
    for name in TABLE_DATASETS:
        if name not in roots:
            continue
        dataset = open_dataset(name, roots[name], limit=limit)
        for label, cdam, compensation, _ in cliper_rows(sd_weights):
            cliper = settings(f"cliper-{name}", compensation=compensation, sd_weights=sd_weights, sliding_crop=0)
            config = config_for(dataset, cdam, cliper)
            result = evaluate(dataset, make_predictor(dataset, config), output=Path(output) / run_name(name, config),
                              config=config, dist=dist, progress=progress)
            results[(label, name)] = 100 * result.scores.miou
    return results


def format_cliper_rows(results: dict, sd_weights=None) -> str:
    """Markdown rows (same columns as the CDAM table): ours / CLIPer's README per dataset."""
    lines = []
    for label, _, _, published in cliper_rows(sd_weights):
        cells = []
        for i, d in enumerate(TABLE_DATASETS):
            ours = results.get((label, d))
            cells += ["-" if ours is None else f"{ours:.1f}", "-" if published is None else f"{published[i]:.1f}"]
        lines.append(f"| {label} (CLIPer protocol) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
