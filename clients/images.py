"""Images in and out of the client.

The served model takes the encoded image file's bytes, so a path or bytes are sent unchanged and a
PIL image or numpy array is encoded losslessly as PNG.  `decode_rgb` decodes bytes the way the server
does (OpenCV `IMREAD_COLOR`, then BGR -> RGB, as upstream's `cv2.imread`), so that a drawn overlay has
the pixels and the size the mask was computed for.
"""
from __future__ import annotations

import io
import os
from typing import Union

import cv2
import numpy as np
from PIL import Image

from .errors import InvalidImage

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]


def encode_image(image: ImageInput) -> bytes:
    """The bytes to send for `image`: a file path, encoded bytes, a PIL image or an RGB uint8 array."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _non_empty(bytes(image), "image bytes")
    if isinstance(image, (str, os.PathLike)):
        return _read_file(os.fspath(image))
    if isinstance(image, Image.Image):
        return _png_bytes(image.convert("RGB") if image.mode not in ("RGB", "L") else image)
    if isinstance(image, np.ndarray):
        return _png_bytes(Image.fromarray(_checked_array(image)))
    raise InvalidImage(
        f"unsupported image type {type(image).__name__}: pass a path, bytes, a PIL image or an RGB uint8 array"
    )


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded bytes -> RGB uint8 [H, W, 3], decoded as the server decodes them."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InvalidImage("the image could not be decoded (corrupt file or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_png(path: str, pixels: np.ndarray) -> None:
    """Write a grey [H, W] or RGB [H, W, 3] uint8 array as PNG."""
    Image.fromarray(pixels).save(path, format="PNG")


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return _non_empty(handle.read(), f"image file {path}")
    except FileNotFoundError:
        raise InvalidImage(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidImage(f"image path is a directory: {path}") from None
    except OSError as exc:
        raise InvalidImage(f"cannot read image file {path}: {exc.strerror or exc}") from None


def _non_empty(data: bytes, what: str) -> bytes:
    if not data:
        raise InvalidImage(f"{what} is empty")
    return data


def _checked_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InvalidImage(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3):
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise InvalidImage(f"image array is empty: shape {array.shape}")
        return np.ascontiguousarray(array)
    raise InvalidImage(f"image array must be [H, W, 3] RGB or [H, W] grey, got shape {array.shape}")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
