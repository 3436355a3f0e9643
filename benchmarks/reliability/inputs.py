"""Requests for the two served models through the raw `tritonclient` API (the scenarios talk to the
server the way any client can, not through `clients/`), and the images they send."""
from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from evfsam.specs import EVF_SAM, EVF_SAM_PROMPTS

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_IMAGE = REPO_ROOT / "assets" / "sample.jpg"
PROMPT = "zebra top left"
JPEG_SOI = b"\xff\xd8"
JPEG_COMMENT = b"\xff\xfe"


def unique_jpeg(jpeg: bytes, serial: int) -> bytes:
    """The same picture under another cache key: `serial` in a JPEG comment segment right after the
    start-of-image marker.  Decoders skip comments, so every copy costs the server the same work."""
    if not jpeg.startswith(JPEG_SOI):
        raise ValueError("not a JPEG file (no start-of-image marker)")
    payload = f"reliability request {serial}".encode()
    return JPEG_SOI + JPEG_COMMENT + struct.pack(">H", len(payload) + 2) + payload + jpeg[len(JPEG_SOI):]


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def sample_rgb() -> Image.Image:
    with Image.open(SAMPLE_IMAGE) as img:
        return img.convert("RGB")


def image_set(count: int) -> List[bytes]:
    """`count` distinct encoded images cut from assets/sample.jpg: sizes from 160 to 960 pixels wide,
    JPEG / PNG / WebP in turn (distinct files, distinct cache keys)."""
    rgb = sample_rgb()
    formats = (("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 85}))
    images = []
    for index in range(count):
        width = 160 + (index * 97) % 801
        height = max(32, int(width * (0.5 + 0.25 * (index % 4))))
        crop = rgb.crop((index % 7 * 10, 0, rgb.width - index % 5 * 10, rgb.height))
        fmt, options = formats[index % len(formats)]
        images.append(encode(crop.resize((width, height), Image.BILINEAR), fmt, **options))
    return images


def _bytes_input(module, name: str, values: Sequence[bytes], shape: Sequence[int]):
    tensor = module.InferInput(name, list(shape), "BYTES")
    tensor.set_data_from_numpy(np.array(list(values), dtype=np.object_).reshape(shape))
    return tensor


def evf_sam_inputs(module, image: bytes, prompt: bytes) -> list:
    """`evf_sam`: image [1,1] and prompt [1,1] (module: tritonclient.grpc or tritonclient.http)."""
    image_spec, prompt_spec = EVF_SAM.inputs
    return [_bytes_input(module, image_spec.name, [image], (1, 1)),
            _bytes_input(module, prompt_spec.name, [prompt], (1, 1))]


def prompts_inputs(module, prompts: Sequence[bytes], image: Optional[bytes] = None, image_key: Optional[bytes] = None,
                   mask_format: Optional[bytes] = None) -> list:
    """`evf_sam_prompts`: image [1] or image_key [1], prompts [N], mask_format [1]."""
    tensors = [_bytes_input(module, EVF_SAM_PROMPTS.input("prompts").name, prompts, (len(prompts),))]
    for name, value in (("image", image), ("image_key", image_key), ("mask_format", mask_format)):
        if value is not None:
            tensors.append(_bytes_input(module, EVF_SAM_PROMPTS.input(name).name, [value], (1,)))
    return tensors
