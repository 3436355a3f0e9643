"""What a client does with a mask: upstream's overlay, COCO run-length encoding, a viewable PNG."""
from __future__ import annotations

from typing import Dict, List, Union

import numpy as np
from pycocotools import mask as coco_mask

# upstream inference.py: save_img[pred_mask] = (image * 0.5 + mask * [50, 120, 220] * 0.5)[pred_mask]
OVERLAY_COLOR_RGB = np.array([50, 120, 220])
OVERLAY_ALPHA = 0.5


def overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mask blended over the RGB image exactly as upstream's `inference.py` draws it.

    Inside the mask each pixel becomes `image * 0.5 + [50, 120, 220] * 0.5`, computed in float and
    truncated back to uint8 as numpy's assignment does; outside it the image is unchanged.
    """
    _check_same_size(rgb, mask)
    selected = mask.astype(bool)
    blended = rgb * (1 - OVERLAY_ALPHA) + selected[:, :, None].astype(np.uint8) * OVERLAY_COLOR_RGB * OVERLAY_ALPHA
    drawn = rgb.copy()
    drawn[selected] = blended[selected]
    return drawn


def viewable(mask: np.ndarray) -> np.ndarray:
    """0/1 mask -> 0/255 grey image."""
    return (mask.astype(bool) * np.uint8(255)).astype(np.uint8)


def rle_encode(mask: np.ndarray) -> Dict[str, Union[List[int], str]]:
    """COCO compressed RLE of a 0/1 mask, JSON-ready: {"size": [H, W], "counts": "..."}."""
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def rle_decode(rle: Dict[str, Union[List[int], str]]) -> np.ndarray:
    counts = rle["counts"]
    compressed = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(compressed)


def _check_same_size(rgb: np.ndarray, mask: np.ndarray) -> None:
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape[1]}x{mask.shape[0]} does not match image {rgb.shape[1]}x{rgb.shape[0]}")
