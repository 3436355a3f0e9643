"""The benchmark's inputs: real encoded image files and referring-expression prompts.

Every deployment is measured on the same (image bytes, prompt) pairs.  By default the images are
the shipped photo `assets/sample.jpg` as it is, re-encoded larger (a phone-sized JPEG: decode and
resize cost more) and as a square PNG crop (another format and aspect ratio); `--images` replaces them.
"""
from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Sequence

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_IMAGE = REPO_ROOT / "assets" / "sample.jpg"
PROMPTS = ("zebra top left", "the red ball on the grass", "yellow sun in the sky", "the table")


@dataclass(frozen=True)
class Sample:
    name: str
    image: bytes  # the encoded file, as a client sends it
    prompt: str

    def describe(self) -> Dict[str, object]:
        with Image.open(io.BytesIO(self.image)) as img:
            width, height, fmt = img.width, img.height, img.format
        return {"name": self.name, "format": fmt, "width": width, "height": height, "bytes": len(self.image),
                "sha256": hashlib.sha256(self.image).hexdigest()[:16], "prompt": self.prompt}


def derived_images(source: Path, out_dir: Path) -> List[Path]:
    """The source file plus two re-encodings of it (see the module docstring), written to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as img:
        rgb = img.convert("RGB")
    large = rgb.resize((rgb.width * 3, rgb.height * 3), Image.BICUBIC)
    side = min(rgb.size)
    square = rgb.crop((rgb.width - side, 0, rgb.width, side))
    paths = [out_dir / f"{source.stem}_x3.jpg", out_dir / f"{source.stem}_square.png"]
    large.save(paths[0], "JPEG", quality=90)
    square.save(paths[1], "PNG")
    return [source, *paths]


def load_samples(images: Sequence[Path], prompts: Sequence[str] = PROMPTS) -> List[Sample]:
    """One sample per (image, prompt) pair, images cycled against prompts: max(len) samples."""
    count = max(len(images), len(prompts))
    data = [Path(p).read_bytes() for p in images]
    return [
        Sample(name=f"{Path(images[i % len(images)]).name}|{prompts[i % len(prompts)]}",
               image=data[i % len(images)], prompt=prompts[i % len(prompts)])
        for i in range(count)
    ]


JPEG_SOI, JPEG_COMMENT = b"\xff\xd8", b"\xff\xfe"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IHDR_END = len(PNG_SIGNATURE) + 4 + 4 + 13 + 4  # length, type, IHDR data, CRC


def tagged(image: bytes, tag: bytes) -> bytes:
    """The same encoded image with `tag` in a metadata segment (a JPEG comment, a PNG tEXt chunk): the
    same pixels once decoded, other bytes, so another image_key (the cache cannot recognise it)."""
    if image.startswith(JPEG_SOI):
        return JPEG_SOI + JPEG_COMMENT + struct.pack(">H", len(tag) + 2) + tag + image[len(JPEG_SOI):]
    if image.startswith(PNG_SIGNATURE):
        body = b"tEXt" + b"Comment\x00" + tag
        chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        return image[:PNG_IHDR_END] + chunk + image[PNG_IHDR_END:]
    raise ValueError("only JPEG and PNG samples can be tagged")


def distinct_images(samples: Sequence[Sample], copies: int) -> List[Sample]:
    """`copies` passes over `samples`, every sample's image tagged with its own number: no two requests
    of a perf_analyzer run carry the same bytes, so concurrent requests never share one image's encoder
    run (the cache's claims would let the second wait for the first)."""
    count = copies * len(samples)
    return [replace(samples[i % len(samples)], name=f"{samples[i % len(samples)].name}#{i}",
                    image=tagged(samples[i % len(samples)].image, f"evf-sam benchmark {i}".encode()))
            for i in range(count)]
