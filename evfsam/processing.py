"""Pre- and post-processing identical to upstream `inference.py`, in numpy (no torch).

* decode: `cv2.imdecode(IMREAD_COLOR)` + BGR->RGB, exactly what upstream's `cv2.imread` does
  (grey and palette images to 3 channels, alpha dropped, 16-bit scaled to 8-bit, EXIF orientation
  applied), behind size checks that reject oversized payloads and decompression bombs before decoding.
* SAM view: `ResizeLongestSide(1024)` (PIL bilinear), SAM pixel mean/std, zero pad bottom/right.
* BEiT-3 view: `ToTensor` -> bicubic 224x224 without antialiasing (torch's kernel, a = -0.75,
  half-pixel centres, clamped borders) -> normalise with mean = std = 0.5.
* mask: bilinear upsample of the 256x256 logits to 1024x1024, crop to the resized size, bilinear to
  the original size (both `align_corners=False`, no antialias), threshold at 0.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

import cv2
import numpy as np
from PIL import Image

from .specs import BEIT3_IMAGE_SIZE, LOW_RES_MASK_SIZE, SAM_IMAGE_SIZE

SAM_PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
SAM_PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
BEIT3_MEAN = 0.5
BEIT3_STD = 0.5
CUBIC_A = -0.75  # PyTorch's bicubic coefficient

DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class InvalidImage(ValueError):
    """The bytes are not an image this service accepts; the message is safe to show a client."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def checked_image_size(data: bytes, limits: ImageLimits = ImageLimits()) -> Tuple[int, int]:
    """(H, W) from the header alone, after the size checks that precede any decoding."""
    if len(data) == 0:
        raise InvalidImage("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidImage(f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    width, height = _header_size(data)
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} pixels"
        )
    return height, width


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 [H, W, 3], as upstream's `cv2.imread` + `cvtColor`."""
    checked_image_size(data, limits)
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.ndim != 3 or bgr.shape[0] == 0 or bgr.shape[1] == 0:
        raise InvalidImage("image could not be decoded (corrupt or truncated file?)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _header_size(data: bytes) -> Tuple[int, int]:
    """Width and height from the header alone (PIL opens lazily), before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Image.DecompressionBombError as exc:
        raise InvalidImage("image dimensions are too large (decompression bomb)") from exc
    except Exception as exc:
        raise InvalidImage("data is not a recognised image format (JPEG, PNG, WebP, BMP, TIFF, ...)") from exc


def resized_shape(height: int, width: int, long_side: int = SAM_IMAGE_SIZE) -> Tuple[int, int]:
    """`ResizeLongestSide.get_preprocess_shape`."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


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
