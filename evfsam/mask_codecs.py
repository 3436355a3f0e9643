"""Compact binary-mask encodings for responses: COCO RLE and 1-bit PNG (numpy + OpenCV, no torch).

COCO RLE: run lengths of the mask read column by column (Fortran order), starting with a run of zeros
(0 when the first pixel is set), and `counts` compressed exactly as pycocotools' `rleToString` does
(each count minus the count two before it, from the fourth on, in 5-bit groups with a continuation
bit, as ASCII 48..111).  `pycocotools.mask.decode({"size": [h, w], "counts": counts})` reads it.

PNG: 1 bit per pixel, greyscale, written here (bit-packed rows, filter 0, zlib level 1 with the
run-length strategy): 8x less data to deflate than an 8-bit PNG, so smaller and several times faster
than OpenCV's 8-bit or bilevel writers (benchmarks/processing.py has the numbers).  Any PNG reader
returns it (PIL: mode "1" -> bool; OpenCV: 0/255).
"""
from __future__ import annotations

import json
import struct
import zlib
from typing import Dict, List, Mapping, Sequence, Union

import cv2
import numpy as np

RLE_CHAR_OFFSET = 48  # pycocotools writes each 6-bit group as chr(48 + group)
RLE_GROUP_BITS = 5
RLE_MORE = 0x20  # continuation bit
RLE_SIGN = 0x10  # sign bit of the last group
RLE_MAX_GROUPS = 8  # 40-bit two's complement: run-length differences of masks up to 2**39 pixels
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_ZLIB_LEVEL = 1  # with the run-length strategy higher levels give the same bytes, slower

Rle = Dict[str, Union[List[int], str]]


def encode_rle(mask: np.ndarray) -> Rle:
    """bool/0-1 [H, W] -> {"size": [H, W], "counts": str}, identical to pycocotools `mask.encode`."""
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_to_string(run_lengths(mask))}


def decode_rle(rle: Mapping) -> np.ndarray:
    """COCO RLE (compressed `counts` str/bytes, or an uncompressed list of counts) -> bool [H, W]."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = string_to_counts(counts) if isinstance(counts, (str, bytes)) else np.asarray(counts, dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"RLE counts cover {int(counts.sum())} pixels; size {height}x{width} has {height * width}")
    values = np.arange(len(counts), dtype=np.uint8) % 2  # runs alternate 0, 1, 0, ...
    column_major = np.repeat(values, counts).reshape(width, height)
    return cv2.transpose(column_major).view(bool)


def run_lengths(mask: np.ndarray) -> np.ndarray:
    """int64 run lengths of the column-major mask, the first run counting zeros."""
    mask = _as_binary(mask)
    height, width = mask.shape
    if mask.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Changes down each column (found in row-major order, no transpose) and from the bottom of one
    # column to the top of the next, ordered by their column-major position.
    down_y, down_x = _changes_down(mask)
    wrap_x = np.flatnonzero(mask[0, 1:] != mask[-1, :-1]) + 1
    changes = np.sort(np.concatenate([down_x * height + down_y + 1, wrap_x * height]))
    bounds = np.concatenate([[0], changes, [mask.size]])
    counts = np.diff(bounds)
    return np.concatenate([[0], counts]) if mask[0, 0] else counts


def _changes_down(mask: np.ndarray):
    """(y, x) with mask[y + 1, x] != mask[y, x]: 8 pixels per uint64 comparison, then the bytes of the
    words that changed (masks change rarely, so this scans an eighth of the elements)."""
    height, width = mask.shape
    pixels = mask.view(np.uint8)
    whole = width - width % 8
    found_y, found_x = [], []
    if whole:
        words = pixels[:, :whole].view(np.uint64)
        word_y, word_x = np.nonzero(words[1:] != words[:-1])
        below = pixels[:, :whole].reshape(height, -1, 8)
        byte_k, byte_b = np.nonzero(below[word_y + 1, word_x] != below[word_y, word_x])
        found_y.append(word_y[byte_k])
        found_x.append(word_x[byte_k] * 8 + byte_b)
    if whole < width:
        tail_y, tail_x = np.nonzero(pixels[1:, whole:] != pixels[:-1, whole:])
        found_y.append(tail_y)
        found_x.append(tail_x + whole)
    return np.concatenate(found_y), np.concatenate(found_x)


def counts_to_string(counts: Sequence[int]) -> str:
    """pycocotools `rleToString`, vectorised."""
    counts = np.asarray(counts, dtype=np.int64)
    values = counts.copy()
    values[3:] -= counts[1:-2]
    groups = np.arange(RLE_MAX_GROUPS)
    chunks = (values[:, None] >> (RLE_GROUP_BITS * groups)) & 0x1F
    # A value needs n groups when it fits n*5-bit two's complement: the rest is its sign extension.
    limit = np.left_shift(1, RLE_GROUP_BITS * (groups + 1) - 1, dtype=np.int64)
    needed = 1 + np.sum((values[:, None] >= limit) | (values[:, None] < -limit), axis=1)
    present = groups[None, :] < needed[:, None]
    more = groups[None, :] < needed[:, None] - 1
    chars = (chunks | np.where(more, RLE_MORE, 0)) + RLE_CHAR_OFFSET
    return chars[present].astype(np.uint8).tobytes().decode("ascii")


def string_to_counts(text: Union[str, bytes]) -> np.ndarray:
    """pycocotools `rleFrString`, vectorised: int64 run lengths."""
    data = np.frombuffer(text.encode("ascii") if isinstance(text, str) else bytes(text), dtype=np.uint8)
    groups = data.astype(np.int64) - RLE_CHAR_OFFSET
    if data.size and ((groups < 0).any() or (groups > 0x3F).any() or groups[-1] & RLE_MORE):
        raise ValueError("not a COCO RLE counts string (characters outside '0'..'o' or a truncated value)")
    last = np.flatnonzero((groups & RLE_MORE) == 0)
    first = np.concatenate([[0], last[:-1] + 1])
    position = np.arange(len(groups)) - np.repeat(first, last - first + 1)
    values = np.add.reduceat((groups & 0x1F) << (RLE_GROUP_BITS * position), first) if len(first) else first
    width = RLE_GROUP_BITS * (last - first + 1)
    values = np.where(groups[last] & RLE_SIGN, values - np.left_shift(1, width, dtype=np.int64), values)
    counts = values.copy()  # counts[i] = values[i] + counts[i - 2] from i = 3 on: two running sums
    counts[1::2] = np.cumsum(values[1::2])
    counts[2::2] = np.cumsum(values[2::2])
    return counts


def encode_png(mask: np.ndarray) -> bytes:
    """bool/0-1 [H, W] -> 1-bit greyscale PNG bytes (rows unfiltered, zlib level 1, run-length strategy)."""
    mask = _as_binary(mask)
    height, width = mask.shape
    if height == 0 or width == 0:
        raise ValueError(f"a PNG needs at least one pixel; the mask is {height}x{width}")
    rows = np.zeros((height, 1 + (width + 7) // 8), dtype=np.uint8)  # each row: filter type 0, packed bits
    rows[:, 1:] = np.packbits(mask, axis=1)
    deflate = zlib.compressobj(PNG_ZLIB_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
    pixels = deflate.compress(rows.tobytes()) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale, no interlace
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes (1-bit or 8-bit greyscale) -> bool [H, W] (non-zero = set)."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError("not a PNG image (or a corrupt one)")
    return image > 0


def _as_binary(mask: np.ndarray) -> np.ndarray:
    mask = np.ascontiguousarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask [H, W], got shape {list(mask.shape)}")
    return mask if mask.dtype == bool else mask != 0


# ----------------------------------------------------------------------------------------------------
# The wire: `evf_sam_prompts` sends one encoded mask per prompt as BYTES ("rle": the RLE record as
# compact JSON; "png": the PNG file); clients decode them with `decode_mask`.

def encode_mask(mask: np.ndarray, mask_format: str) -> bytes:
    if mask_format == "rle":
        return json.dumps(encode_rle(mask), separators=(",", ":")).encode("ascii")
    if mask_format == "png":
        return encode_png(mask)
    raise ValueError(f"unknown mask format {mask_format!r}")


def decode_mask(data: bytes, mask_format: str) -> np.ndarray:
    """An encoded mask from the wire -> uint8 0/1 [H, W]; ValueError if it is not one."""
    try:
        if mask_format == "rle":
            record = json.loads(data)
            mask = decode_rle(record)
        elif mask_format == "png":
            mask = decode_png(data)
        else:
            raise ValueError(f"unknown mask format {mask_format!r}")
    except ValueError:
        raise
    except Exception as exc:  # malformed JSON fields, truncated data: one clear error type
        raise ValueError(f"malformed {mask_format} mask: {type(exc).__name__}: {exc}") from None
    return np.asarray(mask, dtype=np.uint8)
