"""EVF-SAM2 served for real: a tiny SAM-2 multitask checkpoint exported with its recipe (sam2-v2), masks
over gRPC and HTTP equal to the eager PyTorch pipeline with upstream's slow tokenizer, `[semantic]`
prompts included, and the served model saying what it is."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from evfsam.processing import decode_image
from evfsam.specs import EVF_SAM, SAM2_IMAGE_ENCODER
from serving.repository import RepositoryOptions, write_repository
from tests.images import encode, scene
from tests.test_prompts_model import model_counts, segment_many
from tests.test_serving import assert_same_mask, grpc_segment, http_segment

pytestmark = pytest.mark.triton
PROMPTS = ["zebra top left", "[semantic] sky", "the man in the red shirt"]


@pytest.fixture(scope="module")
def sam2_server(sam2_onnx_dir, tiny_sam2_checkpoint, tmp_path_factory):
    from tests.conftest import start_server

    repo = write_repository(tmp_path_factory.mktemp("sam2_repo") / "model_repository", sam2_onnx_dir,
                            RepositoryOptions(ort_threads=1, cache_bytes=64 * 1024**2))
    running = start_server(repo, tiny_sam2_checkpoint, tmp_path_factory.mktemp("sam2_logs") / "tritonserver.log")
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def sam2_reference(loaded_sam2_model, tiny_sam2_checkpoint):
    """Upstream's recipe from 9d00853 in eager PyTorch, tokenized by the slow XLM-R tokenizer."""
    from transformers import XLMRobertaTokenizer

    from evfsam.pipeline import TorchPipeline

    slow = XLMRobertaTokenizer.from_pretrained(str(tiny_sam2_checkpoint))
    return TorchPipeline(loaded_sam2_model[0], lambda prompt: slow(prompt)["input_ids"], recipe="sam2-v2")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sam2_masks_equal_the_pytorch_pipeline(sam2_server, sam2_reference, protocol):
    segment = grpc_segment if protocol == "grpc" else http_segment
    for (height, width), fmt in (((240, 320), "JPEG"), ((333, 200), "PNG")):
        data = encode(scene(height, width, seed=height + 1), fmt)
        rgb = decode_image(data)
        for prompt in PROMPTS:
            mask, score = segment(sam2_server, data, prompt.encode())
            reference = sam2_reference(rgb, prompt)
            assert_same_mask(mask, reference.mask, reference.logits)
            assert score == pytest.approx(reference.score, abs=1e-4)


def test_sam2_many_prompts_share_the_cached_features(sam2_server, sam2_reference):
    data = encode(scene(210, 150, seed=21), "PNG")
    encoder_before = model_counts(sam2_server, SAM2_IMAGE_ENCODER.name)
    masks, scores, _, first_hit = segment_many(sam2_server, PROMPTS, image=data, with_hit=True)
    again, _, _, second_hit = segment_many(sam2_server, PROMPTS, image=data, with_hit=True)
    assert (first_hit, second_hit) == (False, True)
    assert model_counts(sam2_server, SAM2_IMAGE_ENCODER.name) - encoder_before == 1
    np.testing.assert_array_equal(masks, again)
    references = sam2_reference.segment_many(decode_image(data), PROMPTS)
    for mask, score, reference in zip(masks, scores, references):
        assert_same_mask(mask, reference.mask, reference.logits)
        assert score == pytest.approx(reference.score, abs=1e-4)


def test_sam2_server_says_what_it_serves(sam2_server, tiny_sam2_checkpoint):
    url = f"http://{sam2_server.http_url}/v2/models/{EVF_SAM.name}/config"
    with urllib.request.urlopen(url, timeout=10) as response:
        params = {k: v["string_value"] for k, v in json.load(response)["parameters"].items()}
    assert (params["family"], params["recipe"], params["multitask"]) == ("sam2", "sam2-v2", "True")
    assert params["checkpoint"] == str(tiny_sam2_checkpoint)
