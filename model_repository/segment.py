"""Triton python model serving `evf_sam` and `evf_sam_prompts`: one pipeline, two contracts.

Per request: validate and tokenize every prompt and check the output budget (nothing is computed for
a request that will be refused); ask `image_feature_cache` for the image's features.  On a hit, go on;
on a miss this request owns the image (the cache lets only as many requests own images at once as the
image encoder runs; the others wait there, and leave as soon as their client has gone): decode it, make the SAM and BEiT-3 views, and run the SAM
image encoder and BEiT-3 *concurrently* (BLS), then hand the features to the cache (which passes them
to any request that waited for the same image).  Then the mask decoder, one call per 16 prompts with
the image's features broadcast, and the masks at the original size (raw, COCO RLE or PNG).

Every call to another model has a timeout; a request whose client has gone (cancelled) stops at the
next step; one bad request gets its own INVALID_ARG and never fails another; "started"/"finished"
counters (one try/finally per request) let the launcher drain before stopping.  Contracts:
`evfsam.specs.EVF_SAM` and `EVF_SAM_PROMPTS`; settings: `evfsam.model_config.PipelineSettings`.
"""
import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import triton_python_backend_utils as pb_utils

from evfsam.embedding_cache import image_key
from evfsam.model_config import InputLimits, PipelineSettings, config_parameters
from evfsam.mask_codecs import encode_mask
from evfsam.processing import (InvalidImage, MaskResizer, beit3_view, checked_image_size, decode_image,
                               masks_to_original, sam_view)
from evfsam.recipes import get_recipe
from evfsam.specs import (CACHE_CLAIMED, CACHE_GET, CACHE_HIT, CACHE_PUT, CACHE_RELEASE, EVF_SAM, EVF_SAM_PROMPTS,
                          IMAGE_CACHE_NAME, MASK_FORMATS, MAX_PROMPTS_PER_REQUEST, PIPELINE_FINISHED_METRIC,
                          PIPELINE_STARTED_METRIC, RAW_MASKS, cache_entry_tensors, family)
from evfsam.tokenization import InvalidPrompt, decode_prompt, pad_batch



CANCEL_POLL_S = 0.05  # how often a request waiting for an encoder slot checks that its client is still there


class InvalidRequest(ValueError):
    """The client's request cannot be served as sent (INVALID_ARG)."""


class Unavailable(RuntimeError):
    """Another model refused or timed out (overload): the client may retry (UNAVAILABLE)."""


class Cancelled(RuntimeError):
    """The client went away; nothing more is computed for it."""


class EngineFailure(RuntimeError):
    """Another model failed; logged server-side, reported without detail."""


@dataclass
class Job:
    image: Optional[bytes]  # the encoded image, or None when only a key was sent
    key: str
    prompt_ids: List[List[int]]
    mask_format: str
    header_size: Optional[Tuple[int, int]]  # (H, W) read from the image header, when bytes were sent


@dataclass
class Result:
    masks: Optional[np.ndarray]  # uint8 [N, H, W] for raw masks
    encoded: Optional[List[bytes]]  # one encoded mask per prompt for the compact formats
    scores: np.ndarray  # float32 [N]
    key: str
    cache_hit: bool


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        self.name = config["name"]
        self.settings = PipelineSettings.from_parameters(params)
        self.limits = InputLimits.from_parameters(params)
        self.tokenizer = self.limits.tokenizer(Path(args["model_repository"]) / args["model_version"])
        self.contract = CONTRACTS[self.settings.contract](self.limits)
        self.pipeline = Pipeline(self.settings, self.limits)
        # Triton invalidates a Metric whose MetricFamily is garbage collected: keep the families.
        self.metric_families = [
            pb_utils.MetricFamily(name=PIPELINE_STARTED_METRIC, description="requests that entered the pipeline",
                                  kind=pb_utils.MetricFamily.COUNTER),
            pb_utils.MetricFamily(name=PIPELINE_FINISHED_METRIC, description="requests that left the pipeline",
                                  kind=pb_utils.MetricFamily.COUNTER),
        ]
        self.started, self.finished = (f.Metric(labels={"model": self.name}) for f in self.metric_families)
        if args.get("model_instance_name", "").endswith("_0"):  # once per model, not per instance
            served = {k: params[k] for k in ("checkpoint", "checkpoint_sha256", "family", "recipe") if k in params}
            pb_utils.Logger.log_info(f"{self.name} serves {json.dumps(served)}")

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._respond(request) for request in requests)))

    async def _respond(self, request):
        self.started.increment(1)
        try:
            job = self.contract.parse(request, self.tokenizer)
            result = await self.pipeline.segment(job, request.is_cancelled)
            return self.contract.response(result)
        except (InvalidImage, InvalidPrompt, InvalidRequest) as exc:
            return _error(str(exc), pb_utils.TritonError.INVALID_ARG)
        except Unavailable as exc:
            return _error(str(exc), pb_utils.TritonError.UNAVAILABLE)
        except Cancelled:
            return _error("request cancelled", _cancelled_code())
        except EngineFailure as exc:
            return _error(str(exc), pb_utils.TritonError.INTERNAL)
        except Exception as exc:  # never leak a traceback or a path to the client
            pb_utils.Logger.log_error(f"{self.name} failed: {type(exc).__name__}: {exc}")
            return _error("internal error", pb_utils.TritonError.INTERNAL)
        finally:
            self.finished.increment(1)


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _cancelled_code():
    return getattr(pb_utils.TritonError, "CANCELLED", pb_utils.TritonError.UNAVAILABLE)


class Pipeline:
    def __init__(self, settings: PipelineSettings, limits: InputLimits):
        self.family = family(settings.family)
        self.recipe = get_recipe(settings.recipe)
        self.limits = limits
        self.image_limits = limits.image_limits()
        self.timeout_s = settings.bls_timeout_s
        self.entry_tensors = cache_entry_tensors(self.family)
        self.rows = min(self.family.prompt_encoder.max_rows, self.family.mask_decoder.max_rows)
        # Engines on a GPU leave their outputs there unless asked: every output this model reads with
        # numpy is requested in CPU memory.
        self.cpu_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        self.cleanups = set()

    async def segment(self, job: Job, cancelled) -> Result:
        if job.header_size is not None:
            self.check_budget(len(job.prompt_ids), job.header_size, job.mask_format)
        _stop_if(cancelled)
        status, entry = await self.cache_get(job.key, job.image is not None, cancelled)
        if status == CACHE_HIT:
            original = tuple(int(v) for v in entry["original_size"])
            self.check_budget(len(job.prompt_ids), original, job.mask_format)
            _stop_if(cancelled)
            text_embeds = await self.encode_prompts(entry["images_evf"], job.prompt_ids)
        elif status == CACHE_CLAIMED:
            entry, text_embeds = await self.encode_owned(job, cancelled)
        else:
            raise InvalidRequest(f"unknown image_key {job.key[:80]!r}: never sent or evicted; send the image bytes")
        _stop_if(cancelled)
        low_res, scores = await self.decode_masks(entry, text_embeds)
        _stop_if(cancelled)
        masks, encoded = await asyncio.to_thread(self.masks_at_original_size, low_res, entry, job.mask_format)
        return Result(masks, encoded, scores, job.key, status == CACHE_HIT)

    def check_budget(self, prompts: int, size: Tuple[int, int], mask_format: str) -> None:
        raw = mask_format == RAW_MASKS
        limit = self.limits.max_output_pixels if raw else self.limits.max_encoded_output_pixels
        pixels = prompts * size[0] * size[1]
        if pixels > limit:
            hint = "send fewer prompts per request or ask for mask_format 'rle' or 'png'" if raw else \
                "send fewer prompts per request or a smaller image"
            raise InvalidRequest(f"{prompts} prompts x {size[1]}x{size[0]} pixels = {pixels} mask pixels; the limit "
                                 f"for {mask_format} masks is {limit}: {hint}")

    async def encode_owned(self, job: Job, cancelled):
        """This request claimed the image: compute its entry, store it, and encode the prompts meanwhile."""
        try:
            _stop_if(cancelled)
            rgb = await asyncio.to_thread(decode_image, job.image, self.image_limits)
            self.check_budget(len(job.prompt_ids), rgb.shape[:2], job.mask_format)
            views = await asyncio.to_thread(self.views, rgb)
            _stop_if(cancelled)
            text_task = asyncio.ensure_future(self.encode_prompts(views["images_evf"], job.prompt_ids))
            try:
                features = await self.infer(self.family.image_encoder.name, {"images": views.pop("sam_view")},
                                            [t.name for t in self.family.image_features])
            except BaseException:
                await _settle(text_task)
                raise
            entry = {**views, **{name: np.array(value) for name, value in features.items()}}
            await self.cache_call(CACHE_PUT, job.key, entry)
        except BaseException:
            await _shielded(self.cache_call(CACHE_RELEASE, job.key))
            raise
        return entry, await text_task

    def views(self, rgb):
        sam, resized = sam_view(rgb, self.recipe)
        return {"sam_view": sam[None], "images_evf": beit3_view(rgb, recipe=self.recipe)[None],
                "original_size": np.array(rgb.shape[:2], dtype=np.int64),
                "resized_size": np.array(resized, dtype=np.int64)}

    async def encode_prompts(self, images_evf, prompt_ids):
        spec = self.family.prompt_encoder
        calls = []
        for start in range(0, len(prompt_ids), self.rows):
            input_ids, attention_mask = pad_batch(prompt_ids[start:start + self.rows])
            rows = len(input_ids)
            calls.append(self.infer(spec.name, {"images_evf": np.repeat(images_evf, rows, axis=0), "input_ids": input_ids,
                                                "attention_mask": attention_mask}, spec.output_names))
        outputs = await asyncio.gather(*calls)
        return np.concatenate([o["text_embeds"] for o in outputs])

    async def decode_masks(self, entry, text_embeds):
        spec = self.family.mask_decoder
        features = {t.name: entry[t.name] for t in self.family.image_features}
        calls = [self.infer(spec.name, {**features, "text_embeds": text_embeds[start:start + self.rows]}, spec.output_names)
                 for start in range(0, len(text_embeds), self.rows)]
        outputs = await asyncio.gather(*calls)
        low_res = np.concatenate([o["low_res_masks"] for o in outputs])
        scores = np.concatenate([o["iou_predictions"] for o in outputs])[:, 0].astype(np.float32)
        return low_res, scores

    def masks_at_original_size(self, low_res, entry, mask_format):
        original = tuple(int(v) for v in entry["original_size"])
        resized = tuple(int(v) for v in entry["resized_size"])
        if mask_format == RAW_MASKS:
            return masks_to_original(low_res, resized, original, self.recipe).view(np.uint8), None
        resizer = MaskResizer(resized, original, self.recipe)  # one mask at a time: never N full masks
        return None, [encode_mask(resizer.binary(mask[0]), mask_format) for mask in low_res]

    async def cache_get(self, key: str, claim: bool, cancelled):
        """Look the image up; a claim may wait for an encoder slot (the cache's admission control).
        Meanwhile this request's client is watched: when it goes, the request leaves, and a claim
        granted after that is handed back at once."""
        inputs = [_bytes_tensor("op", CACHE_GET), _bytes_tensor("image_key", key),
                  pb_utils.Tensor("claim", np.array([claim], dtype=bool))]
        call = asyncio.ensure_future(self._cache_exec(inputs))
        try:
            response = await self._within_timeout(call, IMAGE_CACHE_NAME, cancelled)
        except BaseException:
            if claim:
                call.add_done_callback(lambda done: self._hand_back_late_claim(done, key))
            raise
        status = _status(response)
        entry = None
        if status == CACHE_HIT:
            entry = {t.name: pb_utils.get_output_tensor_by_name(response, t.name).as_numpy() for t in self.entry_tensors}
        return status, entry

    def _hand_back_late_claim(self, call, key: str) -> None:
        if call.cancelled() or call.exception() is not None or _status(call.result()) != CACHE_CLAIMED:
            return
        task = asyncio.ensure_future(_shielded(self.cache_call(CACHE_RELEASE, key)))
        self.cleanups.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.cleanups.discard)

    async def cache_call(self, op: str, key: str, entry=None):
        inputs = [_bytes_tensor("op", op), _bytes_tensor("image_key", key)]
        if entry is not None:
            inputs += [pb_utils.Tensor(t.name, np.ascontiguousarray(entry[t.name], dtype=t.np_dtype))
                       for t in self.entry_tensors]
        _status(await self._within_timeout(asyncio.ensure_future(self._cache_exec(inputs)), IMAGE_CACHE_NAME))

    async def _cache_exec(self, inputs):
        request = pb_utils.InferenceRequest(model_name=IMAGE_CACHE_NAME, requested_output_names=[], inputs=inputs,
                                            preferred_memory=self.cpu_memory)
        responses = await request.async_exec(decoupled=True)
        # The cache sends exactly one response, with the final flag: iterating does not block.
        response = next(iter(responses), None)
        if response is None or response.has_error():
            message = response.error().message() if response is not None else "no response"
            pb_utils.Logger.log_error(f"{IMAGE_CACHE_NAME} failed: {message}")
            raise EngineFailure("the image feature cache failed")
        return response

    async def infer(self, model: str, inputs, output_names):
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=list(output_names),
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
            timeout=int(self.timeout_s * 1e6), preferred_memory=self.cpu_memory)
        response = await self._within_timeout(asyncio.ensure_future(request.async_exec()), model)
        if response.has_error():
            error = response.error()
            if error.code() in (pb_utils.TritonError.UNAVAILABLE, _cancelled_code()):
                raise Unavailable(f"{model} is overloaded or stopping ({error.message()}); retry later")
            pb_utils.Logger.log_error(f"{model} failed: {error.message()}")
            raise EngineFailure(f"{model} failed")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in output_names}

    async def _within_timeout(self, task: asyncio.Future, model: str, cancelled=None):
        """Wait at most the BLS timeout, and only while the client is there when `cancelled` is given;
        a call left behind finishes on its own (never cancelled)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while not task.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(f"{model} did not answer within {self.timeout_s:.0f} s")
            await asyncio.wait({task}, timeout=remaining if cancelled is None else min(remaining, CANCEL_POLL_S))
            if cancelled is not None and not task.done():
                _stop_if(cancelled)
        return task.result()


def _stop_if(cancelled):
    if cancelled():
        raise Cancelled()


async def _settle(task):
    try:
        await task
    except BaseException:
        pass


async def _shielded(coroutine):
    """Run a clean-up call to the end even if this request is being torn down; its failure is logged."""
    try:
        await asyncio.shield(coroutine)
    except BaseException as exc:
        pb_utils.Logger.log_error(f"cache clean-up failed: {type(exc).__name__}: {exc}")


def _status(response) -> str:
    value = pb_utils.get_output_tensor_by_name(response, "status").as_numpy().reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes_tensor(name: str, value: str):
    return pb_utils.Tensor(name, np.array([value.encode("utf-8")], dtype=np.object_))


# ---- the two contracts ------------------------------------------------------------------------------

class SinglePromptContract:
    """`evf_sam`: image [1,1] + prompt [1,1] -> mask [1,H,W], score [1,1]."""

    spec = EVF_SAM

    def __init__(self, limits: InputLimits):
        self.image_limits = limits.image_limits()

    def parse(self, request, tokenizer) -> Job:
        image = _required_bytes(request, "image")
        prompt = decode_prompt(_required_bytes(request, "prompt"))
        ids = tokenizer.encode(prompt)
        return Job(image, image_key(image), [ids], RAW_MASKS, checked_image_size(image, self.image_limits))

    def response(self, result: Result):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("mask", result.masks), pb_utils.Tensor("score", result.scores.reshape(1, 1))])


class PromptsContract:
    """`evf_sam_prompts`: image [1] or image_key [1], prompts [N], mask_format [1] -> masks [N,H,W] or
    masks_encoded [N], scores [N], image_key [1], cache_hit [1]."""

    spec = EVF_SAM_PROMPTS

    def __init__(self, limits: InputLimits):
        self.image_limits = limits.image_limits()

    def parse(self, request, tokenizer) -> Job:
        prompts = _prompts(request)
        ids = []
        for index, prompt in enumerate(prompts):
            try:
                ids.append(tokenizer.encode(prompt))
            except InvalidPrompt as exc:
                raise InvalidPrompt(f"prompt {index}: {exc}") from None
        mask_format = _optional_text(request, "mask_format") or RAW_MASKS
        if mask_format not in MASK_FORMATS:
            raise InvalidRequest(f"mask_format {mask_format[:40]!r} is not one of {', '.join(MASK_FORMATS)}")
        image = _optional_bytes(request, "image")
        key = _optional_bytes(request, "image_key")
        if (image is None) == (key is None):
            raise InvalidRequest("send exactly one of 'image' (image bytes) and 'image_key'")
        if image is not None:
            return Job(image, image_key(image), ids, mask_format, checked_image_size(image, self.image_limits))
        return Job(None, key.decode("utf-8", errors="replace"), ids, mask_format, None)

    def response(self, result: Result):
        tensors = [
            pb_utils.Tensor("scores", result.scores),
            pb_utils.Tensor("image_key", np.array([result.key.encode()], dtype=np.object_)),
            pb_utils.Tensor("cache_hit", np.array([result.cache_hit], dtype=bool)),
        ]
        if result.masks is not None:
            tensors.append(pb_utils.Tensor("masks", result.masks))
        else:
            tensors.append(pb_utils.Tensor("masks_encoded", np.array(result.encoded, dtype=np.object_)))
        return pb_utils.InferenceResponse(output_tensors=tensors)


CONTRACTS = {EVF_SAM.name: SinglePromptContract, EVF_SAM_PROMPTS.name: PromptsContract}


def _required_bytes(request, name):
    value = _optional_bytes(request, name)
    if value is None:
        raise InvalidRequest(f"input {name!r} is missing")
    return value


def _optional_bytes(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy().reshape(-1)
    if array.size != 1:
        raise InvalidRequest(f"input {name!r} must hold exactly one element, got {array.size}")
    value = array[0]
    if isinstance(value, str):
        return value.encode("utf-8")
    if not isinstance(value, bytes):
        raise InvalidRequest(f"input {name!r} must be BYTES")
    return value


def _optional_text(request, name):
    value = _optional_bytes(request, name)
    return None if value is None else value.decode("utf-8", errors="replace").strip().lower()


def _prompts(request):
    tensor = pb_utils.get_input_tensor_by_name(request, "prompts")
    values = [] if tensor is None else tensor.as_numpy().reshape(-1)
    if not 1 <= len(values) <= MAX_PROMPTS_PER_REQUEST:
        raise InvalidRequest(f"send 1 to {MAX_PROMPTS_PER_REQUEST} prompts, got {len(values)}")
    prompts = []
    for index, value in enumerate(values):
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        try:
            prompts.append(decode_prompt(raw))
        except InvalidPrompt as exc:
            raise InvalidPrompt(f"prompt {index}: {exc}") from None
    return prompts
