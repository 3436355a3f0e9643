"""Every mask of one image drawn over it, each in its own colour, as upstream's `inference.py` draws one.

Upstream blends a masked pixel as `image * 0.5 + [50, 120, 220] * 0.5` (`clients.masks.overlay`);
here mask i uses `PALETTE[i % len(PALETTE)]` (the first colour is upstream's), and the masks are
blended one after the other in prompt order, so where two overlap both tints show.  Outside every
mask the image is unchanged.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from clients.masks import OVERLAY_ALPHA, OVERLAY_COLOR_RGB

Colour = Tuple[int, int, int]

PALETTE: Tuple[Colour, ...] = (
    tuple(int(c) for c in OVERLAY_COLOR_RGB),  # upstream's blue
    (230, 60, 50),  # red
    (60, 180, 75),  # green
    (255, 200, 20),  # yellow
    (150, 70, 200),  # purple
    (20, 200, 210),  # cyan
    (245, 130, 40),  # orange
    (240, 90, 200),  # pink
    (140, 100, 50),  # brown
    (170, 255, 140),  # light green
)


def mask_colours(count: int) -> List[Colour]:
    """The colour of each of `count` masks, in prompt order (the palette repeats after ten)."""
    return [PALETTE[index % len(PALETTE)] for index in range(count)]


def hex_colour(colour: Colour) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def draw_masks(rgb: np.ndarray, masks: Sequence[np.ndarray], colours: Sequence[Colour]) -> np.ndarray:
    """RGB uint8 [H, W, 3] with each 0/1 mask [H, W] blended in its colour: inside mask i a pixel p
    becomes `p * 0.5 + colour_i * 0.5`, computed in float and truncated to uint8 as upstream does."""
    if len(masks) != len(colours):
        raise ValueError(f"{len(masks)} masks but {len(colours)} colours")
    drawn = rgb.copy()
    for mask, colour in zip(masks, colours):
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask {mask.shape[1]}x{mask.shape[0]} does not match image {rgb.shape[1]}x{rgb.shape[0]}")
        selected = mask.astype(bool)
        blended = drawn[selected] * (1 - OVERLAY_ALPHA) + np.asarray(colour, dtype=np.float64) * OVERLAY_ALPHA
        drawn[selected] = blended.astype(np.uint8)
    return drawn
