"""The server's numpy pre/post-processing against the straightforward torch reference (upstream's ops)."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from evfsam.pipeline import torch_beit3_view, torch_mask_logits, torch_sam_view
from evfsam.processing import ImageLimits, InvalidImage, beit3_view, decode_image, mask_logits, resized_shape, sam_view
from tests.images import encode, scene

SIZES = [(480, 640), (640, 480), (1024, 1024), (77, 1500), (1500, 77), (31, 29), (2000, 1333)]


@pytest.mark.parametrize("height, width", SIZES)
def test_sam_view_matches_upstream(height, width):
    rgb = scene(height, width, seed=height)
    ours, resized = sam_view(rgb)
    reference, reference_resized = torch_sam_view(rgb)
    assert resized == reference_resized == resized_shape(height, width)
    assert max(resized) == 1024
    np.testing.assert_allclose(ours, reference.numpy(), rtol=0, atol=1e-6)
    assert not ours[:, resized[0]:, :].any() and not ours[:, :, resized[1]:].any()  # zero padding


@pytest.mark.parametrize("height, width", SIZES)
def test_beit3_view_matches_upstream(height, width):
    rgb = scene(height, width, seed=width)
    # float32 rounding of the sampling positions differs by op order: within 5e-5 on [-1, 1]
    np.testing.assert_allclose(beit3_view(rgb), torch_beit3_view(rgb).numpy(), rtol=0, atol=5e-5)


def test_beit3_view_is_bicubic_without_antialias():
    """Downscaling a 1-pixel checkerboard without antialiasing keeps aliasing; antialias would blur it."""
    board = ((np.indices((500, 500)).sum(0) % 2) * 255).astype(np.uint8)
    rgb = np.repeat(board[..., None], 3, axis=-1)
    antialiased = torch.nn.functional.interpolate(
        torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float()[None] / 255, size=(224, 224),
        mode="bicubic", align_corners=False, antialias=True)[0].numpy() * 2 - 1
    ours = beit3_view(rgb)
    assert np.abs(ours - antialiased).max() > 0.1


@pytest.mark.parametrize("original", [(480, 640), (640, 480), (77, 1500), (31, 29), (2000, 1333)])
def test_mask_postprocess_matches_upstream(original):
    rng = np.random.default_rng(sum(original))
    low_res = rng.standard_normal((256, 256)).astype(np.float32)
    resized = resized_shape(*original)
    reference = torch_mask_logits(torch.from_numpy(low_res)[None, None], resized, original)[0, 0].numpy()
    ours = mask_logits(low_res, resized, original)
    assert ours.shape == original
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)  # logits ~N(0,1): float32 rounding
    assert ((ours > 0) != (reference > 0)).sum() <= (np.abs(reference) < 1e-4).sum()


def _write_and_read_like_upstream(tmp_path, data: bytes, suffix: str) -> np.ndarray:
    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _exif_rotated_jpeg() -> bytes:
    img = Image.fromarray(scene(60, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def _png_16bit() -> bytes:
    array = (scene(40, 50)[..., 0].astype(np.uint16) * 257 + 3)
    ok, data = cv2.imencode(".png", array)
    return data.tobytes()


DECODE_CASES = {
    "grayscale": (lambda: encode(scene(40, 50)[..., 0], "PNG"), ".png"),
    "rgba": (lambda: encode(np.dstack([scene(40, 50), np.full((40, 50), 77, np.uint8)]), "PNG"), ".png"),
    "palette": (lambda: encode_palette(), ".png"),
    "png16": (_png_16bit, ".png"),
    "exif_jpeg": (_exif_rotated_jpeg, ".jpg"),
    "webp": (lambda: encode(scene(40, 50), "WEBP", quality=90), ".webp"),
    "bmp": (lambda: encode(scene(40, 50), "BMP"), ".bmp"),
}


def encode_palette() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(scene(40, 50)).convert("P", palette=Image.ADAPTIVE, colors=16).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_matches_cv2_imread(tmp_path, case):
    make, suffix = DECODE_CASES[case]
    data = make()
    ours = decode_image(data)
    assert ours.dtype == np.uint8 and ours.ndim == 3 and ours.shape[2] == 3
    np.testing.assert_array_equal(ours, _write_and_read_like_upstream(tmp_path, data, suffix))
    if case == "exif_jpeg":
        assert ours.shape[:2] == (100, 60)  # orientation applied


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is not an image at all", "not a recognised image format"),
    (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not a recognised image format"),
    (encode(scene(100, 100), "PNG")[:400], "could not be decoded"),
    (encode(scene(100, 100), "JPEG")[:700], "could not be decoded"),
])
def test_decode_rejects_bad_bytes(data, message):
    with pytest.raises(InvalidImage, match=message):
        decode_image(data)


def test_decode_limits_checked_before_decoding():
    big = encode(np.zeros((3000, 3000, 3), np.uint8), "PNG")  # compresses to a few KB
    with pytest.raises(InvalidImage, match="9000000 pixels; the limit is 1000000"):
        decode_image(big, ImageLimits(max_pixels=1_000_000))
    with pytest.raises(InvalidImage, match="the limit is 100 bytes"):
        decode_image(encode(scene(20, 20)), ImageLimits(max_bytes=100))
