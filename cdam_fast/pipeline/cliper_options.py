"""Command-line options of `--method cliper`, shared by `cdam-fast segment`,
`cdam-fast eval` and the published-table script; no model stack is imported here."""
from __future__ import annotations

from ..validation import CdamInputError

CLIPER = "cliper"
CDAM_COMBINES = ("replace", "average")
# datasets with a CLIPer protocol preset (one per dataset config of CLIPer's public code)
CLIPER_DATASETS = ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff171", "ade20k", "cityscapes")
# the steps around CLIPer's network under a CLIPer protocol: its public code's, or the package's
PIPELINES = ("official", "package")
# the last block's attention: CLIPer's fused map, or one of its code's ablations (attn_type;
# its "proxy", DINO's similarities, is not implemented)
ATTENTIONS = ("fused", "vanilla", "q-q", "k-k", "v-v", "identity")
# Keys a CLIPer run adds to its stored configuration (and passes to the Segmenter).
CONFIG_KEYS = ("protocol", "pipeline", "sliding_crop", "cdam_combine", "compensation", "sd_weights", "sd_seed",
               "normalisation")
NORMALISATIONS = ("once", "official")  # the fused map's normalisation: as described / as CLIPer's code does it


def add_arguments(parser, dataset_known: bool = False) -> None:
    g = parser.add_argument_group("CLIPer (--method cliper)")
    g.add_argument("--cdam-combine", default="replace", choices=CDAM_COMBINES,
                   help="with --cdam: the CDAM map replaces the fused map in the last-block pass, or is "
                        "averaged with it (default replace)")
    presets = ", ".join(f"cliper-{d}" for d in CLIPER_DATASETS)
    g.add_argument("--protocol", default="mmseg",
                   help="mmseg (default: the protocol of the rest of the table) or CLIPer's own protocol: "
                        + ("'cliper' (the dataset's preset) or " if dataset_known else "") + presets)
    g.add_argument("--cliper-pipeline", dest="pipeline", default=None, choices=PIPELINES,
                   help="under a CLIPer protocol: official (default: every step around the network as CLIPer's "
                        "public code does it) or package (this package's resize, positional table and upsampling)")
    g.add_argument("--sliding-crop", type=int, default=None, metavar="PIXELS",
                   help="official pipeline: CLIPer's sliding-window crop (default: the preset's; 0: whole image only)")
    g.add_argument("--compensation", default="none", choices=("none", "sd"),
                   help="sd: CLIPer's fine-grained compensation with Stable Diffusion 2.1-base (needs --sd-weights "
                        "and the 'sd' extra)")
    g.add_argument("--sd-weights", metavar="PATH", default=None,
                   help="local diffusers folder of Stable Diffusion 2.1-base (never downloaded)")
    g.add_argument("--sd-seed", type=int, default=0, help="seed of the diffusion noise (default 0)")
    g.add_argument("--fusion-normalisation", dest="normalisation", default=None, choices=NORMALISATIONS,
                   help="once: the fused map normalised as the method describes it; official: repeated per input, "
                        "as CLIPer's public code does in place (default: official with the official pipeline, "
                        "else once)")


def cliper_settings(args, dataset: str | None = None) -> dict:
    """The Segmenter keyword options of a CLIPer run ({} for the other methods, which reject
    CLIPer-only options)."""
    given = [f"--{k.replace('_', '-')}" for k, default in
             (("protocol", "mmseg"), ("cdam_combine", "replace"), ("compensation", "none"), ("sd_weights", None),
              ("normalisation", None), ("pipeline", None), ("sliding_crop", None))
             if getattr(args, k, default) != default]
    if args.method != CLIPER:
        if given:
            raise CdamInputError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --method cliper only")
        return {}
    protocol = args.protocol
    if protocol == CLIPER:
        if dataset is None:
            raise CdamInputError(f"--protocol cliper needs a dataset; name the preset: "
                                 f"{', '.join('cliper-' + d for d in CLIPER_DATASETS)}")
        if dataset not in CLIPER_DATASETS:
            raise CdamInputError(f"--protocol cliper: CLIPer's protocol has presets for "
                                 f"{', '.join(CLIPER_DATASETS)}, not {dataset!r}")
        protocol = f"cliper-{dataset}"
    compensation = None if args.compensation == "none" else args.compensation
    if compensation is None and args.sd_weights is not None:
        raise CdamInputError("--sd-weights is given without --compensation sd")
    return settings(protocol, args.cdam_combine, compensation, args.sd_weights, args.sd_seed, args.normalisation,
                    getattr(args, "pipeline", None), getattr(args, "sliding_crop", None))


def settings(protocol: str, cdam_combine: str = "replace", compensation=None, sd_weights=None, sd_seed: int = 0,
             normalisation: str | None = None, pipeline: str | None = None, sliding_crop: int | None = None) -> dict:
    """The Segmenter keyword options of a CLIPer run (CONFIG_KEYS; defaults as the CLI's; None:
    the protocol's choice)."""
    return {"protocol": protocol, "pipeline": pipeline, "sliding_crop": sliding_crop, "cdam_combine": cdam_combine,
            "compensation": compensation, "sd_weights": sd_weights if compensation else None, "sd_seed": sd_seed,
            "normalisation": normalisation}
