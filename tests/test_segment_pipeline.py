"""The served pipeline (model_repository/segment.py) against a stand-in for Triton's python-backend API:
how it builds its BLS requests and what it does when a step fails or the client goes away.

The real server runs the same code in tests/test_serving.py and test_prompts_model.py; what those
cannot show on a CPU-only pip tritonserver is that every BLS request asks for its outputs in CPU
memory (on GPU engines the outputs would otherwise stay on the GPU, where `as_numpy()` fails), and
the failure paths that need a fault at an exact step.  Here Triton's runtime is replaced, never the
pipeline under test.
"""
from __future__ import annotations

import asyncio
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from evfsam.specs import BEIT3_FUSION_ENCODER, IMAGE_CACHE_NAME, PROMPT_MASK_DECODER, SAM_IMAGE_ENCODER
from tests.images import encode, scene

MEMORY_CPU, MEMORY_GPU = 0, 2


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message, code=1):
        self._message, self._code = message, code

    def message(self):
        return self._message

    def code(self):
        return self._code


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class Response:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self.error_value = list(output_tensors), error

    def has_error(self):
        return self.error_value is not None

    def error(self):
        return self.error_value


class PreferredMemory:
    def __init__(self, kind, device_id):
        self.kind, self.device_id = kind, device_id


class Runtime:
    """Plays the other models: records every BLS request and answers it with `answer(request)`."""

    def __init__(self):
        self.requests = []
        self.answer = None

    def module(self):
        runtime = self

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs, timeout=0, preferred_memory=None):
                self.model_name, self.outputs, self.timeout = model_name, requested_output_names, timeout
                self.inputs = {t.name(): t.as_numpy() for t in inputs}
                self.preferred_memory = preferred_memory

            async def async_exec(self, decoupled=False):
                runtime.requests.append(self)
                response = runtime.answer(self)
                if asyncio.iscoroutine(response):  # a model that takes its time
                    response = await response
                return [response] if decoupled else response

        module = types.ModuleType("triton_python_backend_utils")
        module.InferenceRequest = InferenceRequest
        module.InferenceResponse = Response
        module.Tensor = Tensor
        module.TritonError = TritonError
        module.PreferredMemory = PreferredMemory
        module.TRITONSERVER_MEMORY_CPU, module.TRITONSERVER_MEMORY_GPU = MEMORY_CPU, MEMORY_GPU
        module.get_output_tensor_by_name = lambda r, name: next((t for t in r.output_tensors if t.name() == name), None)
        module.get_input_tensor_by_name = module.get_output_tensor_by_name
        module.Logger = types.SimpleNamespace(log_error=lambda *a: None, log_info=lambda *a: None)
        return module


@pytest.fixture
def runtime(monkeypatch):
    runtime = Runtime()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", runtime.module())
    path = Path(__file__).resolve().parent.parent / "model_repository" / "segment.py"
    spec = importlib.util.spec_from_file_location("segment_under_test", path)
    segment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(segment)
    runtime.segment = segment
    return runtime


def pipeline(runtime):
    from evfsam.model_config import InputLimits, PipelineSettings

    limits = InputLimits("tokenizer.json", 128, 32 * 1024**2, 40_000_000)
    return runtime.segment.Pipeline(PipelineSettings("evf_sam_prompts", "ori", "ori", 5.0), limits)


def job(runtime, image, prompts=1, mask_format="raw"):
    from evfsam.embedding_cache import image_key

    return runtime.segment.Job(image, image_key(image), [[0, 5, 2]] * prompts, mask_format, (60, 80))


def healthy(request, fail_at=None, code=TritonError.INTERNAL):
    """What the other models answer: the cache hands out a claim, the engines well-shaped outputs."""
    if request.model_name == fail_at:
        return Response(error=TritonError(f"{fail_at} broke", code))
    if request.model_name == IMAGE_CACHE_NAME:
        op = request.inputs["op"][0].decode()
        return Response([Tensor("status", np.array([b"claimed" if op == "get" else b"ok"], dtype=object))])
    n = request.inputs.get("text_embeds", request.inputs.get("input_ids", np.zeros((1,))))
    outputs = {
        SAM_IMAGE_ENCODER.name: [Tensor("image_embeddings", np.zeros((1, 256, 64, 64), np.float32))],
        BEIT3_FUSION_ENCODER.name: [Tensor("text_embeds", np.zeros((len(n), 1, 256), np.float32))],
        PROMPT_MASK_DECODER.name: [Tensor("low_res_masks", np.ones((len(n), 1, 256, 256), np.float32)),
                                   Tensor("iou_predictions", np.full((len(n), 1), 0.5, np.float32))],
    }[request.model_name]
    return Response(outputs)


IMAGE = encode(scene(60, 80), "PNG")


def test_every_bls_request_asks_for_cpu_memory_and_has_a_timeout(runtime):
    runtime.answer = healthy
    result = asyncio.run(pipeline(runtime).segment(job(runtime, IMAGE, prompts=3), lambda: False))
    assert result.masks.shape == (3, 60, 80) and result.masks.all() and not result.cache_hit
    models = [r.model_name for r in runtime.requests]
    assert models.count(SAM_IMAGE_ENCODER.name) == 1 and PROMPT_MASK_DECODER.name in models
    for request in runtime.requests:
        assert request.preferred_memory is not None and request.preferred_memory.kind == MEMORY_CPU, request.model_name
        if request.model_name != IMAGE_CACHE_NAME:
            assert request.timeout == 5_000_000
    decoder = next(r for r in runtime.requests if r.model_name == PROMPT_MASK_DECODER.name)
    assert decoder.inputs["image_embeddings"].shape[0] == 1 and decoder.inputs["text_embeds"].shape[0] == 3


@pytest.mark.parametrize("code, error", [(TritonError.INTERNAL, "EngineFailure"), (TritonError.UNAVAILABLE, "Unavailable")])
def test_a_failed_encoder_releases_the_claim(runtime, code, error):
    runtime.answer = lambda request: healthy(request, fail_at=SAM_IMAGE_ENCODER.name, code=code)
    with pytest.raises(getattr(runtime.segment, error)):
        asyncio.run(pipeline(runtime).segment(job(runtime, IMAGE), lambda: False))
    cache_ops = [r.inputs["op"][0].decode() for r in runtime.requests if r.model_name == IMAGE_CACHE_NAME]
    assert cache_ops == ["get", "release"]  # never "put", and the waiting requests are let go


def test_a_bad_image_releases_the_claim_and_is_the_clients_error(runtime):
    runtime.answer = healthy
    broken = IMAGE[:60]
    with pytest.raises(runtime.segment.InvalidImage):
        asyncio.run(pipeline(runtime).segment(job(runtime, broken), lambda: False))
    assert [r.inputs["op"][0].decode() for r in runtime.requests] == ["get", "release"]


def test_a_cancelled_request_stops_before_the_encoder(runtime):
    runtime.answer = healthy
    calls = iter([False, True])  # the client leaves after the cache answered
    with pytest.raises(runtime.segment.Cancelled):
        asyncio.run(pipeline(runtime).segment(job(runtime, IMAGE), lambda: next(calls, True)))
    models = [r.model_name for r in runtime.requests]
    assert SAM_IMAGE_ENCODER.name not in models and models[-1] == IMAGE_CACHE_NAME
    assert runtime.requests[-1].inputs["op"][0] == b"release"


def test_the_output_budget_is_checked_before_anything_is_asked(runtime):
    runtime.answer = healthy
    big = runtime.segment.Job(IMAGE, "k" * 64, [[0, 2]] * 64, "raw", (6000, 6600))
    with pytest.raises(runtime.segment.InvalidRequest, match="2534400000 mask pixels; the limit for raw masks"):
        asyncio.run(pipeline(runtime).segment(big, lambda: False))
    assert runtime.requests == []


def test_a_request_waiting_for_an_encoder_slot_leaves_when_its_client_goes(runtime):
    """The cache holds the claim back (every encoder slot taken); the client goes meanwhile: the request
    ends at once as cancelled, without running anything, and the claim granted later is handed back."""
    async def scenario():
        slot_free = asyncio.Event()

        async def answer(request):
            if request.model_name == IMAGE_CACHE_NAME and request.inputs["op"][0] == b"get":
                await slot_free.wait()
            return healthy(request)

        runtime.answer = answer
        client_gone = False
        served = asyncio.ensure_future(pipeline(runtime).segment(job(runtime, IMAGE), lambda: client_gone))
        await asyncio.sleep(0.2)
        assert not served.done()  # waiting for a slot, client still there
        client_gone = True
        await asyncio.wait({served}, timeout=1.0)
        assert served.done() and isinstance(served.exception(), runtime.segment.Cancelled)
        assert [r.inputs["op"][0] for r in runtime.requests] == [b"get"]
        slot_free.set()  # the cache grants the claim to the request that has gone
        await asyncio.sleep(0.1)
        assert [r.inputs["op"][0] for r in runtime.requests] == [b"get", b"release"]
        assert SAM_IMAGE_ENCODER.name not in [r.model_name for r in runtime.requests]

    asyncio.run(scenario())
