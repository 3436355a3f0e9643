"""Test images: synthetic scenes with structure (so masks and resizes are not trivially uniform)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """RGB uint8 [H,W,3]: a gradient background, a few solid shapes, some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([
        255 * xx / max(width - 1, 1),
        255 * yy / max(height - 1, 1),
        np.full((height, width), 128.0),
    ], axis=-1)
    for _ in range(4):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        radius = rng.integers(max(height, width) // 10 + 1, max(height, width) // 3 + 2)
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = rng.integers(0, 256, 3)
    rgb += rng.normal(0, 8, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **kwargs)
    return buffer.getvalue()
