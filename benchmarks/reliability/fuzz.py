"""Fuzz: generated requests (fixed seed) over HTTP and gRPC against `evf_sam` and `evf_sam_prompts`.

Categories (`CATEGORIES`, with their share of the requests):
* `image`:   real JPEG / PNG / WebP / GIF / TIFF files mutated: bit flips, truncation, header fields
             edited (huge or zero declared sizes over a tiny payload), splices, a format's magic
             followed by junk;
* `prompt`:  random and adversarial prompt bytes: invalid UTF-8, control characters, 100 KB, empty,
             whitespace only, right-to-left text, emoji, too many tokens;
* `tensor`:  wrong dtypes, shapes and element counts, missing and extra inputs, inconsistent BYTES
             serialisation, unknown outputs, and `evf_sam_prompts`' own contract errors;
* `http`:    malformed HTTP bodies: broken JSON, wrong JSON types, bad binary-data headers and sizes;
* `grpc`:    bytes that are not a ModelInferRequest sent to the gRPC method;
* `valid`:   well-formed requests, which must succeed.

Every case says what it expects: `ok`, `invalid` (a 4xx / INVALID_ARGUMENT) or `either` (a mutated
image may still decode).  Every answer is classified (`ok`, `4xx`, `5xx`, `no_answer`) and its error
message checked for a traceback or a file path; readiness is polled throughout.
"""
from __future__ import annotations

import http.client
import json
import random
import re
import struct
import threading
import time
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from evfsam.embedding_cache import image_key
from evfsam.processing import DEFAULT_MAX_IMAGE_PIXELS
from evfsam.specs import EVF_SAM, EVF_SAM_PROMPTS, MAX_PROMPTS_PER_REQUEST
from evfsam.tokenization import MAX_PROMPT_BYTES

from . import probes
from .inputs import PROMPT, encode, evf_sam_inputs, sample_rgb

OK, INVALID, EITHER = "ok", "invalid", "either"
ANSWER_OK, ANSWER_4XX, ANSWER_5XX, NO_ANSWER = "ok", "4xx", "5xx", "no_answer"
CATEGORIES = {"image": 0.22, "prompt": 0.26, "tensor": 0.24, "http": 0.16, "grpc": 0.04, "valid": 0.08}
PROTOCOLS = ("grpc", "http")
GRPC_CLIENT_ERRORS = ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "StatusCode.OUT_OF_RANGE",
                      "StatusCode.FAILED_PRECONDITION")
GRPC_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
TRACEBACK = re.compile(r"Traceback|File \"")
FILE_PATH = re.compile(r"(?:^|[\s'\"(=:])/(?:[\w.@+-]+/)+[\w.@+-]+|\.py\b")
REQUEST_TIMEOUT_S = 300.0


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: Tuple[int, ...]
    value: Optional[np.ndarray] = None
    raw: Optional[bytes] = None  # sent as the tensor's content as it is (inconsistent on purpose)


@dataclass
class Case:
    category: str
    kind: str
    model: str
    expect: str
    protocol: str = "grpc"  # grpc | http (tensor-level cases); raw HTTP / gRPC cases send bytes
    tensors: List[Tensor] = field(default_factory=list)
    outputs: Optional[List[str]] = None
    http_body: Optional[bytes] = None
    http_headers: Dict[str, str] = field(default_factory=dict)
    grpc_body: Optional[bytes] = None


@dataclass
class Answer:
    kind: str  # ok | 4xx | 5xx | no_answer
    status: str
    message: str = ""


# ---- images ------------------------------------------------------------------------------------------

def image_corpus() -> Dict[str, bytes]:
    """Small real files of each format, cut from assets/sample.jpg."""
    rgb = sample_rgb().resize((96, 64), Image.BILINEAR)
    return {"JPEG": encode(rgb, "JPEG", quality=85), "PNG": encode(rgb, "PNG"), "WEBP": encode(rgb, "WEBP"),
            "GIF": encode(rgb.convert("P"), "GIF"), "TIFF": encode(rgb, "TIFF")}


def bit_flips(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(len(out))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def splice(data: bytes, other: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))] + other[rng.randrange(len(other)):]


def magic_junk(data: bytes, rng: random.Random) -> bytes:
    return data[:16] + rng.randbytes(rng.randint(0, 2048))


def set_declared_size(fmt: str, data: bytes, width: int, height: int) -> Optional[bytes]:
    """The file with its header's width / height replaced (the pixel data left as it is)."""
    out = bytearray(data)
    if fmt == "JPEG":
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = data.find(marker)
            if at >= 0:
                struct.pack_into(">HH", out, at + 5, min(height, 65535), min(width, 65535))
                return bytes(out)
        return None
    if fmt == "PNG":  # IHDR data at 16, its CRC at 29: recomputed, so only the sizes are wrong
        struct.pack_into(">II", out, 16, min(width, 2**31 - 1), min(height, 2**31 - 1))
        struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])) & 0xFFFFFFFF)
        return bytes(out)
    if fmt == "GIF":  # the logical screen and the first image descriptor
        struct.pack_into("<HH", out, 6, min(width, 65535), min(height, 65535))
        at = data.find(b"\x2c", 13)
        if at >= 0 and at + 9 <= len(out):
            struct.pack_into("<HH", out, at + 5, min(width, 65535), min(height, 65535))
        return bytes(out)
    if fmt == "TIFF":  # ImageWidth (256) and ImageLength (257) of the first IFD, little-endian
        (offset,) = struct.unpack_from("<I", data, 4)
        (entries,) = struct.unpack_from("<H", data, offset)
        for index in range(entries):
            entry = offset + 2 + 12 * index
            tag, kind = struct.unpack_from("<HH", data, entry)
            if tag in (256, 257):
                value = width if tag == 256 else height
                if kind == 3:
                    struct.pack_into("<H", out, entry + 8, min(value, 65535))
                else:
                    struct.pack_into("<I", out, entry + 8, min(value, 2**32 - 1))
        return bytes(out)
    if fmt == "WEBP":  # lossy VP8: 14-bit sizes after the key-frame start code
        at = data.find(b"\x9d\x01\x2a")
        if at < 0:
            return None
        struct.pack_into("<HH", out, at + 3, min(width, 16383), min(height, 16383))
        return bytes(out)
    return None


# Declared sizes: over the pixel limit (refused from the header), zero, and big-but-allowed over a tiny payload.
HUGE_SIZES = ((65535, 65535), (100_000, 100_000), (7000, 7000))
ZERO_SIZES = ((0, 64), (96, 0))
ALLOWED_SIZES = ((2000, 1500), (4000, 40))


class CaseGenerator:
    def __init__(self, seed: int, corpus: Dict[str, bytes], good_image: bytes):
        self.rng = random.Random(seed)
        self.corpus = corpus
        self.good_image = good_image
        self.good_key = image_key(good_image).encode()
        self.builders: Dict[str, Callable[[], Case]] = {
            "image": self.image_case, "prompt": self.prompt_case, "tensor": self.tensor_case,
            "http": self.http_case, "grpc": self.grpc_case, "valid": self.valid_case}

    def cases(self, count: int) -> List[Case]:
        names, weights = zip(*CATEGORIES.items())
        made = []
        for index in range(count):
            case = self.builders[self.rng.choices(names, weights)[0]]()
            if case.http_body is None and case.grpc_body is None:
                case.protocol = PROTOCOLS[index % 2]
            made.append(case)
        return made

    # -- image bytes --
    def image_case(self) -> Case:
        rng = self.rng
        fmt = rng.choice(sorted(self.corpus))
        data = self.corpus[fmt]
        mutation = rng.choice(("bit_flips", "truncate", "header_size", "splice", "magic_junk"))
        expect = EITHER
        if mutation == "bit_flips":
            data = bit_flips(data, rng)
        elif mutation == "truncate":
            data = truncate(data, rng)
        elif mutation == "splice":
            data = splice(data, self.corpus[rng.choice(sorted(self.corpus))], rng)
        elif mutation == "magic_junk":
            data = magic_junk(data, rng)
        else:
            group = rng.choices((HUGE_SIZES, ZERO_SIZES, ALLOWED_SIZES), (0.6, 0.25, 0.15))[0]
            width, height = rng.choice(group)
            edited = set_declared_size(fmt, data, width, height)
            data = edited if edited is not None else data
            if edited is not None and width * height > DEFAULT_MAX_IMAGE_PIXELS:
                expect = INVALID
            mutation = f"header_size_{'huge' if group is HUGE_SIZES else 'zero' if group is ZERO_SIZES else 'allowed'}"
        if fmt == "GIF" and expect == EITHER:
            expect = INVALID  # OpenCV here decodes no GIF: a GIF is refused whatever its state
        return self._served("image", f"{fmt.lower()}_{mutation}", expect, image=data, prompts=[PROMPT.encode()])

    # -- prompt bytes --
    def prompt_case(self) -> Case:
        kind, prompt, expect = self.rng.choice(PROMPT_KINDS)(self.rng)
        return self._served("prompt", kind, expect, image=self.good_image, prompts=[prompt])

    def _served(self, category: str, kind: str, expect: str, image: bytes, prompts: List[bytes]) -> Case:
        """An `evf_sam` or an `evf_sam_prompts` request (the fuzzed prompt among valid ones)."""
        if self.rng.random() < 0.5:
            return Case(category, kind, EVF_SAM.name, expect, tensors=[
                Tensor("image", "BYTES", (1, 1), _objects([image], (1, 1))),
                Tensor("prompt", "BYTES", (1, 1), _objects(prompts[:1], (1, 1)))])
        others = [PROMPT.encode()] * self.rng.randint(0, 2)
        everything = others + prompts
        self.rng.shuffle(everything)
        mask_format = self.rng.choice((b"rle", b"png", b"raw", None))
        tensors = [Tensor("image", "BYTES", (1,), _objects([image], (1,))),
                   Tensor("prompts", "BYTES", (len(everything),), _objects(everything, (len(everything),)))]
        if mask_format is not None:
            tensors.append(Tensor("mask_format", "BYTES", (1,), _objects([mask_format], (1,))))
        return Case(category, kind, EVF_SAM_PROMPTS.name, expect, tensors=tensors)

    # -- tensors --
    def tensor_case(self) -> Case:
        kind, model, tensors, outputs = self.rng.choice(TENSOR_KINDS)(self)
        return Case("tensor", kind, model, INVALID, tensors=tensors, outputs=outputs)

    # -- raw HTTP --
    def http_case(self) -> Case:
        kind, model, body, headers = self.rng.choice(HTTP_KINDS)(self)
        return Case("http", kind, model, INVALID, protocol="http", http_body=body, http_headers=headers)

    # -- raw gRPC --
    def grpc_case(self) -> Case:
        rng = self.rng
        valid = _serialised_grpc_request(self.good_image)
        kind, body = rng.choice((("random_bytes", rng.randbytes(rng.randint(1, 512))),
                                 ("truncated_request", valid[: rng.randrange(1, len(valid))]),
                                 ("flipped_request", bit_flips(valid, rng))))
        return Case("grpc", kind, EVF_SAM.name, EITHER if kind == "flipped_request" else INVALID,
                    protocol="grpc", grpc_body=body)

    # -- valid --
    def valid_case(self) -> Case:
        rng = self.rng
        choice = rng.randrange(3)
        if choice == 0:
            return self._served("valid", "good_request", OK, image=self.good_image, prompts=[PROMPT.encode()])
        prompts = [p.encode() for p in rng.sample(VALID_PROMPTS, rng.randint(1, 3))]
        if choice == 1:
            return self._served("valid", "good_prompts", OK, image=self.good_image, prompts=prompts)
        return Case("valid", "good_image_key", EVF_SAM_PROMPTS.name, OK, tensors=[
            Tensor("image_key", "BYTES", (1,), _objects([self.good_key], (1,))),
            Tensor("prompts", "BYTES", (len(prompts),), _objects(prompts, (len(prompts),))),
            Tensor("mask_format", "BYTES", (1,), _objects([b"rle"], (1,)))])


def _objects(values: Sequence[bytes], shape: Tuple[int, ...]) -> np.ndarray:
    return np.array(list(values), dtype=np.object_).reshape(shape)


VALID_PROMPTS = ["zebra top left", "the red ball", "left one", "a cat on the mat", "שמאל", "النمر على اليسار",
                 "🦓 zebra", "zebra\u202eleft", "  padded prompt  ", "ZEBRA"]


def _p_empty(rng):
    return "empty", b"", INVALID


def _p_whitespace(rng):
    spaces = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\u3000", "\u00a0", "\u2003"]
    return "whitespace_only", "".join(rng.choice(spaces) for _ in range(rng.randint(1, 40))).encode(), INVALID


def _p_invalid_utf8(rng):
    bad = rng.choice([b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80"])
    text = PROMPT.encode()
    at = rng.randrange(len(text) + 1)
    return "invalid_utf8", text[:at] + bad + text[at:], INVALID


def _p_control(rng):
    controls = "".join(chr(rng.choice(list(range(0, 32)) + [127])) for _ in range(rng.randint(1, 20)))
    return "control_chars", ("zebra " + controls + " left").encode(), OK


def _p_only_controls(rng):
    return "only_control_chars", "".join(chr(rng.randint(1, 8)) for _ in range(rng.randint(1, 20))).encode(), EITHER


def _p_random(rng):
    return "random_bytes", rng.randbytes(rng.randint(1, 64)), EITHER


def _p_100kb(rng):
    return "100_kb", (b"zebra " * 17_067)[:100_000], INVALID


def _p_over_limit(rng):
    return "over_byte_limit", b"a" * (MAX_PROMPT_BYTES + rng.randint(1, 64)), INVALID


def _p_many_tokens(rng):
    return "too_many_tokens", " ".join(rng.choice(["zebra", "left", "red", "ball"]) for _ in range(300)).encode(), INVALID


def _p_rtl(rng):
    return "rtl", rng.choice(["النمر على اليسار", "הזברה משמאל", "\u202eleft zebra", "zebra \u200fשמאל"]).encode(), OK


def _p_emoji(rng):
    return "emoji", rng.choice(["🦓", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag on the left", "zebra 🦓🦓🦓"]).encode(), OK


def _p_zalgo(rng):
    marks = "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(rng.randint(1, 12)))
    return "combining_marks", ("z" + marks + "ebra").encode(), EITHER


PROMPT_KINDS = [_p_empty, _p_whitespace, _p_invalid_utf8, _p_control, _p_only_controls, _p_random, _p_100kb,
                _p_over_limit, _p_many_tokens, _p_rtl, _p_emoji, _p_zalgo]


def _image(gen, shape=(1, 1)):
    return Tensor("image", "BYTES", shape, _objects([gen.good_image] * int(np.prod(shape)), shape))


def _prompt(shape=(1, 1), name="prompt"):
    return Tensor(name, "BYTES", shape, _objects([PROMPT.encode()] * int(np.prod(shape)), shape))


def _t_wrong_image_dtype(gen):
    dtype = gen.rng.choice([("FP32", np.float32), ("INT32", np.int32), ("UINT8", np.uint8), ("BOOL", np.bool_)])
    return "image_dtype_" + dtype[0], EVF_SAM.name, [Tensor("image", dtype[0], (1, 1), np.zeros((1, 1), dtype[1])),
                                                     _prompt()], None


def _t_wrong_prompt_dtype(gen):
    return "prompt_dtype_INT64", EVF_SAM.name, [_image(gen), Tensor("prompt", "INT64", (1, 1), np.ones((1, 1), np.int64))], None


def _t_image_shape(gen):
    shape = gen.rng.choice([(1, 2), (2, 1), (1,), (1, 1, 1), (0, 1), (3, 2)])
    return f"image_shape_{'x'.join(map(str, shape))}", EVF_SAM.name, [_image(gen, shape), _prompt()], None


def _t_missing(gen):
    keep = gen.rng.choice(["image", "prompt"])
    return f"only_{keep}", EVF_SAM.name, [_image(gen) if keep == "image" else _prompt()], None


def _t_extra(gen):
    return "extra_input", EVF_SAM.name, [_image(gen), _prompt(), Tensor("mask_format", "BYTES", (1, 1),
                                                                       _objects([b"rle"], (1, 1)))], None


def _t_bad_bytes_serialisation(gen):
    raw = gen.rng.choice([b"\xff\xff\xff\x7f" + b"abcd", b"\x05\x00\x00\x00ab", b"\x01\x00", b""])
    return "bytes_length_prefix", EVF_SAM.name, [Tensor("image", "BYTES", (1, 1), raw=raw), _prompt()], None


def _t_unknown_output(gen):
    return "unknown_output", EVF_SAM.name, [_image(gen), _prompt()], ["not_an_output"]


def _t_prompts_count(gen):
    count = gen.rng.choice([0, MAX_PROMPTS_PER_REQUEST + 1, 500])
    return f"prompts_{count}", EVF_SAM_PROMPTS.name, [_image(gen, (1,)), _prompt((count,), "prompts")], None


def _t_prompts_rank(gen):
    return "prompts_rank2", EVF_SAM_PROMPTS.name, [_image(gen, (1,)), _prompt((2, 2), "prompts")], None


def _t_image_and_key(gen):
    both = gen.rng.random() < 0.5
    tensors = [_prompt((1,), "prompts")]
    if both:
        tensors += [_image(gen, (1,)), Tensor("image_key", "BYTES", (1,), _objects([gen.good_key], (1,)))]
    return ("image_and_key" if both else "neither_image_nor_key"), EVF_SAM_PROMPTS.name, tensors, None


def _t_bad_key(gen):
    key = gen.rng.choice([b"0" * 64, b"\xff\xfe" * 10, b"../../etc/passwd", b"k" * 100_000, b""])
    return "unknown_image_key", EVF_SAM_PROMPTS.name, [Tensor("image_key", "BYTES", (1,), _objects([key], (1,))),
                                                       _prompt((1,), "prompts")], None


def _t_mask_format(gen):
    value = gen.rng.choice([b"jpeg", b"ra w", b"\xff", b"r" * 5000, b"rle\x00"])  # case and outer spaces are forgiven
    return "bad_mask_format", EVF_SAM_PROMPTS.name, [_image(gen, (1,)), _prompt((1,), "prompts"),
                                                     Tensor("mask_format", "BYTES", (1,), _objects([value], (1,)))], None


def _t_two_images(gen):
    return "two_images", EVF_SAM_PROMPTS.name, [_image(gen, (2,)), _prompt((1,), "prompts")], None


TENSOR_KINDS = [_t_wrong_image_dtype, _t_wrong_prompt_dtype, _t_image_shape, _t_missing, _t_extra,
                _t_bad_bytes_serialisation, _t_unknown_output, _t_prompts_count, _t_prompts_rank, _t_image_and_key,
                _t_bad_key, _t_mask_format, _t_two_images]


def _json_input(name, shape, datatype, data=None, parameters=None):
    entry = {"name": name, "shape": shape, "datatype": datatype}
    if data is not None:
        entry["data"] = data
    if parameters is not None:
        entry["parameters"] = parameters
    return entry


def _h_broken_json(gen):
    body = gen.rng.choice([b"{", b"", b"null", b"[]", b'{"inputs": 5}', b'{"inputs": [5]}', b'{"inputs": [{}]}',
                           b"\xff\xfe{}", b'{"inputs": "' + b"a" * 10_000 + b'"}', b"[" * 100_000 + b"]" * 100_000,
                           b'{"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["\\ud800"]}]}'])
    return "broken_json", EVF_SAM.name, body, {}


def _h_json_types(gen):
    rng = gen.rng
    image = rng.choice([
        _json_input("image", [1, -1], "BYTES", ["a"]), _json_input("image", [1, 10**12], "BYTES", ["a"]),
        _json_input("image", [1, 1], "FOO", ["a"]), _json_input("image", [1, 1], "BYTES", [1.5]),
        _json_input("image", [1, 1], "BYTES", [["a", "b"]]), _json_input("image", [1, 1], "BYTES", ["a", "b", "c"]),
        _json_input("image", "1x1", "BYTES", ["a"]), _json_input("image", [1, 1], "BYTES", None),
        _json_input("image", [1, 1], "BYTES", ["a"], {"binary_data_size": -1})])
    body = json.dumps({"inputs": [image, _json_input("prompt", [1, 1], "BYTES", [PROMPT])]}).encode()
    return "json_types", EVF_SAM.name, body, {}


def _h_binary_header(gen):
    rng = gen.rng
    declared = rng.choice([0, 3, 10**6, len(gen.good_image) + 4 + rng.randint(1, 100)])
    header = json.dumps({"inputs": [
        _json_input("image", [1, 1], "BYTES", parameters={"binary_data_size": declared}),
        _json_input("prompt", [1, 1], "BYTES", [PROMPT])]}).encode()
    payload = struct.pack("<I", len(gen.good_image)) + gen.good_image
    header_length = rng.choice([str(len(header)), str(len(header) + 7), "-1", "0", "abc", str(10**9)])
    return "binary_data_header", EVF_SAM.name, header + payload, {"Inference-Header-Content-Length": header_length}


def _h_content_encoding(gen):
    return "content_encoding", EVF_SAM.name, gen.rng.randbytes(64), {"Content-Encoding": gen.rng.choice(["gzip", "deflate"])}


HTTP_KINDS = [_h_broken_json, _h_json_types, _h_binary_header, _h_content_encoding]


def _serialised_grpc_request(image: bytes) -> bytes:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=EVF_SAM.name)
    for name, value in (("image", image), ("prompt", PROMPT.encode())):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(struct.pack("<I", len(value)) + value)
        del tensor
    return request.SerializeToString()


# ---- sending --------------------------------------------------------------------------------------------

class Sender:
    """Sends cases; one gRPC client and channel per thread.  HTTP goes through `http.client` with
    tritonclient's own request encoding (its HTTP client is gevent-based and not for threads)."""

    def __init__(self, http_url: str, grpc_url: str):
        self.http_url, self.grpc_url = http_url, grpc_url
        self.local = threading.local()

    def _clients(self):
        if not hasattr(self.local, "grpc"):
            self.local.grpc = grpcclient.InferenceServerClient(self.grpc_url)
            self.local.channel = grpc.insecure_channel(self.grpc_url)
        return self.local

    def send(self, case: Case) -> Answer:
        try:
            if case.http_body is not None:
                return self._post(case.model, case.http_body, case.http_headers)[0]
            if case.grpc_body is not None:
                return self._raw_grpc(case)
            return self._tensors(case)
        except (OSError, http.client.HTTPException) as exc:
            return Answer(NO_ANSWER, type(exc).__name__, str(exc)[:300])

    def _tensors(self, case: Case) -> Answer:
        module = grpcclient if case.protocol == "grpc" else httpclient
        inputs = []
        for t in case.tensors:
            tensor = module.InferInput(t.name, list(t.shape), t.datatype)
            if t.raw is not None:
                _set_raw(tensor, t.raw, case.protocol)
            else:
                tensor.set_data_from_numpy(t.value)
            inputs.append(tensor)
        outputs = [module.InferRequestedOutput(name) for name in case.outputs] if case.outputs else None
        if case.protocol == "http":
            body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
            headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
            answer, result = self._post(case.model, body, headers)
            return answer if result is None else _check_result(case, result)
        try:
            result = self._clients().grpc.infer(case.model, inputs, outputs=outputs, client_timeout=REQUEST_TIMEOUT_S)
        except InferenceServerException as exc:
            return _error_answer(str(exc.status()), exc.message() or "")
        return _check_result(case, result)

    def _post(self, model: str, body: bytes, headers: Dict[str, str]):
        """(answer, the parsed result of a success or None)."""
        host, port = self.http_url.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)
        try:
            connection.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            header_length = response.getheader("Inference-Header-Content-Length")
        finally:
            connection.close()
        if response.status == 200:
            result = httpclient.InferenceServerClient.parse_response_body(
                payload, header_length=None if header_length is None else int(header_length))
            return Answer(ANSWER_OK, "200"), result
        try:
            message = json.loads(payload).get("error", "")
        except (ValueError, AttributeError):
            message = payload[:300].decode(errors="replace")
        return _error_answer(str(response.status), message), None

    def _raw_grpc(self, case: Case) -> Answer:
        call = self._clients().channel.unary_unary(GRPC_INFER_METHOD, request_serializer=None,
                                                   response_deserializer=None)
        try:
            call(case.grpc_body, timeout=REQUEST_TIMEOUT_S)
            return Answer(ANSWER_OK, "StatusCode.OK")
        except grpc.RpcError as exc:
            return _error_answer(str(exc.code()), exc.details() or "")


def _set_raw(tensor, raw: bytes, protocol: str) -> None:
    """Content sent as it is, bypassing tritonclient's serialisation (which would make it consistent)."""
    if protocol == "grpc":
        tensor._raw_content = raw
    else:
        tensor._raw_data = raw
        tensor._parameters["binary_data_size"] = len(raw)


def _error_answer(status: str, message: str) -> Answer:
    if status.isdigit():
        kind = ANSWER_4XX if 400 <= int(status) < 500 else ANSWER_5XX
    elif status in GRPC_CLIENT_ERRORS:
        kind = ANSWER_4XX
    elif status == "StatusCode.DEADLINE_EXCEEDED":
        kind = NO_ANSWER
    else:
        kind = ANSWER_5XX
    return Answer(kind, status, message[:400])


def _check_result(case: Case, result) -> Answer:
    """A success must carry well-formed outputs (binary 0/1 masks, one per prompt)."""
    if case.model == EVF_SAM.name:
        mask = result.as_numpy("mask")
        good = mask is not None and mask.ndim == 3 and mask.dtype == np.uint8 and mask.max(initial=0) <= 1
    else:
        scores = result.as_numpy("scores")
        masks, encoded = result.as_numpy("masks"), result.as_numpy("masks_encoded")
        prompts = next(t for t in case.tensors if t.name == "prompts").shape[0]
        shaped = masks if masks is not None else encoded
        good = scores is not None and shaped is not None and len(scores) == prompts == len(shaped)
    return Answer(ANSWER_OK, "ok") if good else Answer(ANSWER_5XX, "malformed_success", "outputs not as the contract says")


def leaks(message: str) -> bool:
    return bool(TRACEBACK.search(message) or FILE_PATH.search(message))


def as_expected(case: Case, answer: Answer) -> bool:
    if case.expect == OK:
        return answer.kind == ANSWER_OK
    if case.expect == INVALID:
        return answer.kind == ANSWER_4XX
    return answer.kind in (ANSWER_OK, ANSWER_4XX)


# ---- running ---------------------------------------------------------------------------------------------

def run(http_url: str, grpc_url: str, count: int, seed: int = 11, workers: int = 4,
        stub_check: Optional[Callable[[], List[str]]] = None) -> Dict[str, object]:
    corpus = image_corpus()
    good_image = corpus["JPEG"]
    # the good image is cached first: the prompt cases cost one BEiT-3 and one decoder call each
    grpcclient.InferenceServerClient(grpc_url).infer(EVF_SAM.name, evf_sam_inputs(grpcclient, good_image, PROMPT.encode()))
    cases = CaseGenerator(seed, corpus, good_image).cases(count)
    sender = Sender(http_url, grpc_url)
    started = time.monotonic()
    with probes.ReadinessPoller(http_url) as readiness, ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(sender.send, cases))
    seconds = time.monotonic() - started
    report = summarise(cases, answers)
    report.update({"requests": len(cases), "seed": seed, "workers": workers, "seconds": round(seconds, 1),
                   "readiness": readiness.summary(), "ready_after": probes.server_ready(http_url),
                   "dead_stubs_after": stub_check() if stub_check else None})
    return report


def summarise(cases: Sequence[Case], answers: Sequence[Answer]) -> Dict[str, object]:
    by_category: Dict[str, Counter] = defaultdict(Counter)
    by_kind: Dict[str, Counter] = defaultdict(Counter)
    messages: Counter = Counter()
    problems: List[Dict[str, str]] = []
    for case, answer in zip(cases, answers):
        counts = by_category[case.category]
        counts["requests"] += 1
        counts[answer.kind] += 1
        counts[case.protocol] += 1
        by_kind[f"{case.category}/{case.kind}"][answer.kind] += 1
        expected, leaked = as_expected(case, answer), leaks(answer.message)
        if not expected:
            counts["unexpected"] += 1
        if leaked:
            counts["leaks"] += 1
        if answer.message:
            messages[f"{answer.status}: {_generic(answer.message)}"] += 1
        if (not expected or leaked) and len(problems) < 40:
            problems.append({"category": case.category, "kind": case.kind, "model": case.model,
                             "protocol": case.protocol, "expect": case.expect, "answer": answer.kind,
                             "status": answer.status, "message": answer.message[:300]})
    totals = Counter()
    for counts in by_category.values():
        totals.update(counts)
    return {"totals": dict(totals), "by_category": {k: dict(v) for k, v in sorted(by_category.items())},
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "problems": problems, "distinct_messages": len(messages),
            "top_messages": [{"count": n, "message": m} for m, n in messages.most_common(40)]}


def _generic(message: str) -> str:
    """A message with its numbers blanked, so that messages of one kind count together."""
    return re.sub(r"\d+", "N", message)[:160]
