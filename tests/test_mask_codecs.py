"""Mask encodings against pycocotools (COCO RLE) and real PNG readers (Pillow, OpenCV)."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pycocotools.mask as coco
import pytest
from PIL import Image

from evfsam.mask_codecs import decode_png, decode_rle, encode_png, encode_rle, run_lengths, string_to_counts


def _masks():
    rng = np.random.default_rng(0)
    cases = {
        "empty": np.zeros((3, 4), bool), "full": np.ones((3, 4), bool), "diagonal": np.eye(3, 4, dtype=bool),
        "one_pixel_set": np.ones((1, 1), bool), "one_pixel_clear": np.zeros((1, 1), bool),
        "row": rng.random((1, 101)) < 0.5, "column": rng.random((99, 1)) < 0.5,
        "sparse": rng.random((480, 640)) < 0.001, "dense": rng.random((333, 777)) < 0.99,
        "noise_odd": rng.random((37, 53)) < 0.5,
    }
    for name, (y, x) in {"first": (0, 0), "last": (4, 6), "middle": (2, 3)}.items():
        cases[f"single_{name}"] = np.zeros((5, 7), bool)
        cases[f"single_{name}"][y, x] = True
    blob = np.zeros((1080, 1921), bool)
    blob[100:900, 300:1500] = True
    blob[400:500, 600:700] = False
    cases["blob_odd_width"] = blob
    huge = np.zeros((4000, 3001), bool)  # runs over 2**20: values spread over 5 groups of the counts string
    huge[1000:3999, 2900:3000] = True  # first run: 2900 columns of zeros, 11.6 M
    cases["large_runs"] = huge
    return cases


MASKS = _masks()


@pytest.mark.parametrize("name", sorted(MASKS))
def test_rle_is_pycocotools_encode(name):
    mask = MASKS[name]
    reference = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    ours = encode_rle(mask)
    assert ours == {"size": reference["size"], "counts": reference["counts"].decode("ascii")}
    np.testing.assert_array_equal(coco.decode(ours).astype(bool), mask)  # pycocotools reads ours
    np.testing.assert_array_equal(decode_rle(ours), mask)
    np.testing.assert_array_equal(decode_rle(reference), mask)  # and we read theirs (bytes counts)
    assert int(run_lengths(mask).sum()) == mask.size


def test_rle_accepts_uint8_fortran_and_sliced_masks():
    mask = MASKS["noise_odd"]
    expected = encode_rle(mask)
    assert encode_rle(mask.astype(np.uint8)) == expected
    assert encode_rle(np.asfortranarray(mask)) == expected
    wide = np.zeros((37, 80), bool)
    wide[:, 10:63] = mask
    assert encode_rle(wide[:, 10:63]) == expected


def test_uncompressed_rle_and_bad_input():
    mask = MASKS["diagonal"]
    np.testing.assert_array_equal(decode_rle({"size": [3, 4], "counts": run_lengths(mask).tolist()}), mask)
    with pytest.raises(ValueError, match="cover 12 pixels; size 4x4 has 16"):
        decode_rle({"size": [4, 4], "counts": encode_rle(mask)["counts"]})
    with pytest.raises(ValueError, match="not a COCO RLE counts string"):
        string_to_counts("0~")
    with pytest.raises(ValueError, match="expected a 2-D mask"):
        encode_rle(np.zeros((2, 3, 4), bool))


@pytest.mark.parametrize("name", ["empty", "full", "diagonal", "one_pixel_set", "row", "column", "noise_odd",
                                  "single_last", "blob_odd_width"])
def test_png_round_trips_through_real_readers(name):
    mask = MASKS[name]
    data = encode_png(mask)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode == "1" and image.size == (mask.shape[1], mask.shape[0])
        np.testing.assert_array_equal(np.asarray(image), mask)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) == 255, mask)
    np.testing.assert_array_equal(decode_png(data), mask)


def test_png_is_one_bit_and_small():
    mask = MASKS["blob_odd_width"]
    data = encode_png(mask)
    assert data[24] == 1  # IHDR bit depth
    assert len(data) < mask.size / 8 / 20  # packed bits, then deflated
    with pytest.raises(ValueError, match="at least one pixel"):
        encode_png(np.zeros((0, 5), bool))
    with pytest.raises(ValueError, match="not a PNG"):
        decode_png(b"not a png")
