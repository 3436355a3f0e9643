"""Pre- and post-processing identical to upstream EVF-SAM, in numpy + OpenCV + Pillow (no torch).

Upstream prepares images in four ways, one per code path; each is a `Recipe` (see `RECIPES`):

* "ori" (`inference.py`, `model_type="ori"`; all SAM-1 checkpoints): `ResizeLongestSide(1024)` (a PIL
  bilinear resize, antialiased), SAM mean/std, zero pad bottom/right.  Mask: bilinear 256 -> 1024, crop
  to the resized size, bilinear to the original size (`align_corners=False`), `> 0`.
* "sam2-v1" (`inference.py` before upstream commit 9d00853): `ResizeLongestSide(1024)` (PIL), normalise,
  then a float bilinear stretch (`F.interpolate`, no antialias) of the normalised tensor to 1024x1024.
* "sam2-v2" (`inference.py` from 9d00853): `F.interpolate` bilinear of the *uint8* CHW tensor straight to
  1024x1024, then normalise.  torch's CPU uint8 kernel is separable fixed-point arithmetic: for each
  axis int16 weights `round(w * 2**p)` with the largest precision `p` that keeps them below 2**15, a
  horizontal pass then a vertical pass, each `clamp((sum(k * x) + 2**(p-1)) >> p, 0, 255)` and stored
  as uint8 in between (`UpSampleKernel.cpp` `_compute_index_ranges_int16_weights`,
  `UpSampleKernelAVXAntialias.h`).  On x86 CPUs with AVX2 torch runs the AVX2 kernel; without AVX2 (and
  for C > 4) it runs `separable_upsample_generic_Nd_kernel_impl` with `basic_loop_aa_{horizontal,
  vertical}<uint8_t>`: the same weights, order and rounding, so the same bytes (the tests check both
  paths with `ATEN_CPU_CAPABILITY=default`).  torch < 2.1 had no int16 path for antialias=False.
  Here each output line is one `cv2.addWeighted` with weights `k / 2**p` and offset `2**-(p+1)`: every
  product and sum is exact in float32 and OpenCV's round-half-even of `S/2**p + 2**-(p+1)` equals
  torch's `(S + 2**(p-1)) >> p`, so the result is bit-exact.
* "sam2-eval" (`eval.py` + `utils/dataset.py` `Resize(1024)`): PIL bilinear (antialiased) stretch of the
  uint8 image to 1024x1024, then normalise.

All four build the BEiT-3 view the same way: `ToTensor` -> `Resize((224, 224), BICUBIC, antialias=None)`
on the float tensor (torch bicubic, a = -0.75, half-pixel centres, clamped borders, no antialias) ->
`Normalize(0.5, 0.5)`.  (`eval.py`'s dataset writes `interpolation=3`, PIL's BICUBIC constant;
`inference.py` before 9d00853 omits `antialias`, which with upstream's pinned torchvision 0.15 also
means no antialias on tensors.)  SAM-2 recipes postprocess masks with one bilinear resize of the 256x256
logits straight to the original size.

decode: `cv2.imdecode(IMREAD_COLOR_RGB)`, the same pixels as upstream's `cv2.imread` + BGR->RGB (grey
and palette images to 3 channels, alpha dropped, 16-bit scaled to 8-bit, EXIF orientation applied),
behind size checks that reject oversized payloads and decompression bombs before decoding.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Dict, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from .recipes import CHECKPOINT_RECIPES, RECIPES, Recipe, RecipeLike, get_recipe  # noqa: F401 (re-exported)
from .specs import BEIT3_IMAGE_SIZE, LOW_RES_MASK_SIZE, SAM_IMAGE_SIZE

SAM_PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
SAM_PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
BEIT3_MEAN = 0.5
BEIT3_STD = 0.5
CUBIC_A = -0.75  # PyTorch's bicubic coefficient
TORCH_UINT8_MAX_PRECISION = 22  # torch tries weight precisions 0..21 for its int16 uint8 weights
FLOAT32_EXACT_PRECISION = 15  # 8 integer + 16 fractional bits fit float32's 24-bit significand
EXIF_ORIENTATION_TAG = 0x0112
EXIF_ROTATED_FORMATS = ("JPEG", "MPO", "PNG")  # formats whose EXIF orientation cv2.imdecode applies
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height

_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)

DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

Size = Tuple[int, int]


class InvalidImage(ValueError):
    """The bytes are not an image this service accepts; the message is safe to show a client."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


# ----------------------------------------------------------------------------------------------------
# Decoding.

def checked_image_size(data: bytes, limits: ImageLimits = ImageLimits()) -> Size:
    """(H, W) as `decode_image` will return them, after the checks that precede any decoding (empty,
    too many bytes, too many pixels: decompression bombs are refused from the header)."""
    if len(data) == 0:
        raise InvalidImage("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidImage(f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    width, height = image_header_size(data)
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} pixels"
        )
    return height, width


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 [H, W, 3], as upstream's `cv2.imread` + `cvtColor`."""
    checked_image_size(data, limits)
    if _IMREAD_RGB is None:  # OpenCV < 4.10: decode to BGR, swap like upstream
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        rgb = None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    else:  # the same decoder and conversions, channels written in RGB order (one pass less)
        rgb = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _IMREAD_RGB)
    if rgb is None or rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InvalidImage("image could not be decoded (corrupt or truncated file?)")
    return rgb


def image_header_size(data: bytes) -> Size:
    """(width, height) as `decode_image` will return them, read from the header alone (no pixel decoded).

    OpenCV applies an EXIF orientation of 5-8 (a transpose) in JPEG and PNG files, so those sizes are
    swapped; PIL already reports TIFFs oriented, and OpenCV leaves WebP unrotated.  The product is the
    pixel count either way.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if img.format in EXIF_ROTATED_FORMATS and _exif_orientation(img) in TRANSPOSING_ORIENTATIONS:
                return height, width
            return width, height
    except Image.DecompressionBombError as exc:
        raise InvalidImage("image dimensions are too large (decompression bomb)") from exc
    except Exception as exc:
        raise InvalidImage("data is not a recognised image format (JPEG, PNG, WebP, BMP, TIFF, ...)") from exc


def _exif_orientation(img: Image.Image) -> int:
    """The orientation tag of EXIF metadata PIL read at open (never loads pixels: PNG's eXIf after the
    image data is not seen, and OpenCV does not apply that one either)."""
    raw = img.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return int(exif.get(EXIF_ORIENTATION_TAG, 1))


# ----------------------------------------------------------------------------------------------------
# SAM view.

def resized_shape(height: int, width: int, long_side: int = SAM_IMAGE_SIZE) -> Size:
    """`ResizeLongestSide.get_preprocess_shape`."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_view(rgb: np.ndarray, recipe: RecipeLike = "ori") -> Tuple[np.ndarray, Size]:
    """RGB uint8 [H,W,3] -> float32 [3,1024,1024] and the (h, w) the image covers in it.

    "ori" pads, so (h, w) is `resized_shape(H, W)`; the SAM-2 recipes stretch, so it is (1024, 1024).
    """
    _check_rgb(rgb)
    return _SAM_VIEWS[get_recipe(recipe).sam_view](rgb)


def _longest_side_pad(rgb: np.ndarray) -> Tuple[np.ndarray, Size]:
    h, w = _longest_side_shape(rgb)
    out = np.zeros((3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), dtype=np.float32)
    _normalise_into(out[:, :h, :w], _pil_bilinear(rgb, h, w))
    return out, (h, w)


def _longest_side_stretch(rgb: np.ndarray) -> Tuple[np.ndarray, Size]:
    h, w = _longest_side_shape(rgb)
    planes = np.empty((3, h, w), dtype=np.float32)
    _normalise_into(planes, _pil_bilinear(rgb, h, w))
    out = np.empty((3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), dtype=np.float32)
    for plane, target in zip(planes, out):
        # One axis is already 1024 (weights exactly 1, 0); the other is upsampled at positions
        # (2i+1)h/2048 - 1/2, exact in float32 for torch and OpenCV alike, with clamped borders.
        _into(target, cv2.resize(plane, (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), dst=target,
                                 interpolation=cv2.INTER_LINEAR))
    return out, (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE)


def _longest_side_shape(rgb: np.ndarray) -> Size:
    h, w = resized_shape(*rgb.shape[:2])
    if h == 0 or w == 0:  # upstream fails here too (PIL cannot resize to zero pixels)
        raise InvalidImage(f"image is {rgb.shape[1]}x{rgb.shape[0]}: too elongated to resize its longest side to "
                           f"{SAM_IMAGE_SIZE} (the short side would be 0 pixels; at most 2048:1)")
    return h, w


def _uint8_stretch(rgb: np.ndarray) -> Tuple[np.ndarray, Size]:
    out = np.empty((3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), dtype=np.float32)
    _normalise_into(out, torch_uint8_bilinear(rgb, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE))
    return out, (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE)


def _pil_stretch(rgb: np.ndarray) -> Tuple[np.ndarray, Size]:
    out = np.empty((3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), dtype=np.float32)
    _normalise_into(out, _pil_bilinear(rgb, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE))
    return out, (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE)


_SAM_VIEWS = {"longest-side-pad": _longest_side_pad, "longest-side-stretch": _longest_side_stretch,
              "uint8-stretch": _uint8_stretch, "pil-stretch": _pil_stretch}

# torch's `(uint8 tensor - mean) / std` for every byte value: the same float32 operations, tabulated.
_SAM_NORMALISED = (np.arange(256, dtype=np.float32)[None, :] - SAM_PIXEL_MEAN[:, None]) / SAM_PIXEL_STD[:, None]


def _normalise_into(out_chw: np.ndarray, rgb: np.ndarray) -> None:
    """out[c] = (rgb[..., c] - mean[c]) / std[c] as float32, written into a [3, h, w] view."""
    for channel, (plane, table) in enumerate(zip(cv2.split(rgb), _SAM_NORMALISED)):
        _into(out_chw[channel], cv2.LUT(plane, table, dst=out_chw[channel]))


def _into(target: np.ndarray, result: np.ndarray) -> None:
    """OpenCV writes into `dst` views it can use as they are; copy in the rare case it allocated instead."""
    if result is not target:
        target[...] = result


def _pil_bilinear(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision `resize(to_pil_image(rgb), (height, width))` = PIL's antialiased bilinear."""
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected an RGB uint8 array [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")


# ----------------------------------------------------------------------------------------------------
# torch's uint8 bilinear (antialias=False, align_corners=False), bit-exact.

@dataclass(frozen=True)
class FixedPointTaps:
    """Per output index: first input index, number of taps (1 or 2), int16 weights, and their precision."""

    first: np.ndarray  # int64 [n_out]
    count: np.ndarray  # int64 [n_out]
    weights: np.ndarray  # int64 [n_out, 2] (the int16 values)
    precision: int


def torch_uint8_linear_taps(in_size: int, out_size: int) -> FixedPointTaps:
    """`HelperInterpLinear::compute_index_ranges_int16_weights(antialias=False)`, in float64 like torch."""
    real = (in_size / out_size) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5
    real = np.where(real < 0, 0.0, real)
    first = np.minimum(np.floor(real.astype(np.float32)).astype(np.int64), in_size - 1)  # floorf() of a double
    lam = np.minimum(np.maximum(real - first, 0.0), 1.0)
    count = np.minimum(first + 2, in_size) - first
    near, far = _triangle(-lam), _triangle(1.0 - lam)
    weights = np.stack([np.where(count == 2, near, near + far), np.where(count == 2, far, 0.0)], axis=1)
    precision = _int16_precision(float(weights.max()))
    return FixedPointTaps(first, count, np.floor(0.5 + weights * (1 << precision)).astype(np.int64), precision)


def _triangle(x: np.ndarray) -> np.ndarray:
    """torch's `HelperInterpLinear::aa_filter`: 1 - |x| for |x| < 1, else 0 (same float64 operations)."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _int16_precision(max_weight: float) -> int:
    precision = 0
    while precision < TORCH_UINT8_MAX_PRECISION:
        if int(0.5 + max_weight * (1 << (precision + 1))) >= 1 << 15:
            break
        precision += 1
    return precision


def torch_uint8_bilinear(rgb: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """`F.interpolate(uint8 CHW, (out_height, out_width), mode="bilinear", align_corners=False)` as HWC."""
    height, width = rgb.shape[:2]
    out = rgb
    if width != out_width:  # torch's horizontal pass, run on the transposed image so lines are rows
        lines = cv2.transpose(np.ascontiguousarray(rgb))
        resampled = _resample_lines(lines.reshape(width, -1), torch_uint8_linear_taps(width, out_width))
        out = cv2.transpose(resampled.reshape(out_width, height, 3))
    if height != out_height:
        resampled = _resample_lines(np.ascontiguousarray(out).reshape(height, -1),
                                    torch_uint8_linear_taps(height, out_height))
        out = resampled.reshape(out_height, out_width, 3)
    return np.ascontiguousarray(out) if out is not rgb else rgb.copy()


def _resample_lines(lines: np.ndarray, taps: FixedPointTaps) -> np.ndarray:
    """out[j] = clamp((k0 * lines[first] + k1 * lines[first + 1] + 2**(p-1)) >> p, 0, 255), exactly.

    Two weights summing to ~2**p give p <= 15, so every product, sum and the 2**-(p+1) offset is a
    multiple of 2**-(p+1) below 256: at most 24 significant bits, exact in OpenCV's float32 arithmetic.
    """
    if taps.precision > FLOAT32_EXACT_PRECISION:
        raise ValueError(f"weight precision {taps.precision} > {FLOAT32_EXACT_PRECISION}: float32 sums would round")
    out = np.empty((len(taps.first), lines.shape[1]), dtype=np.uint8)
    unit = 2.0 ** -taps.precision
    half = 2.0 ** -(taps.precision + 1)
    second = np.minimum(taps.first + 1, len(lines) - 1)
    rows = zip(taps.first.tolist(), second.tolist(), (taps.weights * unit).tolist())
    for j, (a, b, (k0, k1)) in enumerate(rows):
        _into(out[j], cv2.addWeighted(lines[a], k0, lines[b], k1, half, dst=out[j]))
    return out


# ----------------------------------------------------------------------------------------------------
# BEiT-3 view.

def beit3_view(rgb: np.ndarray, size: int = BEIT3_IMAGE_SIZE, *, recipe: RecipeLike = "ori") -> np.ndarray:
    """RGB uint8 [H,W,3] -> float32 [3,224,224] (every recipe: torch bicubic without antialias)."""
    _check_rgb(rgb)
    get_recipe(recipe)  # all recipes share the view; a bad name is still an error
    resized = _bicubic(rgb, size) / np.float32(255)
    return (resized - np.float32(BEIT3_MEAN)) / np.float32(BEIT3_STD)


def cubic_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """torch's float32 bicubic indices (clamped) and weights [out, 4] (`HelperInterpCubic`)."""
    real = _source_index(in_size, out_size)
    base = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    t = np.minimum(np.maximum(real - base.astype(np.float32), np.float32(0)), np.float32(1))
    one = np.float32(1)
    weights = np.stack([_cubic_far(t + one), _cubic_near(t), _cubic_near(one - t), _cubic_far(one - t + one)], 1)
    indices = np.clip(base[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return indices, weights


def _source_index(in_size: int, out_size: int) -> np.ndarray:
    """float32 `scale * (i + 0.5) - 0.5` with `scale = float(in) / out`, as torch's AVX2 float kernels
    evaluate it: one fused multiply-add (float64 holds the product exactly, so one rounding to float32)."""
    scale = np.float32(in_size) / np.float32(out_size)
    centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    return (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32)


def _cubic_near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
    a = np.float32(CUBIC_A)
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
    a = np.float32(CUBIC_A)
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def _bicubic(rgb: np.ndarray, size: int) -> np.ndarray:
    """[3, size, size] float32 bicubic of the byte values: gather the 4x4 taps, then x then y, as torch."""
    rows, row_weights = cubic_taps(rgb.shape[0], size)
    cols, col_weights = cubic_taps(rgb.shape[1], size)
    picked_rows = rgb[rows.ravel()]  # [(y, i), W, 3]
    taps = cv2.transpose(picked_rows)[cols.ravel()].astype(np.float32)  # [(x, j), (y, i), 3]
    across_x = np.matmul(col_weights[:, None, :], taps.reshape(size, 4, -1)).reshape(size, -1)  # [x, (y, i, c)]
    by_row = cv2.transpose(across_x).reshape(size, 4, -1)  # [y, i, (c, x)]
    return np.matmul(row_weights[:, None, :], by_row).reshape(size, 3, size).transpose(1, 0, 2)


# ----------------------------------------------------------------------------------------------------
# Masks: 256x256 decoder logits -> the original image size.

@dataclass(frozen=True)
class AxisTaps:
    """A 1-D resampling as base index + K non-negative weights for base, base + 1, ... (float32)."""

    base: np.ndarray  # int64 [n_out], non-decreasing
    weights: np.ndarray  # float32 [n_out, K]


def linear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's float32 bilinear (align_corners=False) indices and weights: (i0, i1, w0, w1)."""
    real = np.maximum(_source_index(in_size, out_size), np.float32(0))
    i0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    lam = np.minimum(np.maximum(real - i0.astype(np.float32), np.float32(0)), np.float32(1))
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, np.float32(1) - lam, lam


def _direct_axis(out_size: int) -> AxisTaps:
    i0, i1, w0, w1 = linear_taps(LOW_RES_MASK_SIZE, out_size)
    same = i1 == i0
    weights = np.stack([np.where(same, w0 + w1, w0), np.where(same, np.float32(0), w1)], axis=1)
    return AxisTaps(i0, weights.astype(np.float32))


def _cropped_axis(resized: int, out_size: int) -> AxisTaps:
    """256 -> 1024, keep the first `resized`, -> out_size: composed into <= 3 taps per output (float64)."""
    a0, a1, u0, u1 = (v[:resized] for v in linear_taps(LOW_RES_MASK_SIZE, SAM_IMAGE_SIZE))
    b0, b1, v0, v1 = linear_taps(resized, out_size)
    base = a0[b0]
    weights = np.zeros((out_size, 3), dtype=np.float64)
    rows = np.arange(out_size)
    for index, weight in ((a0[b0], v0 * u0[b0]), (a1[b0], v0 * u1[b0]), (a0[b1], v1 * u0[b1]), (a1[b1], v1 * u1[b1])):
        np.add.at(weights, (rows, index - base), weight.astype(np.float64))
    return AxisTaps(base, weights.astype(np.float32))


class MaskResizer:
    """Decoder logits [256, 256] -> masks at one original size, for one recipe (taps computed once).

    Each output pixel is a non-negative combination of at most 3x3 low-res logits, and runs of output
    rows (columns) read the same low-res rows (columns).  `binary` therefore classifies each block of
    (row run x column run) from the signs of the low-res logits it reads: all positive -> True, none ->
    False, and computes the logits only inside the blocks where they disagree (along the boundary).
    Results equal `logits(...) > 0` except where the logit is zero up to float32 rounding.
    """

    DENSE_SHARE = 1 / 4  # computing every logit is cheaper once the boundary blocks cover this share
    DENSE_VALUES_PER_STRIP = 1 << 20  # logits the all-logits path holds at once

    def __init__(self, resized_hw: Size, original_hw: Size, recipe: RecipeLike = "ori"):
        self.recipe = get_recipe(recipe)
        self.original_hw = _check_size("original_hw", original_hw)
        if self.recipe.mask_postprocess == "crop":
            resized_hw = _check_size("resized_hw", resized_hw, SAM_IMAGE_SIZE)
            self.rows = _cropped_axis(resized_hw[0], self.original_hw[0])
            self.cols = _cropped_axis(resized_hw[1], self.original_hw[1])
        else:  # "direct": the resized size plays no part
            self.rows = _direct_axis(self.original_hw[0])
            self.cols = _direct_axis(self.original_hw[1])
        self._row_runs = _runs(self.rows)
        self._col_runs = _runs(self.cols)

    def logits(self, low_res: np.ndarray) -> np.ndarray:
        """float32 [H, W] logits at the original size (columns, then rows)."""
        across = _resample_axis(_check_low_res(low_res), self.cols, axis=1)
        return _resample_axis(across, self.rows, axis=0)

    def binary(self, low_res: np.ndarray, out: np.ndarray = None) -> np.ndarray:
        """bool [H, W]: upstream's `logits > 0` (written into `out` when given)."""
        low_res = _check_low_res(low_res)
        if out is None:
            out = np.empty(self.original_hw, dtype=bool)
        rows, cols = self._row_runs, self._col_runs
        positives = _count_in_runs(_count_in_runs(low_res > 0, cols, axis=1), rows, axis=0)  # [row runs, col runs]
        weighted = rows.taps[:, None] * cols.taps[None, :]
        by_column = np.take(positives == weighted, cols.of_index, axis=1)
        np.take(by_column, rows.of_index, axis=0, out=out, mode="clip")
        mixed_row_run, mixed_col_run = np.nonzero((positives > 0) & (positives < weighted))
        if (rows.length[mixed_row_run] * cols.length[mixed_col_run]).sum() > self.DENSE_SHARE * out.size:
            self._dense_signs(low_res, out)  # noise-like logits: computing them all is cheaper
        elif len(mixed_row_run):
            self._resolve(low_res, out, mixed_row_run, mixed_col_run)
        return out

    def _dense_signs(self, low_res: np.ndarray, out: np.ndarray) -> None:
        across = _resample_axis(low_res, self.cols, axis=1)
        strip = max(1, self.DENSE_VALUES_PER_STRIP // self.original_hw[1])
        for top in range(0, self.original_hw[0], strip):
            rows = AxisTaps(self.rows.base[top:top + strip], self.rows.weights[top:top + strip])
            np.greater(_resample_axis(across, rows, axis=0), 0, out=out[top:top + strip])

    def _resolve(self, low_res: np.ndarray, out: np.ndarray, row_run: np.ndarray, col_run: np.ndarray) -> None:
        """Logits of every pixel in the given (row run, column run) blocks, sorted by row run; signs to `out`."""
        rows, cols = self._row_runs, self._col_runs
        widths = cols.length[col_run]
        xs = np.repeat(cols.start[col_run], widths) + np.arange(widths.sum()) - np.repeat(np.cumsum(widths) - widths, widths)
        run_of_x = np.repeat(row_run, widths)
        taps_y, taps_x = self.rows.weights.shape[1], self.cols.weights.shape[1]
        padded = np.pad(low_res, ((0, taps_y), (0, taps_x)), mode="edge")  # taps past the edge weigh 0
        corner = rows.base[run_of_x] * padded.shape[1] + self.cols.base[xs]
        col_weights = self.cols.weights[xs]
        across = np.zeros((taps_y, len(xs)), dtype=np.float32)  # each column resampled, per row it reads
        for k in range(taps_y):
            for l in range(taps_x):
                across[k] += padded.ravel()[corner + (k * padded.shape[1] + l)] * col_weights[:, l]
        run_edges = np.flatnonzero(np.r_[True, run_of_x[1:] != run_of_x[:-1], True]).tolist()
        span_edges = np.flatnonzero(np.r_[True, (run_of_x[1:] != run_of_x[:-1]) | (xs[1:] != xs[:-1] + 1), True]).tolist()
        spans = iter(zip(span_edges[:-1], span_edges[1:]))
        for first, last in zip(run_edges[:-1], run_edges[1:]):  # one matmul per row run ...
            top = int(rows.start[run_of_x[first]])
            bottom = top + int(rows.length[run_of_x[first]])
            signs = self.rows.weights[top:bottom] @ across[:, first:last] > 0
            for start, end in spans:  # ... written as contiguous column spans (slices, not fancy indexing)
                x0 = int(xs[start])
                out[top:bottom, x0:x0 + end - start] = signs[:, start - first:end - first]
                if end == last:
                    break


@dataclass(frozen=True)
class _Runs:
    """Runs of consecutive output indices that read from the same first low-res index."""

    start: np.ndarray  # first output index of each run
    length: np.ndarray
    base: np.ndarray  # first low-res index the run reads
    used: np.ndarray  # bool [runs, K]: which of base, base + 1, ... carry weight
    taps: np.ndarray  # uint8 [runs]: how many low-res indices each run reads
    of_index: np.ndarray  # run of each output index


def _runs(taps: AxisTaps) -> _Runs:
    """Runs share a base index; a run uses every offset that any of its members weights (so blocks are
    classified from a superset of their inputs: never wrong, sometimes computed when not needed)."""
    start = np.flatnonzero(np.r_[True, taps.base[1:] != taps.base[:-1]])
    length = np.diff(np.r_[start, len(taps.base)])
    used = np.logical_or.reduceat(taps.weights > 0, start, axis=0)
    return _Runs(start, length, taps.base[start], used, used.sum(1, dtype=np.uint8),
                 np.repeat(np.arange(len(start)), length))


def _count_in_runs(flags: np.ndarray, runs: _Runs, axis: int) -> np.ndarray:
    """uint8 counts along `axis`: for each run, how many of the low-res indices it weights are set."""
    count = None
    for k, used in enumerate(runs.used.T):
        index = np.minimum(runs.base + k, flags.shape[axis] - 1)
        picked = np.take(flags, index, axis=axis).astype(np.uint8)
        picked *= used[:, None] if axis == 0 else used[None, :]
        count = picked if count is None else count + picked
    return count


def _resample_axis(values: np.ndarray, taps: AxisTaps, axis: int) -> np.ndarray:
    """float32 sum_k w_k * values[base + k] along `axis` (0 or 1) of a 2-D array."""
    out = None
    for k, weight in enumerate(taps.weights.T):
        picked = np.take(values, np.minimum(taps.base + k, values.shape[axis] - 1), axis=axis)
        picked *= weight[:, None] if axis == 0 else weight[None, :]
        out = picked if out is None else np.add(out, picked, out=out)
    return out


def _check_low_res(low_res: np.ndarray) -> np.ndarray:
    if low_res.shape != (LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE):
        raise ValueError(f"expected low-res logits [{LOW_RES_MASK_SIZE}, {LOW_RES_MASK_SIZE}], got {list(low_res.shape)}")
    return np.asarray(low_res, dtype=np.float32)


def _check_size(name: str, hw, limit: int = None) -> Size:
    try:
        height, width = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {hw!r}") from None
    if height < 1 or width < 1 or (limit is not None and (height > limit or width > limit)):
        raise ValueError(f"{name} must be positive{'' if limit is None else f' and at most {limit}'}, got {hw!r}")
    return height, width


def _as_stack(low_res: np.ndarray) -> np.ndarray:
    low_res = np.asarray(low_res)
    if low_res.ndim == 4 and low_res.shape[1] == 1:
        low_res = low_res[:, 0]
    if low_res.ndim == 2:
        low_res = low_res[None]
    if low_res.ndim != 3:
        raise ValueError(f"expected low-res logits [N, 256, 256] or [N, 1, 256, 256], got {list(low_res.shape)}")
    return low_res


def masks_to_original(low_res: np.ndarray, resized_hw: Size, original_hw: Size,
                      recipe: RecipeLike = "ori") -> np.ndarray:
    """[N,256,256] or [N,1,256,256] decoder logits -> bool [N, H, W] masks (upstream's `> 0`)."""
    stack = _as_stack(low_res)
    resizer = MaskResizer(resized_hw, original_hw, recipe)
    out = np.empty((len(stack),) + resizer.original_hw, dtype=bool)
    for mask, target in zip(stack, out):
        resizer.binary(mask, out=target)
    return out


def mask_logits_to_original(low_res: np.ndarray, resized_hw: Size, original_hw: Size,
                            recipe: RecipeLike = "ori") -> np.ndarray:
    """[N,256,256] or [N,1,256,256] decoder logits -> float32 [N, H, W] logits."""
    stack = _as_stack(low_res)
    resizer = MaskResizer(resized_hw, original_hw, recipe)
    return np.stack([resizer.logits(mask) for mask in stack])


def mask_logits(low_res: np.ndarray, resized: Size, original: Size, recipe: RecipeLike = "ori") -> np.ndarray:
    """[256,256] decoder logits -> float32 [H,W] logits at the original image size."""
    return MaskResizer(resized, original, recipe).logits(low_res)


def binary_mask(low_res: np.ndarray, resized: Size, original: Size, recipe: RecipeLike = "ori") -> np.ndarray:
    """uint8 0/1 [H,W]: upstream's `pred_mask > 0`."""
    return MaskResizer(resized, original, recipe).binary(low_res).view(np.uint8)
