"""Shared fixtures: a tiny random-weight checkpoint in the real layout, its export, and a real
tritonserver serving it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import pytest

from evfsam.specs import TOKENIZER_FILE

# Room for two cached images (4.8 MB each): small enough that tests see evictions.
TEST_CACHE_BYTES = 10 * 1024**2


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from export.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def tiny_sam2_checkpoint(tmp_path_factory) -> Path:
    """EVF-SAM2 (SAM-2 Hiera) in miniature, multitask tokenizer ("[semantic]")."""
    from export.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_sam2_checkpoint"), family="sam2", multitask=True)


@pytest.fixture(scope="session")
def loaded_model(tiny_checkpoint):
    from evfsam.checkpoint import load_evf_sam

    model, config, _ = load_evf_sam(tiny_checkpoint)
    return model, config


@pytest.fixture(scope="session")
def onnx_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    from export.__main__ import parse_args, run

    out = tmp_path_factory.mktemp("onnx")
    run(parse_args(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(out)]))
    return out


@pytest.fixture(scope="session")
def loaded_sam2_model(tiny_sam2_checkpoint):
    from evfsam.checkpoint import load_evf_sam

    model, config, _ = load_evf_sam(tiny_sam2_checkpoint)
    return model, config


@pytest.fixture(scope="session")
def sam2_onnx_dir(tiny_sam2_checkpoint, tmp_path_factory) -> Path:
    """The tiny EVF-SAM2 multitask checkpoint exported with its default recipe (sam2-v2)."""
    from export.__main__ import parse_args, run

    out = tmp_path_factory.mktemp("sam2_onnx")
    run(parse_args(["--checkpoint", str(tiny_sam2_checkpoint), "--output-dir", str(out)]))
    return out


@pytest.fixture(scope="session")
def prompt_tokenizer(onnx_dir):
    from evfsam.tokenization import PromptTokenizer

    return PromptTokenizer(onnx_dir / TOKENIZER_FILE)


@pytest.fixture(scope="session")
def upstream_tokenizer(tiny_checkpoint):
    """What upstream inference.py uses: the slow sentencepiece XLM-R tokenizer."""
    from transformers import XLMRobertaTokenizer

    return XLMRobertaTokenizer.from_pretrained(str(tiny_checkpoint))


@pytest.fixture(scope="session")
def torch_pipeline(loaded_model, upstream_tokenizer):
    from evfsam.pipeline import TorchPipeline

    return TorchPipeline(loaded_model[0], lambda prompt: upstream_tokenizer(prompt)["input_ids"])


@pytest.fixture(scope="session")
def reference_pipeline(torch_pipeline) -> Callable[[np.ndarray, str], Tuple[np.ndarray, float]]:
    """(rgb uint8 [H,W,3], prompt) -> (mask uint8 [H,W], score), in-process PyTorch."""

    def segment(rgb: np.ndarray, prompt: str):
        result = torch_pipeline(rgb, prompt)
        return result.mask, result.score

    return segment


@pytest.fixture(scope="session")
def model_repository(onnx_dir, tmp_path_factory) -> Path:
    from serving.repository import RepositoryOptions, write_repository

    return write_repository(tmp_path_factory.mktemp("repo") / "model_repository", onnx_dir,
                            RepositoryOptions(flavor="python-ort", ort_threads=1, cache_bytes=TEST_CACHE_BYTES))


@dataclass
class RunningServer:
    http_url: str
    grpc_url: str
    metrics_url: str
    checkpoint_dir: Path
    server: object


def start_server(repository: Path, checkpoint: Path, log_file: Path) -> RunningServer:
    from serving.server import TritonServer

    server = TritonServer.on_free_ports(repository, log_file=log_file).run()
    return RunningServer(server.http_url, server.grpc_url, server.metrics_url, checkpoint, server)


@pytest.fixture(scope="session")
def triton_server(model_repository, tiny_checkpoint, tmp_path_factory):
    running = start_server(model_repository, tiny_checkpoint, tmp_path_factory.mktemp("logs") / "tritonserver.log")
    yield running
    running.server.stop()
