"""Compact encodings of binary masks for responses with many prompts or big images (numpy + OpenCV).

* "rle": COCO run-length encoding as JSON, `{"size": [H, W], "counts": "<compressed string>"}`, the
  string exactly as pycocotools' `mask.encode` writes it (column-major runs starting with a run of 0s;
  each count after the second stored as the difference to the count two before, in 5-bit groups with
  a continuation bit, offset by 48), so `pycocotools.mask.decode` reads it.
* "png": a single-channel 8-bit PNG of 0/1 values.
"""
from __future__ import annotations

import json
from typing import Callable, Dict

import cv2
import numpy as np


def rle_counts(mask: np.ndarray) -> np.ndarray:
    """Run lengths of the column-major flattening, starting with the (possibly empty) run of 0s."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds)
    return np.concatenate(([0], runs)) if flat[0] else runs


def _counts_string(counts: np.ndarray) -> str:
    out = bytearray()
    for i, count in enumerate(counts.tolist()):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = (value != -1) if (chunk & 0x10) else (value != 0)
            if more:
                chunk |= 0x20
            out.append(chunk + 48)
    return out.decode("ascii")


def _parse_counts(text: str) -> np.ndarray:
    counts, value, shift, i = [], 0, 0, 0
    data = text.encode("ascii")
    while i < len(data):
        value, shift = 0, 0
        while True:
            chunk = data[i] - 48
            value |= (chunk & 0x1F) << (5 * shift)
            more = chunk & 0x20
            i += 1
            shift += 1
            if not more:
                if chunk & 0x10:
                    value |= -1 << (5 * shift)
                break
            if i >= len(data):
                raise ValueError("truncated RLE counts")
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return np.asarray(counts, dtype=np.int64)


def encode_rle(mask: np.ndarray) -> bytes:
    height, width = mask.shape
    return json.dumps({"size": [int(height), int(width)], "counts": _counts_string(rle_counts(mask))},
                      separators=(",", ":")).encode("ascii")


def decode_rle(data: bytes) -> np.ndarray:
    try:
        record = json.loads(data)
        height, width = (int(v) for v in record["size"])
        counts = _parse_counts(record["counts"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a COCO RLE record: {exc}") from None
    if counts.sum() != height * width or (counts < 0).any():
        raise ValueError(f"RLE counts cover {int(counts.sum())} pixels, the size says {height * width}")
    values = (np.arange(len(counts)) % 2).astype(np.uint8)
    return np.repeat(values, counts).reshape((width, height)).T.copy()


def encode_png(mask: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    mask = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        raise ValueError("not a single-channel PNG mask")
    return mask.astype(np.uint8)


ENCODERS: Dict[str, Callable[[np.ndarray], bytes]] = {"rle": encode_rle, "png": encode_png}
DECODERS: Dict[str, Callable[[bytes], np.ndarray]] = {"rle": decode_rle, "png": decode_png}


def encode_mask(mask: np.ndarray, mask_format: str) -> bytes:
    return ENCODERS[mask_format](mask)


def decode_mask(data: bytes, mask_format: str) -> np.ndarray:
    if mask_format not in DECODERS:
        raise ValueError(f"unknown mask format {mask_format!r}")
    return DECODERS[mask_format](data)
