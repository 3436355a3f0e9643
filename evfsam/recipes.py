"""Upstream's inference recipes: how an image becomes the SAM view, which mask the decoder keeps and
how the low-resolution mask returns to the original size.  Plain data (no torch, no numpy), read by
the exporter (the decoder's mask selection is part of the graph), the serving models and the docs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str  # "ori" | "sam2"
    description: str
    # Which decoder output is kept: "single" (token 0), "single-stability" (token 0 unless its
    # stability score is below 0.98, then the best of tokens 1-3), "multimask-best" (the best of 1-3).
    mask_selection: str
    # "crop": upsample to 1024, crop the resized image, resize to the original (SAM-1);
    # "direct": resize the 256x256 logits straight to the original size (SAM-2).
    mask_postprocess: str


RECIPES: Dict[str, Recipe] = {r.name: r for r in (
    Recipe("ori", "ori", "EVF-SAM (SAM-1) inference.py and eval.py, all commits: longest side to 1024 (PIL "
           "bilinear), normalise, pad", "single", "crop"),
    Recipe("sam2-v1", "sam2", "EVF-SAM2 inference.py before 9d00853 (evf-sam2): longest side to 1024 (PIL "
           "bilinear), normalise, bilinear stretch to 1024x1024; single mask with the stability fallback",
           "single-stability", "direct"),
    Recipe("sam2-v2", "sam2", "EVF-SAM2 inference.py from 9d00853 (evf-sam2-multitask): bilinear stretch of the "
           "uint8 image to 1024x1024 (torch's uint8 kernel), normalise; best of the three multimask outputs",
           "multimask-best", "direct"),
    Recipe("sam2-eval", "sam2", "EVF-SAM2 eval.py (the RefCOCO table): utils/dataset.py Resize(1024), a PIL "
           "bilinear stretch of the uint8 image, normalise; best of the three multimask outputs",
           "multimask-best", "direct"),
)}


def recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}") from None
