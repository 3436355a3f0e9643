"""The client library and `python -m clients.segment` on the many-prompts model `evf_sam_prompts`,
against the real tritonserver (`triton_server` fixture): all the prompts of an image in one request,
the same answers as single-prompt requests, the image key round trip, an unknown key's typed error,
the fallback when the model is absent, and the CLI with a repeated --prompt.

The test repository's embedding cache holds two images and other tests evict entries, so every key
is used right after the request that returned it."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from clients import (
    AsyncSegmentationClient,
    ModelUnavailable,
    Segmentation,
    SegmentationClient,
    ServerError,
    UnknownImageKey,
)
from evfsam.embedding_cache import image_key
from evfsam.processing import decode_image
from evfsam.specs import EVF_SAM, EVF_SAM_PROMPTS, MAX_PROMPTS_PER_REQUEST
from tests.images import encode, scene
from tests.test_prompts_model import cache_counts

pytestmark = pytest.mark.triton

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("grpc", "http")
MODES = ("sync", "async")
PROMPTS = ["the blue circle", "a red square on the left", "background", "zebra top left", "the second one"]
UNKNOWN_KEY = "0" * 64
BOUNDARY_LOGIT = 1e-3  # served (ONNX Runtime) and reference (PyTorch) masks may differ only there
SCORE_TOLERANCE = 1e-4
STATS_WAIT_S = 5.0


def url_of(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


def successful_requests(server, model):
    """How many requests `model` has answered successfully, from Triton's statistics."""
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(model, as_json=True)
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats.get("model_stats", []))


class RequestCounter:
    """Requests answered by `evf_sam_prompts` and by the `evf_sam` ensemble since construction."""

    def __init__(self, server):
        self.server = server
        self.before = self._counts()

    def _counts(self):
        return tuple(successful_requests(self.server, name) for name in (EVF_SAM_PROMPTS.name, EVF_SAM.name))

    def delta(self, expected, wait_s=STATS_WAIT_S):
        """The counts since construction, once they equal `expected` or after `wait_s`: Triton may
        record a request in its statistics just after the client has the response."""
        deadline = time.monotonic() + wait_s
        while True:
            delta = tuple(after - before for after, before in zip(self._counts(), self.before))
            if delta == expected or time.monotonic() > deadline:
                return delta
            time.sleep(0.05)


def segment_prompts(server, protocol, mode, image, prompts, image_key=None, **options):
    """`segment_prompts` of the sync or the asyncio client, on a fresh client."""
    url = url_of(server, protocol)
    if mode == "sync":
        with SegmentationClient(url, protocol=protocol, **options) as client:
            return client.segment_prompts(image, prompts, image_key=image_key)

    async def run():
        async with AsyncSegmentationClient(url, protocol=protocol, **options) as client:
            return await client.segment_prompts(image, prompts, image_key=image_key)

    return asyncio.run(run())


def assert_matches_single(result, single, reference):
    """A many-prompts answer against the `evf_sam` answer to the same (image, prompt)."""
    assert result.mask.shape == single.mask.shape and result.mask.dtype == np.uint8
    flips = result.mask != single.mask
    assert np.all(np.abs(reference.logits[flips]) < BOUNDARY_LOGIT)
    assert result.score == pytest.approx(single.score, abs=SCORE_TOLERANCE)


def assert_identical(results, others):
    assert [r.prompt for r in results] == [o.prompt for o in others]
    for result, other in zip(results, others):
        np.testing.assert_array_equal(result.mask, other.mask)
        assert result.score == other.score


# ---------------------------------------------------------------- one request for many prompts


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_many_prompts_are_one_request_and_equal_single_prompt_results(triton_server, torch_pipeline, protocol, mode):
    seed = 20 + 2 * PROTOCOLS.index(protocol) + MODES.index(mode)  # a new image each: one cache miss
    data = encode(scene(96, 136, seed=seed), "PNG")
    counter, misses = RequestCounter(triton_server), cache_counts(triton_server)["misses"]
    results = segment_prompts(triton_server, protocol, mode, data, PROMPTS)
    assert counter.delta((1, 0)) == (1, 0)  # one evf_sam_prompts request, no evf_sam request
    assert cache_counts(triton_server)["misses"] - misses == 1

    assert all(isinstance(r, Segmentation) for r in results)
    assert [r.prompt for r in results] == PROMPTS
    assert {r.image_key for r in results} == {image_key(data)}
    rgb = decode_image(data)
    with SegmentationClient(url_of(triton_server, protocol), protocol=protocol) as client:
        singles = [client.segment(data, prompt) for prompt in PROMPTS]
    for result, single in zip(results, singles):
        assert single.image_key is None
        assert_matches_single(result, single, torch_pipeline(rgb, result.prompt))


def test_more_prompts_than_one_request_holds_are_chunked_in_order(triton_server, torch_pipeline):
    data = encode(scene(64, 80, seed=30), "JPEG", quality=90)
    distinct = PROMPTS[:3]
    prompts = [distinct[i % len(distinct)] for i in range(MAX_PROMPTS_PER_REQUEST + 2)]
    counter = RequestCounter(triton_server)
    with SegmentationClient(triton_server.grpc_url, concurrency=1) as client:
        results = client.segment_prompts(data, prompts)
        singles = {prompt: client.segment(data, prompt) for prompt in distinct}
    assert counter.delta((2, len(distinct))) == (2, len(distinct))
    assert [r.prompt for r in results] == prompts
    rgb = decode_image(data)
    references = {prompt: torch_pipeline(rgb, prompt) for prompt in distinct}
    for result in results:
        assert result.image_key == image_key(data)
        assert_matches_single(result, singles[result.prompt], references[result.prompt])


# ---------------------------------------------------------------- image keys


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_image_key_stands_for_the_image(triton_server, protocol, mode):
    data = encode(scene(72, 90, seed=40 + 2 * PROTOCOLS.index(protocol) + MODES.index(mode)), "PNG")
    url = url_of(triton_server, protocol)

    def by_image_then_by_key():
        with SegmentationClient(url, protocol=protocol) as client:
            first = client.segment_prompts(data, PROMPTS[:2])
            before = cache_counts(triton_server)
            again = client.segment_prompts(None, PROMPTS[:2], image_key=first[0].image_key)
        return first, again, before

    async def by_image_then_by_key_async():
        async with AsyncSegmentationClient(url, protocol=protocol) as client:
            first = await client.segment_prompts(data, PROMPTS[:2])
            before = cache_counts(triton_server)
            again = await client.segment_prompts(None, PROMPTS[:2], image_key=first[0].image_key)
        return first, again, before

    first, again, before = by_image_then_by_key() if mode == "sync" else asyncio.run(by_image_then_by_key_async())
    after = cache_counts(triton_server)
    assert first[0].image_key == image_key(data)
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 0)
    assert {r.image_key for r in again} == {first[0].image_key}
    assert_identical(again, first)  # the same cached embedding, the same batch of prompts


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_unknown_image_key_is_a_typed_error(triton_server, protocol, mode):
    with pytest.raises(UnknownImageKey) as error:
        segment_prompts(triton_server, protocol, mode, None, ["a cat"], image_key=UNKNOWN_KEY)
    assert isinstance(error.value, ServerError) and error.value.exit_code == 6
    assert error.value.image_key == UNKNOWN_KEY
    assert str(error.value) == (
        f"the server does not hold image key {UNKNOWN_KEY!r} (never sent or evicted from its cache); "
        "send the image bytes again"
    )
    assert "never sent or evicted" in error.value.server_message


def test_other_failures_keep_their_types(triton_server):
    with SegmentationClient(triton_server.grpc_url) as client:
        with pytest.raises(ServerError) as error:
            client.segment_prompts(b"these bytes are not an image", ["a cat"])
        assert type(error.value) is ServerError
        assert str(error.value).startswith("the server failed the request: ") and "image" in str(error.value)
        with pytest.raises(ServerError) as error:  # a prompt the server refuses, sent with a key
            client.segment_prompts(None, ["fine", "  "], image_key=UNKNOWN_KEY)
        assert type(error.value) is ServerError and "prompt 1" in str(error.value)


# ---------------------------------------------------------------- without the many-prompts model


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_without_the_many_prompts_model_each_prompt_is_a_request(triton_server, protocol):
    data = encode(scene(60, 70, seed=50), "PNG")
    url = url_of(triton_server, protocol)
    absent = dataclasses.replace(EVF_SAM_PROMPTS, name=EVF_SAM_PROMPTS.name + "_absent")
    other_contract = dataclasses.replace(EVF_SAM_PROMPTS, name=EVF_SAM.name)
    counter = RequestCounter(triton_server)
    with SegmentationClient(url, protocol=protocol, prompts_spec=absent) as client:
        results = client.segment_prompts(data, PROMPTS[:3])
        assert not client.serves_prompts_model()
        with pytest.raises(ModelUnavailable, match=f"image keys need '{absent.name}'"):
            client.segment_prompts(None, PROMPTS[:1], image_key=image_key(data))
    assert counter.delta((0, 3)) == (0, 3)
    assert [r.prompt for r in results] == PROMPTS[:3] and {r.image_key for r in results} == {None}
    with SegmentationClient(url, protocol=protocol, prompts_spec=other_contract) as client:
        assert not client.serves_prompts_model()
    with SegmentationClient(url, protocol=protocol, prompts_spec=None) as client:
        assert not client.serves_prompts_model()

    async def absent_async():
        async with AsyncSegmentationClient(url, protocol=protocol, prompts_spec=absent) as client:
            return await client.serves_prompts_model(), await client.segment_prompts(data, PROMPTS[:1])

    served, async_results = asyncio.run(absent_async())
    assert not served and async_results[0].image_key is None
    assert counter.delta((0, 4)) == (0, 4)


# ---------------------------------------------------------------- command line


def run_segment(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "clients.segment", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=timeout, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_repeated_prompts_are_one_request_and_the_key_is_reusable(triton_server, tmp_path, protocol):
    path = tmp_path / "photo.png"
    path.write_bytes(encode(scene(80, 100, seed=60 + PROTOCOLS.index(protocol)), "PNG"))
    url = url_of(triton_server, protocol)
    prompt_args = [arg for prompt in PROMPTS[:3] for arg in ("--prompt", prompt)]
    counter = RequestCounter(triton_server)
    done = run_segment("--url", url, "--protocol", protocol, "--image", str(path), *prompt_args,
                       "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert counter.delta((1, 0)) == (1, 0)
    summary = json.loads((tmp_path / "out" / "photo.json").read_text())
    key = image_key(path.read_bytes())
    assert summary["image_key"] == key and [r["prompt"] for r in summary["results"]] == PROMPTS[:3]
    assert done.stdout.splitlines()[-2:] == [f"image_key {key}", f"wrote {tmp_path / 'out' / 'photo.json'}"]
    for index in range(3):
        assert (tmp_path / "out" / f"photo_{index}_overlay.png").is_file()

    # right away, before another test evicts it: the key instead of the image
    by_key = run_segment("--url", url, "--protocol", protocol, "--image-key", key, *prompt_args,
                         "--output-dir", str(tmp_path / "by_key"))
    assert by_key.returncode == 0, by_key.stderr
    stem = key[:16]
    keyed = json.loads((tmp_path / "by_key" / f"{stem}.json").read_text())
    assert keyed["image"] is None and keyed["image_key"] == key
    assert (keyed["height"], keyed["width"]) == (summary["height"], summary["width"])
    for index, (record, expected) in enumerate(zip(keyed["results"], summary["results"])):
        assert (record["prompt"], record["score"], record["rle"]) == (expected["prompt"], expected["score"],
                                                                      expected["rle"])
        assert record["overlay_png"] is None
        mask = np.asarray(Image.open(tmp_path / "by_key" / f"{stem}_{index}_mask.png"))
        np.testing.assert_array_equal(mask, np.asarray(Image.open(expected["mask_png"])))
    assert counter.delta((2, 0)) == (2, 0)


def test_cli_timeout_exits_4(triton_server, tmp_path):
    """A new image (a cache miss: the image is encoded) is slower than the timeout.  Over HTTP,
    which does not cancel the request on the server (see tests/test_clients_e2e.py for gRPC)."""
    path = tmp_path / "photo.png"
    path.write_bytes(encode(scene(120, 160, seed=80), "PNG"))
    url, timeout = triton_server.http_url, 0.1
    done = run_segment("--url", url, "--protocol", "http", "--image", str(path), "--prompt", "a", "--prompt", "b",
                       "--timeout", str(timeout), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 4
    assert done.stderr == f"error: no answer from the Triton server at {url} over http within {timeout:g} s\n"


def test_cli_unknown_image_key_exits_6(triton_server, tmp_path):
    done = run_segment("--url", triton_server.grpc_url, "--image-key", UNKNOWN_KEY, "--prompt", "a cat",
                       "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 6
    assert done.stderr == (
        f"error: the server does not hold image key {UNKNOWN_KEY!r} (never sent or evicted from its cache); "
        "send the image bytes again\n"
    )


def test_cli_without_the_many_prompts_model(triton_server, tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(encode(scene(50, 60, seed=70), "PNG"))
    counter = RequestCounter(triton_server)
    done = run_segment("--url", triton_server.grpc_url, "--image", str(path), "--prompt", "a", "--prompt", "b",
                       "--prompts-model", "", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert counter.delta((0, 2)) == (0, 2)
    assert json.loads((tmp_path / "out" / "photo.json").read_text())["image_key"] is None
    done = run_segment("--url", triton_server.grpc_url, "--image-key", UNKNOWN_KEY, "--prompt", "a",
                       "--prompts-model", "", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 5 and done.stderr.startswith("error: image keys need ")
