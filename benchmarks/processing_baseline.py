"""The pre/post-processing as it was before the rewrite (evfsam/processing.py at commit 8e24437), kept
only so benchmarks/processing.py can measure before against after on the same machine and inputs.

Dense matrices: the BEiT-3 bicubic as an einsum with [224, H] x [224, W] weights, the mask as four dense
matmuls, all matrices memoised per size with lru_cache(64).  Not used by anything else.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import numpy as np
from PIL import Image

from evfsam.processing import BEIT3_MEAN, BEIT3_STD, CUBIC_A, SAM_PIXEL_MEAN, SAM_PIXEL_STD, resized_shape
from evfsam.specs import BEIT3_IMAGE_SIZE, LOW_RES_MASK_SIZE, SAM_IMAGE_SIZE


def sam_view(rgb: np.ndarray) -> Tuple[np.ndarray, Tuple[int, int]]:
    """RGB uint8 [H,W,3] -> float32 [3,1024,1024] and the resized (h, w) before padding."""
    new_h, new_w = resized_shape(*rgb.shape[:2])
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
    normalised = (resized.astype(np.float32) - SAM_PIXEL_MEAN) / SAM_PIXEL_STD
    out = np.zeros((3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), dtype=np.float32)
    out[:, :new_h, :new_w] = normalised.transpose(2, 0, 1)
    return out, (new_h, new_w)


def beit3_view(rgb: np.ndarray, size: int = BEIT3_IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 [H,W,3] -> float32 [3,224,224]."""
    chw = rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    rows = bicubic_matrix(rgb.shape[0], size)
    cols = bicubic_matrix(rgb.shape[1], size)
    resized = np.einsum("oh,chw,pw->cop", rows, chw, cols, optimize=True).astype(np.float32)
    return (resized - np.float32(BEIT3_MEAN)) / np.float32(BEIT3_STD)


def mask_logits(low_res: np.ndarray, resized: Tuple[int, int], original: Tuple[int, int]) -> np.ndarray:
    """[256,256] decoder logits -> float32 [H,W] logits at the original image size."""
    h, w = resized
    up_rows = bilinear_matrix(LOW_RES_MASK_SIZE, SAM_IMAGE_SIZE)[:h]
    up_cols = bilinear_matrix(LOW_RES_MASK_SIZE, SAM_IMAGE_SIZE)[:w]
    cropped = up_rows @ low_res.astype(np.float32) @ up_cols.T
    out_rows = bilinear_matrix(h, original[0])
    out_cols = bilinear_matrix(w, original[1])
    return (out_rows @ cropped @ out_cols.T).astype(np.float32)


def binary_mask(low_res: np.ndarray, resized: Tuple[int, int], original: Tuple[int, int]) -> np.ndarray:
    """uint8 0/1 [H,W]: upstream's `pred_mask > 0`."""
    return (mask_logits(low_res, resized, original) > 0).astype(np.uint8)


def _source_coordinates(in_size: int, out_size: int) -> np.ndarray:
    """Half-pixel source coordinates computed in float32, as torch's CPU kernels do."""
    scale = np.float32(in_size) / np.float32(out_size)
    return scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)


@lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's linear interpolation (align_corners=False, no antialias)."""
    src = np.maximum(_source_coordinates(in_size, out_size), np.float32(0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(np.float32), 0, 1)
    weights = np.zeros((out_size, in_size), dtype=np.float32)
    np.add.at(weights, (np.arange(out_size), lo), np.float32(1) - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights


@lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bicubic interpolation (align_corners=False, no antialias)."""
    src = _source_coordinates(in_size, out_size)
    base = np.floor(src).astype(np.int64)
    t = np.clip(src - base.astype(np.float32), 0, 1)
    one, two = np.float32(1), np.float32(2)
    taps = (_cubic_far(t + one), _cubic_near(t), _cubic_near(one - t), _cubic_far(two - t))
    weights = np.zeros((out_size, in_size), dtype=np.float32)
    for offset, tap in zip((-1, 0, 1, 2), taps):
        np.add.at(weights, (np.arange(out_size), np.clip(base + offset, 0, in_size - 1)), tap)
    return weights


def _cubic_near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
    a = np.float32(CUBIC_A)
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
    a = np.float32(CUBIC_A)
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
