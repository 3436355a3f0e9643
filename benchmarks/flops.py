"""FLOPs of an image encoder per 1024x1024 image, counted by `torch.utils.flop_counter` on the meta
device: no weights, no memory, the same operators as the eager model (a multiply-add counts 2).

    python -m benchmarks.flops            # both families, vit-b and full sizes
"""
from __future__ import annotations

import argparse
import json
from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from evfsam.specs import FAMILIES, SAM_IMAGE_SIZE

# SAM-2 Hiera-B+ / Hiera-L, SAM ViT-B / ViT-H: the presets of export.tiny_checkpoint
SIZE_NAMES = {("ori", "tiny"): "SAM ViT (tiny preset)", ("ori", "vit-b"): "SAM ViT-B", ("ori", "full"): "SAM ViT-H",
              ("sam2", "tiny"): "SAM-2 Hiera (tiny preset)", ("sam2", "vit-b"): "SAM-2 Hiera-B+",
              ("sam2", "full"): "SAM-2 Hiera-L"}


def image_encoder_flops(family: str, size: str) -> Dict[str, object]:
    """{"encoder", "tflop", "parameters", "by_part": {part: tflop}} of the family's image encoder at `size`."""
    from evfsam.modeling.builder import build_evf_model, config_from_dict
    from export.tiny_checkpoint import FAMILY_SIZES

    config = config_from_dict({"model_type": "evf", "out_dim": 256, **FAMILY_SIZES[family][size]}, family)
    with torch.device("meta"):
        model = build_evf_model(config).eval()
    images = torch.empty(1, 3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(images)
    encoder = model.visual_model.image_encoder
    counts = counter.get_flop_counts()
    root = type(encoder).__name__
    parts: Dict[str, float] = {}
    for name, ops in counts.items():  # direct children, and the items of a ModuleList (blocks.0, blocks.1, ...)
        path = name.split(".")
        listed_only = len(path) == 3 and path[2].isdigit() and f"{root}.{path[1]}" not in counts
        if path[0] == root and (len(path) == 2 or listed_only):
            parts[path[1]] = parts.get(path[1], 0.0) + sum(ops.values()) / 1e12
    return {"encoder": SIZE_NAMES.get((family, size), f"{family} {size}"), "tflop": counter.get_total_flops() / 1e12,
            "parameters": sum(p.numel() for p in encoder.parameters()), "by_part": parts,
            "by_operator": {str(op): n / 1e12 for op, n in counts.get("Global", {}).items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=sorted(FAMILIES))
    parser.add_argument("--sizes", nargs="+", default=["vit-b", "full"])
    args = parser.parse_args(argv)
    print(json.dumps({f"{f}/{s}": image_encoder_flops(f, s) for f in args.families for s in args.sizes}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
