"""The client library and `python -m clients.segment` against a real tritonserver serving the tiny
random-weight checkpoint (`triton_server` fixture), checked against the in-process PyTorch reference
(`reference_pipeline`): both protocols, sync and asyncio, one and many prompts, many images, every
failure mode with its message and exit code."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients import (
    AsyncSegmentationClient,
    ContractMismatch,
    ModelUnavailable,
    RequestTimeout,
    Segmentation,
    SegmentationClient,
    ServerError,
    ServerUnreachable,
)
from clients.images import decode_rgb
from clients.masks import overlay, rle_decode
from evfsam.specs import EVF_SAM, MAX_TEXT_TOKENS, SAM_IMAGE_ENCODER
from tests.images import encode, scene

pytestmark = pytest.mark.triton

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("grpc", "http")
PROMPTS = ("the blue circle", "a red square on the left", "background")
# The served graphs run in ONNX Runtime, the reference in PyTorch: a logit within float error of 0
# may land on the other side of the threshold, so a few boundary pixels may differ.
MAX_DIFFERENT_PIXELS = 0.005
SCORE_TOLERANCE = 1e-3


def url_of(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A JPEG on disk and its pixels as the server decodes them."""
    path = tmp_path_factory.mktemp("images") / "scene.jpg"
    path.write_bytes(encode(scene(120, 160, seed=11), "JPEG", quality=92))
    return path, decode_rgb(path.read_bytes())


def assert_same_answer(result, other):
    """Two requests of the same image and prompt: the server may batch them differently, which moves
    float results in their last bits."""
    assert result.mask.shape == other.mask.shape
    assert np.mean(result.mask != other.mask) <= MAX_DIFFERENT_PIXELS
    assert result.score == pytest.approx(other.score, abs=1e-4)


def assert_matches_reference(result, rgb, prompt, reference_pipeline):
    reference_mask, reference_score = reference_pipeline(rgb, prompt)
    assert result.prompt == prompt
    assert result.mask.dtype == np.uint8 and result.mask.shape == rgb.shape[:2]
    assert set(np.unique(result.mask)) <= {0, 1}
    assert np.mean(result.mask != reference_mask) <= MAX_DIFFERENT_PIXELS
    assert result.score == pytest.approx(reference_score, abs=SCORE_TOLERANCE)


# ---------------------------------------------------------------- library, success


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sync_segment_matches_the_reference(triton_server, reference_pipeline, photo, protocol):
    path, rgb = photo
    with SegmentationClient(url_of(triton_server, protocol), protocol=protocol) as client:
        assert client.metadata["name"] == EVF_SAM.name
        result = client.segment(path, PROMPTS[0])
    assert_matches_reference(result, rgb, PROMPTS[0], reference_pipeline)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_segment_matches_the_reference(triton_server, reference_pipeline, photo, protocol):
    path, rgb = photo

    async def segment():
        async with AsyncSegmentationClient(url_of(triton_server, protocol), protocol=protocol) as client:
            return await client.segment(str(path), PROMPTS[1])

    assert_matches_reference(asyncio.run(segment()), rgb, PROMPTS[1], reference_pipeline)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sync_many_prompts_come_back_in_order(triton_server, reference_pipeline, photo, protocol):
    path, rgb = photo
    with SegmentationClient(url_of(triton_server, protocol), protocol=protocol, concurrency=2) as client:
        results = client.segment_prompts(path, PROMPTS)
        singles = [client.segment(path, prompt) for prompt in PROMPTS]
    assert [r.prompt for r in results] == list(PROMPTS)
    for result, single in zip(results, singles):
        assert_same_answer(result, single)
        assert_matches_reference(result, rgb, result.prompt, reference_pipeline)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_many_prompts_come_back_in_order(triton_server, reference_pipeline, photo, protocol):
    path, rgb = photo

    async def segment():
        async with AsyncSegmentationClient(url_of(triton_server, protocol), protocol, concurrency=3) as client:
            return await client.segment_prompts(path, PROMPTS)

    results = asyncio.run(segment())
    assert [r.prompt for r in results] == list(PROMPTS)
    for result in results:
        assert_matches_reference(result, rgb, result.prompt, reference_pipeline)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_many_images_with_bounded_concurrency(triton_server, reference_pipeline, protocol):
    images = [scene(h, w, seed=s) for s, (h, w) in enumerate([(64, 96), (100, 70), (50, 50), (81, 123), (40, 200)])]
    requests = [(rgb, PROMPTS[i % len(PROMPTS)]) for i, rgb in enumerate(images)]
    with SegmentationClient(url_of(triton_server, protocol), protocol=protocol, concurrency=2) as client:
        results = list(client.segment_many(iter(requests)))

    async def segment_all():
        async with AsyncSegmentationClient(url_of(triton_server, protocol), protocol, concurrency=2) as client:
            return [result async for result in client.segment_many(iter(requests))]

    async_results = asyncio.run(segment_all())
    assert len(results) == len(async_results) == len(requests)
    for (rgb, prompt), result, async_result in zip(requests, results, async_results):
        assert_matches_reference(result, rgb, prompt, reference_pipeline)
        assert_same_answer(result, async_result)


def test_every_image_form_gives_the_same_answer(triton_server, photo):
    path, rgb = photo
    forms = [path, str(path), path.read_bytes(), rgb, Image.fromarray(rgb)]
    with SegmentationClient(triton_server.grpc_url) as client:
        results = [client.segment(form, PROMPTS[0]) for form in forms]
    for result in results[1:]:
        assert_same_answer(result, results[0])


def test_grpc_and_http_agree(triton_server, photo):
    path, _ = photo
    answers = []
    for protocol in PROTOCOLS:
        with SegmentationClient(url_of(triton_server, protocol), protocol=protocol) as client:
            answers.append(client.segment(path, PROMPTS[2]))
    assert_same_answer(answers[0], answers[1])


# ---------------------------------------------------------------- library, failures


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_model_of_another_contract_is_refused(triton_server, protocol):
    other = dataclasses.replace(EVF_SAM, name=SAM_IMAGE_ENCODER.name)  # served, but not this contract
    with pytest.raises(ContractMismatch) as error:
        SegmentationClient(url_of(triton_server, protocol), protocol=protocol, spec=other)
    assert str(error.value).startswith(f"served model {SAM_IMAGE_ENCODER.name!r} does not match the client contract: ")
    assert f"missing input {EVF_SAM.inputs[0].name!r}" in str(error.value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_changed_contract_is_refused(triton_server, protocol):
    image = EVF_SAM.inputs[0]
    changed = dataclasses.replace(EVF_SAM, inputs=(dataclasses.replace(image, dtype="uint8"),) + EVF_SAM.inputs[1:])

    async def connect():
        async with AsyncSegmentationClient(url_of(triton_server, protocol), protocol, spec=changed):
            pass

    with pytest.raises(ContractMismatch, match=f"input {image.name!r} has datatype BYTES, expected UINT8"):
        asyncio.run(connect())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_missing_model_is_reported(triton_server, protocol):
    missing = dataclasses.replace(EVF_SAM, name=EVF_SAM.name + "_absent")
    url = url_of(triton_server, protocol)
    with pytest.raises(ModelUnavailable) as error:
        SegmentationClient(url, protocol=protocol, spec=missing)
    assert str(error.value).startswith(f"the server at {url} does not serve a ready model '{missing.name}': ")
    assert error.value.exit_code == 5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_undecodable_image_gives_the_servers_message(triton_server, protocol):
    with SegmentationClient(url_of(triton_server, protocol), protocol=protocol) as client:
        with pytest.raises(ServerError) as error:
            client.segment(b"these bytes are not an image", "cat")
    message = str(error.value)
    assert message.startswith("the server failed the request: ") and "image" in message
    assert "\n" not in message and "Traceback" not in message
    assert error.value.exit_code == 6


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_too_long_prompt_gives_the_servers_message_async(triton_server, photo, protocol):
    path, _ = photo
    prompt = " ".join(["word"] * (2 * MAX_TEXT_TOKENS))

    async def segment():
        async with AsyncSegmentationClient(url_of(triton_server, protocol), protocol) as client:
            return await client.segment(path, prompt)

    with pytest.raises(ServerError, match=f"the server failed the request: .*limit is {MAX_TEXT_TOKENS}"):
        asyncio.run(segment())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_failure_among_many_is_raised(triton_server, photo, protocol):
    path, rgb = photo
    requests = [(rgb, "a"), (b"not an image", "b"), (rgb, "c")]
    with SegmentationClient(url_of(triton_server, protocol), protocol=protocol, concurrency=3) as client:
        results = client.segment_many(requests)
        assert next(results).prompt == "a"
        with pytest.raises(ServerError):
            next(results)
        assert client.segment(path, "still usable").mask.shape == rgb.shape[:2]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_other_protocols_port_is_reported(triton_server, protocol):
    other_port = url_of(triton_server, "http" if protocol == "grpc" else "grpc")
    with pytest.raises(ServerUnreachable) as error:
        SegmentationClient(other_port, protocol=protocol, timeout=10)
    assert other_port in str(error.value) and protocol in str(error.value)
    assert error.value.exit_code == 3


# tritonserver 2.51 can crash (SIGSEGV) when a gRPC inference is cancelled while it runs (a race in
# its cancellation handling; triton-inference-server/server#7368, fixed in 2.53), and a client-side
# deadline is such a cancellation.  So against the shared server, gRPC timeouts are provoked before
# any inference starts; the HTTP endpoint does not cancel, so there the inference itself is too slow.
# gRPC deadlines are rounded, so even a 1e-6 s deadline can let a fast metadata call through and then
# cancel an inference: gRPC timeouts are tested only against a server that never answers
# (tests/test_clients_unit.py).
INFERENCE_TIMEOUT_S = 0.1  # the tiny model takes ~0.5 s per request on 2 CPU cores, metadata < 1 ms


def uncached_photo(tmp_path, seed):
    """An image the server has never seen: the request must run the image encoder (the shared
    feature cache would answer a known one too quickly for the timeout to trigger)."""
    path = tmp_path / f"uncached_{seed}.png"
    path.write_bytes(encode(scene(300, 400, seed=seed), "PNG"))
    return path


def test_a_slow_inference_times_out_over_http(triton_server, tmp_path):
    path = uncached_photo(tmp_path, 9001)
    url = triton_server.http_url
    with SegmentationClient(url, protocol="http", timeout=INFERENCE_TIMEOUT_S) as client:
        with pytest.raises(RequestTimeout) as error:
            client.segment(path, "cat")
    assert str(error.value) == f"no answer from the Triton server at {url} over http within {INFERENCE_TIMEOUT_S:g} s"
    assert error.value.exit_code == 4


def _evf_sam_outcomes(server):
    """evf_sam's successes and cancellations, from Triton's own metrics."""
    from serving import metrics

    samples = metrics.scrape(server.metrics_url)
    return (metrics.total(samples, "nv_inference_request_success", model=EVF_SAM.name),
            metrics.total(samples, "nv_inference_request_failure", model=EVF_SAM.name, reason="CANCELED"))


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_grpc_timeout_is_the_clients_alone(triton_server, tmp_path, asynchronous):
    """No deadline goes with the request: the client gives up, the server finishes the request (a
    server-side cancellation is what can crash tritonserver 2.51)."""
    import time

    path = uncached_photo(tmp_path, 9003 + asynchronous)
    deadline = time.time() + 60
    while triton_server.server.requests_in_flight() and time.time() < deadline:
        time.sleep(0.1)  # earlier tests' timed-out requests finish on the server first
    successes, cancellations = _evf_sam_outcomes(triton_server)

    async def segment_async():
        async with AsyncSegmentationClient(triton_server.grpc_url, "grpc", timeout=INFERENCE_TIMEOUT_S) as client:
            return await client.segment(path, "cat")

    with pytest.raises(RequestTimeout, match=f"within {INFERENCE_TIMEOUT_S:g} s"):
        if asynchronous:
            asyncio.run(segment_async())
        else:
            with SegmentationClient(triton_server.grpc_url, protocol="grpc", timeout=INFERENCE_TIMEOUT_S) as client:
                client.segment(path, "cat")
    deadline = time.time() + 60
    while triton_server.server.requests_in_flight() and time.time() < deadline:
        time.sleep(0.1)
    assert _evf_sam_outcomes(triton_server) == (successes + 1, cancellations)


def test_a_slow_inference_times_out_over_http_async(triton_server, tmp_path):
    path = uncached_photo(tmp_path, 9002)

    async def segment():
        async with AsyncSegmentationClient(triton_server.http_url, "http", timeout=INFERENCE_TIMEOUT_S) as client:
            return await client.segment(path, "cat")

    with pytest.raises(RequestTimeout, match=f"within {INFERENCE_TIMEOUT_S:g} s"):
        asyncio.run(segment())


# ---------------------------------------------------------------- command line


def run_segment(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "clients.segment", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=timeout, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_writes_mask_overlay_and_json(triton_server, reference_pipeline, photo, tmp_path, protocol):
    path, rgb = photo
    out = tmp_path / "out"
    done = run_segment("--url", url_of(triton_server, protocol), "--protocol", protocol, "--image", str(path),
                       "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "scene.json").read_text())
    assert (summary["height"], summary["width"]) == rgb.shape[:2]
    assert [r["prompt"] for r in summary["results"]] == list(PROMPTS[:2])
    with SegmentationClient(url_of(triton_server, protocol), protocol=protocol) as client:
        expected = client.segment_prompts(path, PROMPTS[:2])
    for index, (record, result) in enumerate(zip(summary["results"], expected)):
        mask = rle_decode(record["rle"])
        assert record["area"] == int(mask.sum())
        assert_same_answer(Segmentation(record["prompt"], mask, record["score"]), result)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"scene_{index}_mask.png")), mask * 255)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"scene_{index}_overlay.png")), overlay(rgb, mask))
        reference_mask, _ = reference_pipeline(rgb, record["prompt"])
        assert np.mean(mask != reference_mask) <= MAX_DIFFERENT_PIXELS
    assert done.stdout.splitlines()[0].startswith(f"{PROMPTS[0]!r}: score ")
    assert done.stdout.splitlines()[-1] == f"wrote {out / 'scene.json'}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_server_error_exits_6(triton_server, tmp_path, protocol):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    done = run_segment("--url", url_of(triton_server, protocol), "--protocol", protocol, "--image", str(broken),
                       "--prompt", "cat", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 6
    assert done.stderr.startswith("error: the server failed the request: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_contract_mismatch_exits_5(triton_server, photo, tmp_path, protocol):
    path, _ = photo
    done = run_segment("--url", url_of(triton_server, protocol), "--protocol", protocol, "--image", str(path),
                       "--prompt", "cat", "--model", SAM_IMAGE_ENCODER.name, "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 5
    expected = f"error: served model {SAM_IMAGE_ENCODER.name!r} does not match the client contract: "
    assert done.stderr.startswith(expected)
    assert done.stderr.count("\n") == 1


def test_cli_missing_model_exits_5(triton_server, photo, tmp_path):
    path, _ = photo
    done = run_segment("--url", triton_server.grpc_url, "--image", str(path), "--prompt", "cat",
                       "--model", "no_such_model", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 5
    expected = f"error: the server at {triton_server.grpc_url} does not serve a ready model 'no_such_model': "
    assert done.stderr.startswith(expected)


def test_cli_wrong_port_exits_3(triton_server, photo, tmp_path):
    path, _ = photo
    done = run_segment("--url", triton_server.grpc_url, "--protocol", "http", "--image", str(path), "--prompt", "cat",
                       "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 3
    expected = f"error: no valid http answer from {triton_server.grpc_url} (wrong port or protocol?): "
    assert done.stderr.startswith(expected)
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("protocol, timeout", [("http", INFERENCE_TIMEOUT_S)])
def test_cli_timeout_exits_4(triton_server, tmp_path, protocol, timeout):
    # A fresh image: a cached one is answered by evf_sam_prompts in about the timeout itself.
    path = tmp_path / "uncached.png"
    path.write_bytes(encode(scene(600, 800, seed={"http": 1001, "grpc": 1002}[protocol]), "PNG"))
    url = url_of(triton_server, protocol)
    done = run_segment("--url", url, "--protocol", protocol, "--image", str(path), "--prompt", "cat",
                       "--timeout", str(timeout), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 4
    assert done.stderr == f"error: no answer from the Triton server at {url} over {protocol} within {timeout:g} s\n"


def test_cli_unwritable_output_exits_7(triton_server, photo, tmp_path):
    path, _ = photo
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = run_segment("--url", triton_server.grpc_url, "--image", str(path), "--prompt", "cat",
                       "--output-dir", str(blocker / "out"))
    assert done.returncode == 7
    assert done.stderr.startswith(f"error: cannot write results to {blocker / 'out'}: ")
