"""Segment one image with one or more text prompts on the served EVF-SAM model.

    python -m clients.segment --url 127.0.0.1:8001 --protocol grpc --image bus.jpg \\
        --prompt "the red bus" --prompt "the wheel" --output-dir out/

All the prompts go in one request to the many-prompts model (`evf_sam_prompts`) when the server
serves it, else one request each to `evf_sam`.  For each prompt i it writes `<stem>_<i>_mask.png`
(0/255), `<stem>_<i>_overlay.png` (the mask blended over the image as upstream's `inference.py` draws
it) and, for all prompts, `<stem>.json` with each prompt's score and COCO RLE, and the `image_key`
under which the server caches the image (null without the many-prompts model).  `--image-key KEY`
instead of `--image` reuses that cached image without sending it again: then there is no overlay,
and the stem is the key's start.  Failures print one line `error: <reason>` on stderr and exit with
the code of `clients.errors` (2 input, 3 unreachable, 4 timeout, 5 contract, 6 server, including an
image key the server no longer holds, 7 output).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from evfsam.specs import MASK_FORMATS, RAW_MASKS, RLE_MASKS

from .client import DEFAULT_CONCURRENCY, SegmentationClient
from .contract import DEFAULT_PROMPTS_SPEC, DEFAULT_SPEC, Segmentation, spec_for_model
from .errors import ClientError, ContractMismatch, OutputError
from .images import decode_rgb, encode_image, write_png
from .masks import overlay, rle_encode, viewable
from .transport import DEFAULT_TIMEOUT_S, PROTOCOLS

INTERRUPTED_EXIT_CODE = 130
KEY_STEM_CHARS = 16  # output files of an --image-key run are named after the key's start


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clients.segment", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="host:port of the server's gRPC or HTTP endpoint")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="image file (JPEG, PNG, ...)")
    source.add_argument("--image-key", help="the image_key of an image sent before, instead of --image")
    parser.add_argument("--prompt", required=True, action="append", help="text prompt; repeat for several")
    parser.add_argument("--output-dir", default="segment_output", help="where the PNGs and the JSON go")
    parser.add_argument("--mask-format", choices=MASK_FORMATS, default=RAW_MASKS,
                        help="how the many-prompts model sends masks back: raw arrays, or compact COCO RLE / PNG "
                             "(for big images and many prompts)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests in flight")
    parser.add_argument("--model", default=DEFAULT_SPEC.name, help="served model name (its contract is EVF_SAM's)")
    parser.add_argument(
        "--prompts-model",
        default=DEFAULT_PROMPTS_SPEC.name,
        help="served many-prompts model (EVF_SAM_PROMPTS' contract), used when served; '' for one request per prompt",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Segment, write the PNGs and the JSON; returns the JSON summary."""
    image = encode_image(args.image) if args.image is not None else None
    spec = spec_for_model(args.model)
    prompts_spec = spec_for_model(args.prompts_model, DEFAULT_PROMPTS_SPEC) if args.prompts_model else None
    with SegmentationClient(args.url, args.protocol, args.timeout, args.concurrency, spec, prompts_spec) as client:
        results = client.segment_prompts(image, args.prompt, image_key=args.image_key, mask_format=args.mask_format)
    if image is None:
        return write_outputs(args.output_dir, _output_stem(args), None, None, results)
    rgb = decode_rgb(image)
    for result in results:
        _check_size(result, rgb.shape[:2])
    return write_outputs(args.output_dir, _output_stem(args), args.image, rgb, results)


def write_outputs(
    output_dir: str, stem: str, image_path: Optional[str], rgb: Optional[np.ndarray], results: Sequence[Segmentation]
) -> Dict[str, Any]:
    """The PNGs of every result and the JSON summary (per-prompt records under "results"); returns
    the summary.

    Without the image's pixels (`rgb` None: the image was given by its key) there are no overlays.
    """
    if rgb is not None:
        height, width = rgb.shape[:2]
    else:
        height, width = results[0].mask.shape if results else (0, 0)
        for result in results:
            _check_size(result, (height, width))
    try:
        os.makedirs(output_dir, exist_ok=True)
        records = [_write_one(output_dir, stem, index, rgb, result) for index, result in enumerate(results)]
        summary = {
            "image": image_path,
            "image_key": results[0].image_key if results else None,
            "height": height,
            "width": width,
            "results": records,
        }
        with open(os.path.join(output_dir, f"{stem}.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, ensure_ascii=False)
    except OSError as exc:
        raise OutputError(f"cannot write results to {output_dir}: {exc.strerror or exc}") from None
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    for record in summary["results"]:
        print(_summary_line(record))
    if summary["image_key"] is not None:
        print(f"image_key {summary['image_key']}")
    print(f"wrote {os.path.join(args.output_dir, _output_stem(args) + '.json')}")
    return 0


def _write_one(
    output_dir: str, stem: str, index: int, rgb: Optional[np.ndarray], result: Segmentation
) -> Dict[str, object]:
    mask_path = os.path.join(output_dir, f"{stem}_{index}_mask.png")
    write_png(mask_path, viewable(result.mask))
    overlay_path = None
    if rgb is not None:
        overlay_path = os.path.join(output_dir, f"{stem}_{index}_overlay.png")
        write_png(overlay_path, overlay(rgb, result.mask))
    return {
        "prompt": result.prompt,
        "score": result.score,
        "area": result.area,
        "rle": _rle(result),
        "cache_hit": result.cache_hit,
        "mask_png": mask_path,
        "overlay_png": overlay_path,
    }


def _rle(result: Segmentation) -> Dict[str, object]:
    """The server's own RLE when it sent one, else the mask encoded here (the same COCO format)."""
    if result.mask_format == RLE_MASKS and result.encoded_mask is not None:
        return json.loads(result.encoded_mask)
    return rle_encode(result.mask)


def _check_size(result: Segmentation, size: Tuple[int, int]) -> None:
    """Every mask must have the image's size (with an image key: the first mask's)."""
    if result.mask.shape != tuple(size):
        height, width = result.mask.shape
        raise ContractMismatch(f"the server returned a {width}x{height} mask for a {size[1]}x{size[0]} image")


def _summary_line(record: Dict[str, object]) -> str:
    height, width = record["rle"]["size"]  # type: ignore[index]
    fraction = 100.0 * int(record["area"]) / max(1, height * width)  # type: ignore[call-overload]
    written = ", ".join(str(record[key]) for key in ("mask_png", "overlay_png") if record[key] is not None)
    return f"{record['prompt']!r}: score {record['score']:.3f}, {fraction:.1f}% of the image -> {written}"


def _output_stem(args: argparse.Namespace) -> str:
    """The image file's name without its extension, or the start of the image key."""
    if args.image is not None:
        return os.path.splitext(os.path.basename(args.image))[0] or "image"
    return "".join(c for c in args.image_key[:KEY_STEM_CHARS] if c.isalnum()) or "image"


if __name__ == "__main__":
    sys.exit(main())
