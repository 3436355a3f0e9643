"""Segment one image with one or more text prompts on the served EVF-SAM model.

    python -m clients.segment --url 127.0.0.1:8001 --protocol grpc --image bus.jpg \\
        --prompt "the red bus" --prompt "the wheel" --output-dir out/

For each prompt i it writes `<stem>_<i>_mask.png` (0/255), `<stem>_<i>_overlay.png` (the mask
blended over the image as upstream's `inference.py` draws it) and, for all prompts, `<stem>.json`
with each prompt's score and COCO RLE.  Failures print one line `error: <reason>` on stderr and
exit with the code of `clients.errors` (2 input, 3 unreachable, 4 timeout, 5 contract, 6 server,
7 output).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from .client import DEFAULT_CONCURRENCY, SegmentationClient
from .contract import DEFAULT_SPEC, Segmentation, spec_for_model
from .errors import ClientError, ContractMismatch, OutputError
from .images import decode_rgb, encode_image, write_png
from .masks import overlay, rle_encode, viewable
from .transport import DEFAULT_TIMEOUT_S, PROTOCOLS

INTERRUPTED_EXIT_CODE = 130


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clients.segment", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="host:port of the server's gRPC or HTTP endpoint")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    parser.add_argument("--image", required=True, help="image file (JPEG, PNG, ...)")
    parser.add_argument("--prompt", required=True, action="append", help="text prompt; repeat for several")
    parser.add_argument("--output-dir", default="segment_output", help="where the PNGs and the JSON go")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests in flight")
    parser.add_argument("--model", default=DEFAULT_SPEC.name, help="served model name (its contract is EVF_SAM's)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    image = encode_image(args.image)
    spec = spec_for_model(args.model)
    with SegmentationClient(args.url, args.protocol, args.timeout, args.concurrency, spec) as client:
        results = client.segment_prompts(image, args.prompt)
    rgb = decode_rgb(image)
    for result in results:
        _check_size(result, rgb)
    return write_outputs(args.output_dir, _stem(args.image), args.image, rgb, results)


def write_outputs(
    output_dir: str, stem: str, image_path: str, rgb: np.ndarray, results: Sequence[Segmentation]
) -> List[Dict[str, object]]:
    """The PNGs of every result and the JSON summary; returns the JSON's per-prompt records."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        records = [_write_one(output_dir, stem, index, rgb, result) for index, result in enumerate(results)]
        summary = {"image": image_path, "height": rgb.shape[0], "width": rgb.shape[1], "results": records}
        with open(os.path.join(output_dir, f"{stem}.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, ensure_ascii=False)
    except OSError as exc:
        raise OutputError(f"cannot write results to {output_dir}: {exc.strerror or exc}") from None
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        records = run(args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    for record in records:
        print(_summary_line(record))
    print(f"wrote {os.path.join(args.output_dir, _stem(args.image) + '.json')}")
    return 0


def _write_one(output_dir: str, stem: str, index: int, rgb: np.ndarray, result: Segmentation) -> Dict[str, object]:
    mask_path = os.path.join(output_dir, f"{stem}_{index}_mask.png")
    overlay_path = os.path.join(output_dir, f"{stem}_{index}_overlay.png")
    write_png(mask_path, viewable(result.mask))
    write_png(overlay_path, overlay(rgb, result.mask))
    return {
        "prompt": result.prompt,
        "score": result.score,
        "area": result.area,
        "rle": rle_encode(result.mask),
        "mask_png": mask_path,
        "overlay_png": overlay_path,
    }


def _check_size(result: Segmentation, rgb: np.ndarray) -> None:
    if result.mask.shape != rgb.shape[:2]:
        height, width = result.mask.shape
        raise ContractMismatch(
            f"the server returned a {width}x{height} mask for a {rgb.shape[1]}x{rgb.shape[0]} image"
        )


def _summary_line(record: Dict[str, object]) -> str:
    height, width = record["rle"]["size"]  # type: ignore[index]
    fraction = 100.0 * int(record["area"]) / max(1, height * width)  # type: ignore[call-overload]
    return (
        f"{record['prompt']!r}: score {record['score']:.3f}, {fraction:.1f}% of the image"
        f" -> {record['mask_png']}, {record['overlay_png']}"
    )


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0] or "image"


if __name__ == "__main__":
    sys.exit(main())
