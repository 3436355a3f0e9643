"""The random-weight checkpoints, their ONNX exports and the model repositories the scenarios serve."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Tuple

from serving.repository import RepositoryOptions, write_repository

CHECKPOINT_DONE = "sentencepiece.bpe.model"  # written last by export.tiny_checkpoint
ONNX_DONE = "manifest.json"  # written last by python -m export
# A small feature cache (the features of ~4 images of the "ori" family, 4.8 MB each), so that the
# scenarios' dozen images keep evicting each other.
CHURN_CACHE_BYTES = 20 * 1024**2
QUEUE_DELAY = re.compile(r"max_queue_delay_microseconds: \d+")
PREFERRED_SIZES = re.compile(r"preferred_batch_size: \[[^\]]*\]")


def prepare_model(size: str, build_dir: Path) -> Tuple[Path, Path]:
    """A random-weight checkpoint of `size` (tiny | vit-b) and its ONNX graphs, made once and reused."""
    from export.__main__ import parse_args as export_args, run as export_run
    from export.tiny_checkpoint import write_tiny_checkpoint

    checkpoint, onnx_dir = build_dir / "checkpoint", build_dir / "onnx"
    if not (checkpoint / CHECKPOINT_DONE).is_file():
        write_tiny_checkpoint(checkpoint, size)
    if not (onnx_dir / ONNX_DONE).is_file():
        export_run(export_args(["--checkpoint", str(checkpoint), "--output-dir", str(onnx_dir)]))
    return checkpoint, onnx_dir


def churn_repository(onnx_dir: Path, output: Path, **options) -> Path:
    """The default python-ort repository with a cache of a few images (evictions under any image mix)."""
    return write_repository(output, onnx_dir, RepositoryOptions(cache_bytes=CHURN_CACHE_BYTES, **options))


def hold_batches(repository: Path, models: Iterable[str], batch_size: int, delay_us: int) -> None:
    """Config override: the dynamic batcher of each of `models` waits up to `delay_us` for a batch of
    exactly `batch_size` (its only preferred size), so that many requests sent together run as one batch."""
    for model in models:
        config = repository / model / "config.pbtxt"
        text = config.read_text()
        for pattern, value in ((QUEUE_DELAY, f"max_queue_delay_microseconds: {delay_us}"),
                               (PREFERRED_SIZES, f"preferred_batch_size: [ {batch_size} ]")):
            text, replaced = pattern.subn(value, text)
            if replaced != 1:
                raise ValueError(f"{config}: expected one {pattern.pattern!r}, found {replaced}")
        config.write_text(text)
