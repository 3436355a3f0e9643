"""`evf_sam` on a real tritonserver: correctness, the bad-input contract, concurrency,
graceful stop."""
from __future__ import annotations

import io
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from evfsam.processing import decode_image
from evfsam.specs import EVF_SAM
from tests.images import encode, scene

pytestmark = pytest.mark.triton

IMAGE, PROMPT = (t.name for t in EVF_SAM.inputs)
MASK, SCORE = (t.name for t in EVF_SAM.outputs)
CASES = [((240, 320), "zebra top left", "JPEG"), ((333, 200), "the man in the red shirt", "PNG"),
         ((97, 601), "a cat", "PNG"), ((512, 512), "left one", "WEBP")]


def _inputs(module, image: bytes, prompt: bytes, image_dtype="BYTES", prompt_shape=(1, 1)):
    image_input = module.InferInput(IMAGE, [1, 1], image_dtype)
    image_input.set_data_from_numpy(np.array([[image]], dtype=object))
    prompt_input = module.InferInput(PROMPT, list(prompt_shape), "BYTES")
    prompt_input.set_data_from_numpy(np.array([prompt] * int(np.prod(prompt_shape)), dtype=object).reshape(prompt_shape))
    return [image_input, prompt_input]


def grpc_segment(server, image: bytes, prompt: bytes):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    result = client.infer(EVF_SAM.name, _inputs(grpcclient, image, prompt))
    return result.as_numpy(MASK)[0], float(result.as_numpy(SCORE)[0, 0])


def http_segment(server, image: bytes, prompt: bytes):
    client = httpclient.InferenceServerClient(server.http_url)
    result = client.infer(EVF_SAM.name, _inputs(httpclient, image, prompt))
    return result.as_numpy(MASK)[0], float(result.as_numpy(SCORE)[0, 0])


def assert_same_mask(served, reference_mask, reference_logits=None):
    assert served.shape == reference_mask.shape and served.dtype == np.uint8
    differing = served != reference_mask
    if reference_logits is None:
        assert differing.mean() < 1e-3
    else:  # only pixels on the decision boundary may flip (float rounding in a different op order)
        assert np.all(np.abs(reference_logits[differing]) < 1e-3), np.abs(reference_logits[differing]).max()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_masks_equal_pytorch_pipeline(triton_server, torch_pipeline, protocol):
    segment = grpc_segment if protocol == "grpc" else http_segment
    masks = []
    for (height, width), prompt, fmt in CASES:
        data = encode(scene(height, width, seed=height), fmt)
        mask, score = segment(triton_server, data, prompt.encode())
        reference = torch_pipeline(decode_image(data), prompt)
        assert_same_mask(mask, reference.mask, reference.logits)
        assert score == pytest.approx(reference.score, abs=1e-4)
        assert 0 < mask.mean() < 1  # the tiny checkpoint gives informative masks
        masks.append(mask)
    data = encode(scene(240, 320, seed=240), "JPEG")
    other, _ = segment(triton_server, data, b"the man in the red shirt")
    assert (other != masks[0]).any()  # the prompt changes the mask


def test_ensemble_contract_in_metadata(triton_server):
    metadata = httpclient.InferenceServerClient(triton_server.http_url).get_model_metadata(EVF_SAM.name)
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {IMAGE: "BYTES", PROMPT: "BYTES"}
    assert {o["name"]: o["datatype"] for o in metadata["outputs"]} == {MASK: "UINT8", SCORE: "FP32"}


def _bomb() -> bytes:
    return encode(np.zeros((7000, 7000), np.uint8), "PNG")  # 49 MP, ~50 KB compressed


def _oversized() -> bytes:
    rgb = np.random.default_rng(0).integers(0, 256, (3400, 3400, 3), dtype=np.uint8)
    return encode(rgb, "BMP")  # ~35 MB, over the 32 MiB default


GOOD_IMAGE = encode(scene(120, 160), "JPEG")
BAD_INPUTS = {
    "empty image": (lambda: b"", b"zebra", "image is empty"),
    "random bytes": (lambda: np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), b"zebra",
                     "not a recognised image format"),
    "truncated png": (lambda: encode(scene(200, 200), "PNG")[:500], b"zebra", "could not be decoded"),
    "truncated jpeg": (lambda: encode(scene(200, 200), "JPEG")[:900], b"zebra", "could not be decoded"),
    "text file": (lambda: b"%PDF-1.4 definitely not an image", b"zebra", "not a recognised image format"),
    "decompression bomb": (_bomb, b"zebra", "the limit is 40000000 pixels"),
    "oversized payload": (_oversized, b"zebra", "bytes; the limit is 33554432 bytes"),
    "empty prompt": (lambda: GOOD_IMAGE, b"", "prompt is empty"),
    "whitespace prompt": (lambda: GOOD_IMAGE, b" \t\n ", "prompt is empty"),
    "invalid utf-8": (lambda: GOOD_IMAGE, b"zebra \xff\xfe", "not valid UTF-8"),
    "100 KB prompt": (lambda: GOOD_IMAGE, b"zebra " * 17000, "the limit is 8192 bytes"),
    "too many tokens": (lambda: GOOD_IMAGE, ("zebra left " * 100).encode(), "tokens (with <s> and </s>); the limit is 128"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_input_gets_clear_error_and_server_stays_healthy(triton_server, case, protocol):
    make_image, prompt, expected = BAD_INPUTS[case]
    segment = grpc_segment if protocol == "grpc" else http_segment
    with pytest.raises(InferenceServerException) as info:
        segment(triton_server, make_image(), prompt)
    message = info.value.message()
    assert expected in message
    assert "Traceback" not in message and ".py" not in message and "/" not in message.split(expected)[0][-40:]
    if protocol == "grpc":
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    else:
        assert info.value.status() == "400"
    mask, _ = segment(triton_server, GOOD_IMAGE, b"zebra")  # the next good request succeeds
    assert mask.shape == (120, 160)


def test_wrong_dtype_shape_and_model_are_rejected(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    wrong_dtype = grpcclient.InferInput(IMAGE, [1, 1], "FP32")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 1), np.float32))
    _, prompt = _inputs(grpcclient, GOOD_IMAGE, b"zebra")
    with pytest.raises(InferenceServerException, match="data-type is .FP32., but model .evf_sam. expects .BYTES."):
        client.infer(EVF_SAM.name, [wrong_dtype, prompt])
    with pytest.raises(InferenceServerException, match="batch-size must be <= 1"):  # two images in one request
        client.infer(EVF_SAM.name, _two_images())
    with pytest.raises(InferenceServerException, match="unexpected shape|expected shape"):
        client.infer(EVF_SAM.name, _inputs(grpcclient, GOOD_IMAGE, b"zebra", prompt_shape=(1, 3)))
    with pytest.raises(InferenceServerException, match="not found|unknown"):
        client.infer("evf_sam_does_not_exist", _inputs(grpcclient, GOOD_IMAGE, b"zebra"))
    assert client.is_server_ready() and client.is_model_ready(EVF_SAM.name)


def _two_images():
    image = grpcclient.InferInput(IMAGE, [2, 1], "BYTES")
    image.set_data_from_numpy(np.array([[GOOD_IMAGE], [GOOD_IMAGE]], dtype=object))
    prompt = grpcclient.InferInput(PROMPT, [2, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"a"], [b"b"]], dtype=object))
    return [image, prompt]


def test_one_bad_request_in_a_concurrent_burst_fails_alone(triton_server, torch_pipeline):
    good = [(encode(scene(150 + 10 * i, 200, seed=i), "PNG"), f"object number {i}") for i in range(7)]
    reference = {i: torch_pipeline(decode_image(img), p) for i, (img, p) in enumerate(good)}
    requests = [(img, p.encode()) for img, p in good]
    requests.insert(3, (b"not an image", b"zebra"))

    def send(item):
        try:
            return grpc_segment(triton_server, *item)
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(send, requests))
    assert isinstance(results[3], InferenceServerException) and "not a recognised image" in results[3].message()
    answers = results[:3] + results[4:]
    for i, (mask, score) in enumerate(answers):
        assert_same_mask(mask, reference[i].mask, reference[i].logits)


REQUESTS_PER_CLIENT = 12  # each client goes through its four (image, prompt) pairs three times


def test_eight_clients_twelve_requests_each(triton_server, torch_pipeline):
    images = [encode(scene(100 + 20 * i, 140, seed=i), "JPEG") for i in range(4)]
    prompts = ["zebra top left", "a cat", "the second one from the right", "red"]
    expected = {(i, j): torch_pipeline(decode_image(images[i]), prompts[j]) for i in range(4) for j in range(4)}

    def client_loop(client_id):
        protocol = grpc_segment if client_id % 2 else http_segment
        failures = 0
        for n in range(REQUESTS_PER_CLIENT):
            i, j = (client_id + n) % 4, (client_id * 3 + n) % 4
            mask, score = protocol(triton_server, images[i], prompts[j].encode())
            reference = expected[(i, j)]
            failures += int(not np.all(np.abs(reference.logits[mask != reference.mask]) < 1e-3))
        return failures

    before = _ensemble_counts(triton_server)
    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client_loop, range(8))) == 0
    after = _ensemble_counts(triton_server)
    assert after["success"] - before["success"] == 8 * REQUESTS_PER_CLIENT
    assert after["fail"] == before["fail"]


def _ensemble_counts(server):
    stats = httpclient.InferenceServerClient(server.http_url).get_inference_statistics(EVF_SAM.name)
    inference = stats["model_stats"][0]["inference_stats"]
    return {key: int(inference[key]["count"]) for key in ("success", "fail")}


def test_failed_and_refused_requests_leave_nothing_in_flight(triton_server):
    """The drain counts every request in and out in one try/finally: a failure at any step (bad image,
    bad prompt, unknown key, output budget) never leaves a phantom that would delay a stop."""
    from evfsam.specs import PIPELINE_FINISHED_METRIC, PIPELINE_STARTED_METRIC
    from serving import metrics
    from tests.test_prompts_model import segment_many

    def counted():
        return metrics.totals(metrics.scrape(triton_server.metrics_url), (PIPELINE_STARTED_METRIC, PIPELINE_FINISHED_METRIC))

    _wait_until(lambda: triton_server.server.requests_in_flight() == 0, timeout=60)
    before = counted()
    for image, prompt in ((b"", b"zebra"), (GOOD_IMAGE, b""), (b"not an image", b"zebra")):
        with pytest.raises(InferenceServerException):
            grpc_segment(triton_server, image, prompt)
    for kwargs in ({"prompts": ["ok"], "key": "0" * 64}, {"prompts": ["x"] * 65, "image": GOOD_IMAGE}):
        with pytest.raises(InferenceServerException):
            segment_many(triton_server, **kwargs)
    after = counted()
    assert {name: after[name] - before[name] for name in after} == {PIPELINE_STARTED_METRIC: 5, PIPELINE_FINISHED_METRIC: 5}
    assert triton_server.server.requests_in_flight() == 0 and triton_server.server.drain(timeout=5)


def test_graceful_stop_finishes_requests_in_flight(model_repository, tiny_checkpoint, tmp_path):
    from tests.conftest import start_server

    running = start_server(model_repository, tiny_checkpoint, tmp_path / "tritonserver.log")
    results, errors = [], []
    started = threading.Barrier(7)

    def send(i):
        started.wait()
        try:
            results.append(grpc_segment(running, encode(scene(300, 400, seed=i), "PNG"), b"zebra"))
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    started.wait()
    _wait_until(lambda: running.server.requests_in_flight() >= 6)  # all six inside the server
    code = running.server.stop()
    for thread in threads:
        thread.join(60)
    assert not errors, [str(e) for e in errors]
    assert len(results) == 6
    assert code == 0


def _wait_until(condition, timeout=60.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.05)


def test_serve_command_stops_cleanly_on_sigterm(model_repository, tmp_path):
    """`make serve` runs `python -m serving.server`: SIGTERM drains in-flight requests, exits 0."""
    import os
    import signal
    import subprocess
    import sys

    from serving.server import free_ports

    http, grpc, metrics = free_ports(3)
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "serving.server", "--repository", str(model_repository),
                                "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                               stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        _wait_until_ready(f"http://127.0.0.1:{http}/v2/health/ready", process)

        class Urls:
            grpc_url = f"127.0.0.1:{grpc}"

        data = encode(scene(300, 400), "PNG")
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(grpc_segment, Urls, data, b"zebra") for _ in range(4)]
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            masks = [f.result()[0] for f in futures]
        assert all(m.shape == (300, 400) for m in masks)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert b"tritonserver stopped (exit code 0)" in (tmp_path / "serve.log").read_bytes()


def _wait_until_ready(url, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "serve command exited early"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("server not ready")


def test_serve_command_restarts_a_crashed_server(model_repository, tmp_path):
    """tritonserver 2.51 can crash on a cancelled gRPC request; `make serve` brings it back."""
    import os
    import signal
    import subprocess
    import sys

    from serving.server import free_ports

    http, grpc, metrics = free_ports(3)
    log_path = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "serving.server", "--repository", str(model_repository),
                                "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                               stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=dict(os.environ))
    ready = f"http://127.0.0.1:{http}/v2/health/ready"
    try:
        _wait_until_ready(ready, process)
        _wait_for_log(log_path, b"EVF-SAM is being served", process)  # the launcher saw it ready too
        server_pid = int(subprocess.run(["pgrep", "-P", str(process.pid), "tritonserver"],
                                        capture_output=True, text=True).stdout.split()[0])
        os.kill(server_pid, signal.SIGSEGV)
        time.sleep(2)
        _wait_until_ready(ready, process)

        class Urls:
            grpc_url = f"127.0.0.1:{grpc}"

        mask, _ = grpc_segment(Urls, GOOD_IMAGE, b"zebra")
        assert mask.shape == (120, 160)
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert b"restarting tritonserver" in log_path.read_bytes()


def _wait_for_log(path, text, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "serve command exited early"
        if text in path.read_bytes():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path}")
