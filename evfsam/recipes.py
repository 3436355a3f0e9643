"""Upstream's inference recipes: how an image becomes the SAM view, which decoder output is kept and
how the low-resolution mask returns to the original size.  Plain data (no torch, no numpy), read by
the exporter (the SAM-2 decoder's mask selection is part of its graph), by the numpy processing the
server runs (evfsam/processing.py, whose docstring details each view) and by the docs.

Which recipe a checkpoint needs (upstream README: "-multitask checkpoints are only available with
commits >= 9d00853, other checkpoints with commits < 9d00853"): `CHECKPOINT_RECIPES`; the exporter
picks it from the checkpoint (family + the multitask tokenizer's `[semantic]` token), `--recipe`
overrides it, and manifest.json records it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Union


@dataclass(frozen=True)
class Recipe:
    """One upstream pre/post-processing code path.

    sam_view: "longest-side-pad" | "longest-side-stretch" | "uint8-stretch" | "pil-stretch".
    beit3_view: "bicubic" (the only one upstream has).
    mask_postprocess: "crop" (256 -> 1024, crop to the resized size, -> original) | "direct" (256 -> original).
    mask_selection: which decoder output upstream keeps: "single" (SAM-1, multimask_output=False),
      "single-stability" (SAM-2, multimask_output=False with dynamic_multimask_via_stability, delta 0.05,
      threshold 0.98: the single-mask token unless unstable, then the best of the 3 multimask outputs by IoU),
      "multimask-best" (SAM-2, multimask_output=True, the output with the highest predicted IoU).
    """

    name: str
    family: str  # "ori" (SAM-1 ViT image encoder) | "sam2" (SAM-2 Hiera image encoder)
    sam_view: str
    beit3_view: str
    mask_postprocess: str
    mask_selection: str
    upstream: str


RECIPES: Dict[str, Recipe] = {r.name: r for r in (
    Recipe("ori", "ori", "longest-side-pad", "bicubic", "crop", "single",
           "inference.py sam_preprocess(model_type='ori'); Sam.postprocess_masks (all commits, and eval.py)"),
    Recipe("sam2-v1", "sam2", "longest-side-stretch", "bicubic", "direct", "single-stability",
           "inference.py at 9d00853^ sam_preprocess(model_type='sam2'); EvfSam2Model.inference(multimask_output=False)"),
    Recipe("sam2-v2", "sam2", "uint8-stretch", "bicubic", "direct", "multimask-best",
           "inference.py from 9d00853 sam_preprocess(model_type='sam2'); EvfSam2Model.inference(multimask_output=True)"),
    Recipe("sam2-eval", "sam2", "pil-stretch", "bicubic", "direct", "multimask-best",
           "eval.py + utils/dataset.py Resize(1024), ValDataset.preprocess; EvfSam2Model.forward (multimask)"),
)}

# Which recipe reproduces upstream's published usage of each released checkpoint.
CHECKPOINT_RECIPES = {"YxZhang/evf-sam": "ori", "YxZhang/evf-sam-multitask": "ori", "YxZhang/evf-sam2": "sam2-v1",
                      "YxZhang/evf-sam2-multitask": "sam2-v2"}

RecipeLike = Union[str, Recipe]


def get_recipe(recipe: RecipeLike) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    try:
        return RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}") from None


def default_recipe(family: str, multitask: bool) -> str:
    """The recipe a checkpoint of `family` needs: SAM-1 ("ori") computes the same before and after
    9d00853; SAM-2 multitask checkpoints need the code from 9d00853, the others the code before it."""
    if family == "ori":
        return "ori"
    return "sam2-v2" if multitask else "sam2-v1"
