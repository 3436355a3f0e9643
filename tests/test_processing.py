"""The server's numpy pre/post-processing against upstream's own ops (torch, PIL), for every recipe."""
from __future__ import annotations

import gc
import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from evfsam import processing
from evfsam.pipeline import torch_beit3_view, torch_mask_logits, torch_sam_view, torch_uint8_resize
from evfsam.processing import (CHECKPOINT_RECIPES, RECIPES, ImageLimits, InvalidImage, MaskResizer, beit3_view,
                               binary_mask, decode_image, get_recipe, image_header_size, mask_logits,
                               mask_logits_to_original, masks_to_original, resized_shape, sam_view,
                               torch_uint8_bilinear)
from tests.images import encode, scene

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZES = [(480, 640), (640, 480), (1024, 1024), (77, 1500), (1500, 77), (31, 29), (2000, 1333), (1080, 1920),
         (1, 1), (2, 3), (1023, 1025)]
# (input, output) pairs for torch's uint8 kernel: up- and down-scaling, one axis only, odd and tiny sizes,
# extreme aspect ratios, identity.
UINT8_RESIZES = [((1080, 1920), (1024, 1024)), ((480, 640), (1024, 1024)), ((31, 29), (1024, 1024)),
                 ((1, 1), (1024, 1024)), ((1, 7), (1024, 1024)), ((5, 1), (1024, 1024)), ((2, 2), (3, 5)),
                 ((4000, 300), (1024, 1024)), ((300, 4000), (1024, 1024)), ((1023, 1025), (1024, 1024)),
                 ((1024, 1500), (1024, 1024)), ((700, 1024), (1024, 1024)), ((1024, 1024), (1024, 1024)),
                 ((333, 777), (500, 333)), ((2049, 2047), (7, 3001)), ((3, 3), (2, 2))]


def test_recipes_are_upstreams_four_code_paths():
    assert set(RECIPES) == {"ori", "sam2-v1", "sam2-v2", "sam2-eval"}
    assert {r.family for r in RECIPES.values()} == {"ori", "sam2"}
    assert {r.mask_postprocess for r in RECIPES.values() if r.family == "sam2"} == {"direct"}
    assert RECIPES["ori"].mask_postprocess == "crop" and RECIPES["ori"].mask_selection == "single"
    assert RECIPES["sam2-v1"].mask_selection == "single-stability"
    assert RECIPES["sam2-v2"].mask_selection == RECIPES["sam2-eval"].mask_selection == "multimask-best"
    assert set(CHECKPOINT_RECIPES.values()) <= set(RECIPES)
    assert get_recipe(RECIPES["sam2-v2"]) is RECIPES["sam2-v2"]
    with pytest.raises(ValueError, match="unknown recipe 'sam3'"):
        get_recipe("sam3")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("height, width", SIZES)
def test_sam_view_matches_upstream(recipe, height, width):
    rgb = scene(height, width, seed=height)
    ours, covered = sam_view(rgb, recipe)
    reference, reference_covered = torch_sam_view(rgb, recipe)
    assert ours.dtype == np.float32 and ours.shape == (3, 1024, 1024)
    assert covered == reference_covered
    if recipe == "sam2-v1":  # the float stretch: torch's and OpenCV's sums round differently (1-2 ulp)
        np.testing.assert_allclose(ours, reference.numpy(), rtol=0, atol=1e-6)
    else:  # PIL or torch's uint8 kernel, then the same float32 normalisation: identical
        np.testing.assert_array_equal(ours, reference.numpy())
    if recipe == "ori":
        assert covered == resized_shape(height, width) and max(covered) == 1024
        assert not ours[:, covered[0]:, :].any() and not ours[:, :, covered[1]:].any()  # zero padding
    else:
        assert covered == (1024, 1024)


@pytest.mark.parametrize("source, target", UINT8_RESIZES, ids=str)
def test_uint8_resize_is_bit_exact_with_torch(source, target):
    rgb = scene(*source, seed=source[0] * 7 + source[1])
    reference = torch_uint8_resize(rgb, *target).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(torch_uint8_bilinear(rgb, *target), reference)


def test_uint8_resize_matches_torch_without_avx2(tmp_path):
    """torch's generic (non-AVX2) uint8 kernel, forced with ATEN_CPU_CAPABILITY=default, gives the same bytes."""
    if "AVX2" not in torch.backends.cpu.get_cpu_capability() and "AVX512" not in torch.backends.cpu.get_cpu_capability():
        pytest.skip("this CPU has no AVX2: the in-process tests already use the generic kernel")
    script = (
        "import json, sys, numpy as np, torch\n"
        "from evfsam.pipeline import torch_uint8_resize\n"
        "from tests.images import scene\n"
        "cases = json.loads(sys.argv[1])\n"
        "out = {f'{i}': torch_uint8_resize(scene(*s, seed=s[0] * 7 + s[1]), *t).permute(1, 2, 0).numpy()"
        " for i, (s, t) in enumerate(cases)}\n"
        "np.savez(sys.argv[2], capability=torch.backends.cpu.get_cpu_capability(), **out)\n"
    )
    cases = UINT8_RESIZES[:6] + UINT8_RESIZES[-3:]
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, "-c", script, json.dumps(cases), str(tmp_path / "generic.npz")],
                   check=True, env=env, cwd=REPO_ROOT, timeout=300)
    generic = np.load(tmp_path / "generic.npz")
    assert str(generic["capability"]) == "DEFAULT"
    for i, (source, target) in enumerate(cases):
        rgb = scene(*source, seed=source[0] * 7 + source[1])
        np.testing.assert_array_equal(torch_uint8_bilinear(rgb, *target), generic[f"{i}"], err_msg=str((source, target)))


@pytest.mark.parametrize("height, width", SIZES)
def test_beit3_view_matches_upstream(height, width):
    rgb = scene(height, width, seed=width)
    # float32 sums in another order than torch's; positions use torch's fused multiply-add: within 5e-5 on [-1, 1]
    np.testing.assert_allclose(beit3_view(rgb), torch_beit3_view(rgb).numpy(), rtol=0, atol=5e-5)


def test_beit3_view_is_the_same_for_every_recipe():
    rgb = scene(333, 500, seed=1)
    for recipe in RECIPES:
        np.testing.assert_array_equal(beit3_view(rgb, recipe=recipe), beit3_view(rgb))
        np.testing.assert_array_equal(torch_beit3_view(rgb, recipe).numpy(), torch_beit3_view(rgb).numpy())


def test_beit3_view_is_bicubic_without_antialias():
    """Downscaling a 1-pixel checkerboard without antialiasing keeps aliasing; antialias would blur it."""
    board = ((np.indices((500, 500)).sum(0) % 2) * 255).astype(np.uint8)
    rgb = np.repeat(board[..., None], 3, axis=-1)
    antialiased = torch.nn.functional.interpolate(
        torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float()[None] / 255, size=(224, 224),
        mode="bicubic", align_corners=False, antialias=True)[0].numpy() * 2 - 1
    ours = beit3_view(rgb)
    assert np.abs(ours - antialiased).max() > 0.1


def _logits(kind: str, seed: int) -> np.ndarray:
    """Decoder-like logits: noise (a sign change at every pixel), smooth blobs, or one positive pixel."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.standard_normal((256, 256)).astype(np.float32)
    if kind == "smooth":
        field = cv2.GaussianBlur(rng.standard_normal((256, 256)).astype(np.float32), (0, 0), 12)
        return (field / np.abs(field).max() * 20).astype(np.float32)
    logits = np.full((256, 256), -5.0, dtype=np.float32)
    logits[rng.integers(0, 256), rng.integers(0, 256)] = 5.0
    return logits


MASK_ORIGINALS = [(480, 640), (640, 480), (77, 1500), (31, 29), (2000, 1333), (1, 1), (1, 2000), (2000, 1),
                  (3, 3), (256, 256), (1024, 1024), (1080, 1920)]


@pytest.mark.parametrize("kind", ["noise", "smooth", "single"])
@pytest.mark.parametrize("recipe", ["ori", "sam2-v2"])
@pytest.mark.parametrize("original", MASK_ORIGINALS, ids=str)
def test_mask_postprocess_matches_upstream(original, recipe, kind):
    low_res = _logits(kind, sum(original))
    resized = resized_shape(*original)
    reference = torch_mask_logits(torch.from_numpy(low_res)[None, None], resized, original, recipe)[0, 0].numpy()
    ours = mask_logits(low_res, resized, original, recipe)
    assert ours.shape == original
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)  # float32 rounding
    _assert_same_signs(binary_mask(low_res, resized, original, recipe).astype(bool), reference)


def _assert_same_signs(mask: np.ndarray, reference: np.ndarray) -> None:
    differ = mask != (reference > 0)
    assert not differ.any() or np.abs(reference[differ]).max() < 1e-3, int(differ.sum())


@pytest.mark.parametrize("recipe", ["ori", "sam2-v1"])
def test_mask_postprocess_of_a_very_large_original(recipe):
    original = (6000, 4000)  # 24 MP
    low_res = _logits("smooth", 3)
    resized = resized_shape(*original)
    reference = torch_mask_logits(torch.from_numpy(low_res)[None, None], resized, original, recipe)[0, 0].numpy()
    _assert_same_signs(masks_to_original(low_res, resized, original, recipe)[0], reference)


@pytest.mark.parametrize("share", [0.0, float("inf")], ids=["dense", "blocks"])
@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_binary_masks_agree_on_both_paths(monkeypatch, share, kind):
    """Block classification and the all-logits fallback each give upstream's signs."""
    monkeypatch.setattr(MaskResizer, "DENSE_SHARE", share)
    original = (700, 1100)
    for recipe in ("ori", "sam2-eval"):
        low_res = _logits(kind, 11)
        resized = resized_shape(*original)
        reference = torch_mask_logits(torch.from_numpy(low_res)[None, None], resized, original, recipe)[0, 0].numpy()
        _assert_same_signs(binary_mask(low_res, resized, original, recipe).astype(bool), reference)


def test_masks_to_original_takes_a_batch():
    low_res = np.stack([_logits(kind, 5) for kind in ("noise", "smooth", "single")])[:, None]  # [N, 1, 256, 256]
    original, resized = (300, 500), resized_shape(300, 500)
    masks = masks_to_original(low_res, resized, original, "ori")
    logits = mask_logits_to_original(low_res, resized, original, "ori")
    assert masks.dtype == bool and masks.shape == logits.shape == (3, 300, 500)
    for mask, logit, single in zip(masks, logits, low_res[:, 0]):
        np.testing.assert_array_equal(mask, binary_mask(single, resized, original).astype(bool))
        np.testing.assert_array_equal(logit, mask_logits(single, resized, original))


def test_mask_arguments_are_checked():
    with pytest.raises(ValueError, match="expected low-res logits"):
        binary_mask(np.zeros((128, 128), np.float32), (512, 1024), (300, 600))
    with pytest.raises(ValueError, match="original_hw must be positive"):
        MaskResizer((512, 1024), (0, 600))
    with pytest.raises(ValueError, match="resized_hw must be positive and at most 1024"):
        MaskResizer((512, 2048), (300, 600), "ori")
    MaskResizer(None, (300, 600), "sam2-v2")  # SAM-2 postprocessing ignores the resized size, as upstream


def test_views_reject_what_is_not_an_rgb_image():
    with pytest.raises(ValueError, match="expected an RGB uint8 array"):
        sam_view(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="expected an RGB uint8 array"):
        beit3_view(np.zeros((10, 10, 3), np.float32))


@pytest.mark.parametrize("recipe", ["ori", "sam2-v1"])
def test_too_elongated_for_resize_longest_side(recipe):
    with pytest.raises(InvalidImage, match="too elongated"):
        sam_view(np.zeros((1, 2100, 3), np.uint8), recipe)
    assert sam_view(np.zeros((1, 2100, 3), np.uint8), "sam2-v2")[0].shape == (3, 1024, 1024)  # a stretch copes


def test_no_unbounded_or_large_caches():
    """Nothing is memoised per size: after many sizes, what the module keeps alive stays small."""
    assert not [name for name, value in vars(processing).items() if hasattr(value, "cache_info")]
    sam_view(scene(100, 100), "sam2-v2")  # warm up imports and OpenCV/Pillow internals
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i, size in enumerate([(97 + i, 1200 - 37 * i) for i in range(8)]):
            rgb = scene(*size, seed=i)
            for recipe in RECIPES:
                sam_view(rgb, recipe)
                beit3_view(rgb, recipe=recipe)
                binary_mask(_logits("smooth", i), resized_shape(*size), (size[0] * 3, size[1] * 2), recipe)
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 1 * 1024**2, after - before
    assert peak - before < 200 * 1024**2, peak - before  # one request's arrays, no per-size matrices


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
    assert image_header_size(data) == (ours.shape[1], ours.shape[0])  # (width, height) as decoded
    if case == "exif_jpeg":
        assert ours.shape[:2] == (100, 60)  # orientation applied


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_header_size_is_the_decoded_size(fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(scene(60, 100)).save(buffer, fmt, exif=exif.tobytes())
    rgb = decode_image(buffer.getvalue())
    assert image_header_size(buffer.getvalue()) == (rgb.shape[1], rgb.shape[0])


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
    assert image_header_size(big) == (3000, 3000)
