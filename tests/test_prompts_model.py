"""`evf_sam_prompts` on the real server: many prompts per image, the embedding cache, its metrics."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from evfsam.embedding_cache import image_key
from evfsam.processing import decode_image
from evfsam import mask_codecs
from evfsam.specs import (CACHE_METRICS, ENCODES_IN_FLIGHT_METRIC, ENCODES_WAITING_METRIC, EVF_SAM_PROMPTS,
                          SAM_IMAGE_ENCODER)
from serving import metrics
from tests.images import encode, scene
from tests.test_serving import grpc_segment

pytestmark = pytest.mark.triton

IMAGE, IMAGE_KEY, PROMPTS, MASK_FORMAT = (t.name for t in EVF_SAM_PROMPTS.inputs)
MASKS, SCORES, KEY_OUT, CACHE_HIT, MASKS_ENCODED = (t.name for t in EVF_SAM_PROMPTS.outputs)
PROMPT_LIST = ["zebra top left", "a cat", "the second one from the right, behind the fence", "red", "left"]


def segment_many(server, prompts, image=None, key=None, mask_format=None, with_hit=False):
    inputs = []
    for name, value in ((IMAGE, image), (IMAGE_KEY, key), (MASK_FORMAT, mask_format)):
        if value is not None:
            tensor = grpcclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value], dtype=object))
            inputs.append(tensor)
    tensor = grpcclient.InferInput(PROMPTS, [len(prompts)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=object))
    inputs.append(tensor)
    result = grpcclient.InferenceServerClient(server.grpc_url).infer(EVF_SAM_PROMPTS.name, inputs)
    masks = result.as_numpy(MASKS) if mask_format in (None, b"raw") else result.as_numpy(MASKS_ENCODED)
    answer = (masks, result.as_numpy(SCORES), result.as_numpy(KEY_OUT)[0].decode())
    return answer + (bool(result.as_numpy(CACHE_HIT)[0]),) if with_hit else answer


def model_counts(server, model):
    stats = httpclient.InferenceServerClient(server.http_url).get_inference_statistics(model)
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def cache_counts(server):
    samples = metrics.scrape(server.metrics_url)
    return {key: int(metrics.total(samples, name)) for key, name in CACHE_METRICS.items()}


def test_many_prompts_equal_single_prompt_requests(triton_server, torch_pipeline):
    data = encode(scene(210, 330, seed=11), "PNG")
    masks, scores, key = segment_many(triton_server, PROMPT_LIST, image=data)
    assert key == image_key(data)
    assert masks.shape == (len(PROMPT_LIST), 210, 330) and scores.shape == (len(PROMPT_LIST),)
    rgb = decode_image(data)
    for i, prompt in enumerate(PROMPT_LIST):
        single_mask, single_score = grpc_segment(triton_server, data, prompt.encode())
        reference = torch_pipeline(rgb, prompt)
        flips = masks[i] != single_mask
        assert np.all(np.abs(reference.logits[flips]) < 1e-3)  # only boundary pixels may differ
        assert scores[i] == pytest.approx(single_score, abs=1e-4)


def test_cache_hit_and_image_key_return_the_miss_result(triton_server):
    data = encode(scene(150, 170, seed=12), "JPEG")
    before = cache_counts(triton_server)
    miss_masks, miss_scores, key = segment_many(triton_server, PROMPT_LIST[:3], image=data)
    hit_masks, hit_scores, _ = segment_many(triton_server, PROMPT_LIST[:3], image=data)
    key_masks, key_scores, same_key = segment_many(triton_server, PROMPT_LIST[:3], key=key)
    after = cache_counts(triton_server)
    assert same_key == key
    np.testing.assert_array_equal(miss_masks, hit_masks)
    np.testing.assert_array_equal(miss_masks, key_masks)
    np.testing.assert_array_equal(miss_scores, key_scores)
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 2


def test_eviction_under_a_tiny_budget(triton_server):
    """The test repository's cache holds two images: a third evicts the least recently used."""
    keys = [segment_many(triton_server, ["a"], image=encode(scene(90, 90, seed=100 + i), "PNG"))[2] for i in range(3)]
    before = cache_counts(triton_server)
    assert before["evictions"] >= 1
    with pytest.raises(InferenceServerException) as info:
        segment_many(triton_server, ["a"], key=keys[0])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "never sent or evicted" in info.value.message()
    segment_many(triton_server, ["a"], key=keys[2])  # the newest is still there


def test_concurrent_requests_for_the_same_new_image_encode_it_once(triton_server):
    data = encode(scene(260, 180, seed=13), "PNG")
    before, encoder_before = cache_counts(triton_server), model_counts(triton_server, SAM_IMAGE_ENCODER.name)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: segment_many(triton_server, PROMPT_LIST[:2], image=data), range(4)))
    after, encoder_after = cache_counts(triton_server), model_counts(triton_server, SAM_IMAGE_ENCODER.name)
    for masks, scores, key in results[1:]:
        np.testing.assert_array_equal(masks, results[0][0])
        np.testing.assert_array_equal(scores, results[0][1])
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 3
    assert encoder_after - encoder_before == 1


def encoder_batches(server):
    stats = httpclient.InferenceServerClient(server.http_url).get_inference_statistics(SAM_IMAGE_ENCODER.name)
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["model_stats"][0]["batch_stats"]}


def test_new_images_reach_the_encoder_one_at_a_time(triton_server):
    """On a CPU the encoder admits what it runs at once, one image: six concurrent requests for six new
    images (four served instances) all succeed, and the encoder never got two at once (no batch of 2+,
    which its dynamic batcher forms whenever two requests wait together)."""
    images = [encode(scene(150 + 10 * i, 140, seed=40 + i), "PNG") for i in range(6)]
    before = encoder_batches(triton_server)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda data: segment_many(triton_server, PROMPT_LIST[:1], image=data), images))
    after = encoder_batches(triton_server)
    assert all(masks.shape[0] == 1 for masks, _, _ in results)
    grown = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert {size: n for size, n in grown.items() if n} == {1: 6}
    samples = metrics.scrape(triton_server.metrics_url)
    assert metrics.total(samples, ENCODES_IN_FLIGHT_METRIC) == 0 and metrics.total(samples, ENCODES_WAITING_METRIC) == 0


def test_both_served_models_share_one_cache(triton_server):
    data = encode(scene(200, 150, seed=14), "JPEG")
    _, _, _, first_hit = segment_many(triton_server, ["a cat"], image=data, with_hit=True)
    encoder_before = model_counts(triton_server, SAM_IMAGE_ENCODER.name)
    mask, score = grpc_segment(triton_server, data, b"a cat")  # evf_sam, same image
    _, scores, _, second_hit = segment_many(triton_server, ["a cat"], image=data, with_hit=True)
    assert not first_hit and second_hit
    assert model_counts(triton_server, SAM_IMAGE_ENCODER.name) == encoder_before  # no encoder run for either
    assert score == pytest.approx(float(scores[0]), abs=1e-6)


@pytest.mark.parametrize("mask_format", [b"rle", b"png"])
def test_compact_mask_formats_decode_to_the_raw_masks(triton_server, mask_format):
    data = encode(scene(123, 211, seed=15), "PNG")
    raw, raw_scores, _ = segment_many(triton_server, PROMPT_LIST, image=data)
    encoded, scores, _ = segment_many(triton_server, PROMPT_LIST, image=data, mask_format=mask_format)
    decoded = np.stack([mask_codecs.decode_mask(bytes(item), mask_format.decode()) for item in encoded])
    np.testing.assert_array_equal(decoded, raw)
    np.testing.assert_array_equal(scores, raw_scores)


def test_output_budget_is_checked_before_any_compute(triton_server, tmp_path):
    """64 prompts on a 40 MP image would be 2.5 GB of raw masks: refused, naming the numbers."""
    big = encode(np.zeros((6000, 6600, 3), np.uint8), "PNG")  # 39.6 MP, compresses to ~120 KB
    encoder_before = model_counts(triton_server, SAM_IMAGE_ENCODER.name)
    misses_before = cache_counts(triton_server)["misses"]
    with pytest.raises(InferenceServerException) as info:
        segment_many(triton_server, ["x"] * 64, image=big)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "64 prompts x 6600x6000 pixels = 2534400000 mask pixels; the limit for raw masks is 268435456" in info.value.message()
    assert model_counts(triton_server, SAM_IMAGE_ENCODER.name) == encoder_before
    assert cache_counts(triton_server)["misses"] == misses_before


@pytest.mark.parametrize("kwargs, expected", [
    ({"prompts": ["ok"]}, "send exactly one of 'image'"),
    ({"prompts": ["ok"], "image": b"img", "key": "k"}, "send exactly one of 'image'"),
    ({"prompts": ["ok"], "key": "0" * 64}, "never sent or evicted"),
    ({"prompts": ["fine", "  "], "image": encode(scene(40, 40))}, "prompt 1: prompt is empty"),
    ({"prompts": ["x"] * 65, "image": encode(scene(40, 40))}, "send 1 to 64 prompts, got 65"),
    ({"prompts": ["ok"], "image": b"\x89PNG broken"}, "not a recognised image format"),
    ({"prompts": ["ok"], "image": encode(scene(40, 40)), "mask_format": b"jpeg"}, "mask_format 'jpeg' is not one of raw, rle, png"),
])
def test_bad_requests(triton_server, kwargs, expected):
    with pytest.raises(InferenceServerException) as info:
        segment_many(triton_server, **kwargs)
    assert expected in info.value.message() and info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "Traceback" not in info.value.message()
