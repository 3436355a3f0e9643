"""Client library pieces that need no tritonserver: images, contract checks, error translation,
overlay and RLE, and the failure modes a client meets without any server (nothing listening, a
server that never answers)."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clients import (
    AsyncSegmentationClient,
    ContractMismatch,
    InvalidImage,
    InvalidInput,
    ModelUnavailable,
    RequestTimeout,
    SegmentationClient,
    ServerError,
    ServerUnreachable,
)
from clients import UnknownImageKey
from clients.client import image_or_key, prompt_chunks
from clients.contract import (
    build_prompts_inputs,
    check_metadata,
    check_prompts,
    parse_prompts_result,
    parse_result,
    wire_datatype,
    wire_shape,
)
from clients.errors import one_line, translate_errors, unknown_image_key
from clients.images import decode_rgb, encode_image
from clients.masks import overlay, rle_decode, rle_encode, viewable
from clients.transport import normalise_url
from evfsam.specs import EVF_SAM, EVF_SAM_PROMPTS, MAX_PROMPTS_PER_REQUEST
from tests.images import encode, scene

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("grpc", "http")


# ---------------------------------------------------------------- images


def test_paths_and_bytes_are_sent_unchanged(tmp_path):
    data = encode(scene(30, 40), "JPEG", quality=90)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    assert encode_image(str(path)) == data
    assert encode_image(path) == data
    assert encode_image(data) == data
    assert encode_image(bytearray(data)) == data


@pytest.mark.parametrize("as_pil", [False, True])
def test_arrays_and_pil_images_are_encoded_losslessly(as_pil):
    rgb = scene(33, 47, seed=3)
    image = Image.fromarray(rgb) if as_pil else rgb
    np.testing.assert_array_equal(decode_rgb(encode_image(image)), rgb)


def test_grey_and_rgba_inputs_become_what_the_server_decodes():
    grey = scene(20, 30)[:, :, 0]
    np.testing.assert_array_equal(decode_rgb(encode_image(grey)), np.repeat(grey[:, :, None], 3, axis=2))
    rgba = Image.fromarray(np.dstack([scene(20, 30), np.full((20, 30), 7, np.uint8)]), "RGBA")
    np.testing.assert_array_equal(decode_rgb(encode_image(rgba)), np.asarray(rgba)[:, :, :3])


@pytest.mark.parametrize(
    "image, message",
    [
        ("/no/such/image.jpg", "image file not found: /no/such/image.jpg"),
        (b"", "image bytes is empty"),
        (np.zeros((4, 4, 3), np.float32), "image array must be uint8, got float32"),
        (np.zeros((4, 4, 4), np.uint8), "image array must be [H, W, 3] RGB or [H, W] grey, got shape (4, 4, 4)"),
        (np.zeros((0, 4, 3), np.uint8), "image array is empty: shape (0, 4, 3)"),
        (12, "unsupported image type int"),
    ],
)
def test_bad_images_fail_with_a_clear_message(image, message):
    with pytest.raises(InvalidImage) as error:
        encode_image(image)
    assert str(error.value).startswith(message)
    assert error.value.exit_code == 2


def test_a_directory_is_not_an_image(tmp_path):
    with pytest.raises(InvalidImage, match="is a directory"):
        encode_image(tmp_path)


# ---------------------------------------------------------------- contract


def served_metadata(spec=EVF_SAM):
    """Model metadata as tritonserver reports it for a model built from `spec`."""

    def entries(tensors):
        return [{"name": t.name, "datatype": wire_datatype(t), "shape": wire_shape(t)} for t in tensors]

    return {"name": spec.name, "versions": ["1"], "platform": "ensemble",
            "inputs": entries(spec.inputs), "outputs": entries(spec.outputs)}


def test_wire_names_of_the_contract():
    assert [wire_datatype(t) for t in EVF_SAM.inputs + EVF_SAM.outputs] == ["BYTES", "BYTES", "UINT8", "FP32"]
    assert [wire_shape(t) for t in EVF_SAM.inputs + EVF_SAM.outputs] == [[-1, 1], [-1, 1], [-1, -1, -1], [-1, 1]]


def test_matching_metadata_passes():
    check_metadata(served_metadata())


def _altered(kind, index, **changes):
    metadata = served_metadata()
    metadata[kind][index] = {**metadata[kind][index], **changes}
    return metadata


@pytest.mark.parametrize(
    "metadata, expected",
    [
        (_altered("inputs", 0, datatype="UINT8"),
         f"input {EVF_SAM.inputs[0].name!r} has datatype UINT8, expected BYTES"),
        (_altered("outputs", 0, shape=[-1, 256, 256]),
         f"output {EVF_SAM.outputs[0].name!r} has shape [-1, 256, 256], expected [-1, -1, -1]"),
        (_altered("inputs", 1, name="text"),
         f"missing input {EVF_SAM.inputs[1].name!r}; unexpected input 'text'"),
        (_altered("outputs", 1, datatype="FP16"),
         f"output {EVF_SAM.outputs[1].name!r} has datatype FP16, expected FP32"),
    ],
)
def test_every_difference_is_named(metadata, expected):
    with pytest.raises(ContractMismatch) as error:
        check_metadata(metadata)
    assert str(error.value) == f"served model {EVF_SAM.name!r} does not match the client contract: {expected}"
    assert error.value.exit_code == 5


def test_extra_outputs_are_allowed():
    metadata = served_metadata()
    metadata["outputs"].append({"name": "logits", "datatype": "FP32", "shape": [-1, -1, -1]})
    check_metadata(metadata)


class FakeResult:
    def __init__(self, **arrays):
        self.arrays = arrays

    def as_numpy(self, name):
        return self.arrays.get(name)


MASK, SCORE = (t.name for t in EVF_SAM.outputs)


def test_results_are_parsed_into_a_segmentation():
    mask = np.zeros((1, 5, 7), np.uint8)
    mask[0, 1:3, 2:6] = 1
    result = parse_result(FakeResult(**{MASK: mask, SCORE: np.array([[0.75]], np.float32)}), "cat")
    assert result.prompt == "cat" and result.score == 0.75 and result.area == 8
    np.testing.assert_array_equal(result.mask, mask[0])


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({MASK: np.zeros((1, 5, 7), np.float32), SCORE: np.zeros((1, 1), np.float32)},
         f"output {MASK!r} is float32 with shape [1, 5, 7], expected uint8"),
        ({SCORE: np.zeros((1, 1), np.float32)}, f"the response has no output {MASK!r}"),
        ({MASK: np.full((1, 5, 7), 255, np.uint8), SCORE: np.zeros((1, 1), np.float32)},
         f"output {MASK!r} must hold 0/1 values, found 255"),
        ({MASK: np.zeros((2, 5, 7), np.uint8), SCORE: np.zeros((2, 1), np.float32)},
         f"expected one {MASK!r} and one {SCORE!r} per request"),
    ],
)
def test_malformed_results_are_contract_mismatches(arrays, message):
    with pytest.raises(ContractMismatch) as error:
        parse_result(FakeResult(**arrays), "cat")
    assert str(error.value).startswith(message)


def test_prompts_must_be_text():
    from clients.contract import build_inputs
    import tritonclient.grpc as grpcclient

    with pytest.raises(InvalidInput, match="prompt must be a str, got bytes"):
        build_inputs(grpcclient, b"image", b"cat")


# ---------------------------------------------------------------- many-prompts contract


PROMPTS_IMAGE, PROMPTS_KEY, PROMPTS_PROMPTS, PROMPTS_FORMAT = (t.name for t in EVF_SAM_PROMPTS.inputs)
PROMPTS_MASKS, PROMPTS_SCORES, PROMPTS_KEY_OUT, PROMPTS_HIT, PROMPTS_ENCODED = (t.name for t in EVF_SAM_PROMPTS.outputs)


def test_many_prompts_metadata_is_checked():
    check_metadata(served_metadata(EVF_SAM_PROMPTS), EVF_SAM_PROMPTS)
    with pytest.raises(ContractMismatch, match=f"missing input {PROMPTS_KEY!r}"):
        check_metadata(served_metadata(EVF_SAM), EVF_SAM_PROMPTS)


@pytest.mark.parametrize("module", [grpcclient, httpclient])
def test_many_prompts_requests_follow_the_spec(module):
    by_image = build_prompts_inputs(module, ["a cat", "café"], image=b"jpeg bytes")
    assert [(i.name(), i.datatype(), i.shape()) for i in by_image] == [
        (PROMPTS_IMAGE, "BYTES", [1]), (PROMPTS_PROMPTS, "BYTES", [2])]
    by_key = build_prompts_inputs(module, ["x"], image_key="ab" * 32)
    assert [(i.name(), i.shape()) for i in by_key] == [(PROMPTS_KEY, [1]), (PROMPTS_PROMPTS, [1])]
    compact = build_prompts_inputs(module, ["x"], image=b"x", mask_format="rle")
    assert [(i.name(), i.shape()) for i in compact] == [(PROMPTS_IMAGE, [1]), (PROMPTS_PROMPTS, [1]), (PROMPTS_FORMAT, [1])]
    with pytest.raises(InvalidInput, match="mask_format must be one of raw, rle, png, got 'jpeg'"):
        build_prompts_inputs(module, ["x"], image=b"x", mask_format="jpeg")
    with pytest.raises(InvalidInput, match="exactly one of an image and an image key"):
        build_prompts_inputs(module, ["x"], image=b"x", image_key="k")
    with pytest.raises(InvalidInput, match="prompt must be a str, got bytes"):
        build_prompts_inputs(module, [b"x"], image=b"x")


def test_segment_prompts_arguments_are_checked():
    assert image_or_key(b"img", None) == (b"img", None) and image_or_key(None, "k") == (None, "k")
    with pytest.raises(InvalidInput, match="give an image, or the image_key of one sent before"):
        image_or_key(None, None)
    with pytest.raises(InvalidInput, match="give an image or an image_key, not both"):
        image_or_key(b"img", "k")
    with pytest.raises(InvalidInput, match="image_key must be a non-empty str"):
        image_or_key(None, b"k")
    with pytest.raises(InvalidInput, match="prompts must be a sequence of str, got a single str"):
        check_prompts("a cat")
    assert [len(chunk) for chunk in prompt_chunks(["p"] * (2 * MAX_PROMPTS_PER_REQUEST + 1))] == [
        MAX_PROMPTS_PER_REQUEST, MAX_PROMPTS_PER_REQUEST, 1]


def test_many_prompts_results_are_parsed_in_order_with_the_key():
    masks = np.zeros((2, 5, 7), np.uint8)
    masks[1, 1:3, 2:6] = 1
    common = {PROMPTS_SCORES: np.array([0.25, 0.75], np.float32), PROMPTS_KEY_OUT: np.array([b"abc"], dtype=object),
              PROMPTS_HIT: np.array([True])}
    first, second = parse_prompts_result(FakeResult(**{PROMPTS_MASKS: masks}, **common), ["a", "b"])
    assert (first.prompt, first.score, first.area, first.image_key, first.cache_hit) == ("a", 0.25, 0, "abc", True)
    assert (second.prompt, second.score, second.area, second.image_key) == ("b", 0.75, 8, "abc")
    with pytest.raises(ContractMismatch, match="expected 3 masks and 3 scores, one image_key and one cache_hit"):
        parse_prompts_result(FakeResult(**{PROMPTS_MASKS: masks}, **common), ["a", "b", "c"])


@pytest.mark.parametrize("mask_format", ["rle", "png"])
def test_encoded_masks_are_decoded_and_kept(mask_format):
    from evfsam.mask_codecs import encode_mask

    masks = np.zeros((2, 5, 7), np.uint8)
    masks[1, 1:3, 2:6] = 1
    encoded = np.array([encode_mask(m, mask_format) for m in masks], dtype=object)
    result = FakeResult(**{PROMPTS_ENCODED: encoded, PROMPTS_SCORES: np.array([0.25, 0.75], np.float32),
                           PROMPTS_KEY_OUT: np.array([b"abc"], dtype=object), PROMPTS_HIT: np.array([False])})
    first, second = parse_prompts_result(result, ["a", "b"], mask_format=mask_format)
    np.testing.assert_array_equal(second.mask, masks[1])
    assert (second.encoded_mask, second.mask_format, second.cache_hit) == (encoded[1], mask_format, False)
    corrupt = FakeResult(**{PROMPTS_ENCODED: np.array([b"{}", b"{}"], dtype=object), PROMPTS_SCORES: np.zeros(2, np.float32),
                            PROMPTS_KEY_OUT: np.array([b"abc"], dtype=object), PROMPTS_HIT: np.array([False])})
    with pytest.raises(ContractMismatch, match=f"the server sent a {mask_format} mask that does not decode"):
        parse_prompts_result(corrupt, ["a", "b"], mask_format=mask_format)


@pytest.mark.parametrize("status", ["StatusCode.INVALID_ARGUMENT", "400"])
def test_a_refused_image_key_is_an_unknown_image_key(status):
    server_message = "unknown image_key 'k': never sent or evicted; send the image bytes"
    error = unknown_image_key(ServerError("the server failed the request: ...", server_message, status), "k")
    assert type(error) is UnknownImageKey and isinstance(error, ServerError) and error.exit_code == 6
    assert (error.image_key, error.server_message, error.status) == ("k", server_message, status)
    other = ServerError("the server failed the request: prompt 0: prompt is empty", "prompt 0: prompt is empty", status)
    assert unknown_image_key(other, "k") is other


# ---------------------------------------------------------------- error translation


TIMED_OUT = "no answer from the Triton server at host:1 over grpc within 2.5 s"


def _translated(exc, model=None):
    with pytest.raises(Exception) as error:
        with translate_errors("host:1", "grpc", 2.5, model):
            raise exc
    return error.value


@pytest.mark.parametrize(
    "raised, expected_type, expected_message",
    [
        (InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"), RequestTimeout,
         TIMED_OUT),
        (InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE"), ServerUnreachable,
         "cannot reach the Triton server at host:1 over grpc: failed to connect"),
        (ConnectionRefusedError(111, "Connection refused"), ServerUnreachable,
         "cannot reach the Triton server at host:1 over grpc: [Errno 111] Connection refused"),
        (TimeoutError("timed out"), RequestTimeout, TIMED_OUT),
        (asyncio.TimeoutError(), RequestTimeout, TIMED_OUT),
        (InferenceServerException("prompt is too long\n  File x.py, line 3\n", status="400"),
         ServerError,
         "the server failed the request: prompt is too long"),
    ],
)
def test_failures_are_translated(raised, expected_type, expected_message):
    error = _translated(raised)
    assert type(error) is expected_type
    assert str(error) == expected_message


def test_a_failed_metadata_request_means_the_model_is_not_served():
    error = _translated(InferenceServerException("Request for unknown model: 'x' is not found", status="400"), "x")
    assert type(error) is ModelUnavailable
    assert str(error) == (
        "the server at host:1 does not serve a ready model 'x': Request for unknown model: 'x' is not found"
    )


def test_a_server_error_keeps_the_full_server_message():
    error = _translated(InferenceServerException("first line\nsecond line", status="StatusCode.INVALID_ARGUMENT"))
    assert error.server_message == "first line\nsecond line"
    assert error.status == "StatusCode.INVALID_ARGUMENT"


def test_other_exceptions_pass_through():
    assert type(_translated(KeyError("bug"))) is KeyError


def test_one_line():
    assert one_line("\n\n  Traceback (most recent call last):\n  File 'x'") == "Traceback (most recent call last):"
    assert one_line("x" * 600).endswith("...") and len(one_line("x" * 600)) == 500


def test_urls_are_normalised():
    assert normalise_url("http://127.0.0.1:8000/") == "127.0.0.1:8000"
    assert normalise_url("grpc://host:8001") == "host:8001"
    with pytest.raises(InvalidInput, match="the server URL is empty"):
        normalise_url("http://")


def test_protocol_and_concurrency_are_checked():
    with pytest.raises(InvalidInput, match="unknown protocol 'ftp'; expected one of grpc, http"):
        SegmentationClient("127.0.0.1:1", protocol="ftp")
    with pytest.raises(InvalidInput, match="concurrency must be a positive integer, got 0"):
        AsyncSegmentationClient("127.0.0.1:1", concurrency=0)
    with pytest.raises(InvalidInput, match="timeout must be a positive number of seconds, got -1"):
        SegmentationClient("127.0.0.1:1", timeout=-1)


# ---------------------------------------------------------------- overlay, RLE


def test_overlay_is_upstreams_drawing():
    rgb = scene(24, 31, seed=5)
    mask = np.zeros((24, 31), np.uint8)
    mask[3:15, 4:20] = 1
    # upstream inference.py, verbatim in numpy
    pred_mask = mask > 0
    expected = rgb.copy()
    expected[pred_mask] = (
        rgb * 0.5 + pred_mask[:, :, None].astype(np.uint8) * np.array([50, 120, 220]) * 0.5
    )[pred_mask]
    np.testing.assert_array_equal(overlay(rgb, mask), expected)
    assert np.array_equal(overlay(rgb, mask)[~pred_mask], rgb[~pred_mask])


def test_overlay_refuses_a_mask_of_another_size():
    with pytest.raises(ValueError, match="mask 5x4 does not match image 31x24"):
        overlay(scene(24, 31), np.zeros((4, 5), np.uint8))


def test_rle_round_trip_is_cocos():
    mask = (scene(40, 50, seed=2)[:, :, 0] > 120).astype(np.uint8)
    rle = rle_encode(mask)
    assert rle["size"] == [40, 50] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(rle_decode(rle), mask)
    assert coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode()}) == mask.sum()


def test_viewable_mask_is_0_or_255():
    assert set(np.unique(viewable(np.array([[0, 1], [1, 0]], np.uint8)))) == {0, 255}


# ---------------------------------------------------------------- no server at all


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SilentServer:
    """Accepts connections and never answers a byte: a server that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for connection in self.connections:
            connection.close()


class HangingUpServer(SilentServer):
    """Reads the request, then closes the connection without a reply."""

    def _accept(self):
        while True:
            try:
                connection = self.sock.accept()[0]
            except OSError:
                return
            connection.recv(65536)
            connection.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def hanging_up_server():
    server = HangingUpServer()
    yield server
    server.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nothing_listening_is_unreachable(protocol):
    url = f"127.0.0.1:{closed_port()}"
    with pytest.raises(ServerUnreachable) as error:
        SegmentationClient(url, protocol=protocol, timeout=5)
    assert str(error.value).startswith(f"cannot reach the Triton server at {url} over {protocol}: ")
    assert error.value.exit_code == 3


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nothing_listening_is_unreachable_async(protocol):
    url = f"127.0.0.1:{closed_port()}"

    async def connect():
        async with AsyncSegmentationClient(url, protocol=protocol, timeout=5):
            pass

    with pytest.raises(ServerUnreachable, match=f"cannot reach the Triton server at {url} over {protocol}: "):
        asyncio.run(connect())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_that_never_answers_times_out(protocol, silent_server):
    with pytest.raises(RequestTimeout) as error:
        SegmentationClient(silent_server.url, protocol=protocol, timeout=0.5)
    assert str(error.value) == f"no answer from the Triton server at {silent_server.url} over {protocol} within 0.5 s"
    assert error.value.exit_code == 4


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_that_never_answers_times_out_async(protocol, silent_server):
    async def connect():
        async with AsyncSegmentationClient(silent_server.url, protocol=protocol, timeout=0.5):
            pass

    with pytest.raises(RequestTimeout, match="within 0.5 s"):
        asyncio.run(connect())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_that_hangs_up_is_unreachable(protocol, hanging_up_server):
    with pytest.raises(ServerUnreachable, match=f"{hanging_up_server.url} "):
        SegmentationClient(hanging_up_server.url, protocol=protocol, timeout=5)

    async def connect():
        async with AsyncSegmentationClient(hanging_up_server.url, protocol=protocol, timeout=5):
            pass

    with pytest.raises(ServerUnreachable, match=f"{hanging_up_server.url} "):
        asyncio.run(connect())


def run_cli(module, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_cli_unreachable_server_exits_3(tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes(encode(scene(20, 30)))
    url = f"127.0.0.1:{closed_port()}"
    done = run_cli("clients.segment", "--url", url, "--protocol", "http", "--image", str(image), "--prompt", "x",
                   "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 3
    assert done.stderr.startswith(f"error: cannot reach the Triton server at {url} over http: ")
    assert done.stderr.count("\n") == 1 and done.stdout == ""


def test_cli_silent_server_exits_4(tmp_path, silent_server):
    image = tmp_path / "scene.png"
    image.write_bytes(encode(scene(20, 30)))
    done = run_cli("clients.segment", "--url", silent_server.url, "--image", str(image), "--prompt", "x",
                   "--timeout", "0.5", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 4
    assert done.stderr == f"error: no answer from the Triton server at {silent_server.url} over grpc within 0.5 s\n"


def test_cli_missing_image_exits_2(tmp_path):
    done = run_cli("clients.segment", "--url", "127.0.0.1:1", "--image", str(tmp_path / "nope.jpg"), "--prompt", "x")
    assert done.returncode == 2
    assert done.stderr == f"error: image file not found: {tmp_path / 'nope.jpg'}\n"


def test_cli_usage_errors_exit_2():
    done = run_cli("clients.segment", "--url", "127.0.0.1:1", "--image", "x.jpg")
    assert done.returncode == 2 and "--prompt" in done.stderr


def test_cli_bad_option_values_exit_2(tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes(encode(scene(20, 30)))
    done = run_cli("clients.segment", "--url", "127.0.0.1:1", "--image", str(image), "--prompt", "x",
                   "--concurrency", "0")
    assert (done.returncode, done.stderr) == (2, "error: concurrency must be a positive integer, got 0\n")
    done = run_cli("clients.segment", "--url", "127.0.0.1:1", "--image", str(image), "--prompt", "x",
                   "--timeout", "0")
    assert (done.returncode, done.stderr) == (2, "error: timeout must be a positive number of seconds, got 0.0\n")
