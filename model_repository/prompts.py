"""Triton python model `evf_sam_prompts`: encode an image once, answer many prompts.

Inputs: `image` (encoded bytes) or `image_key` (returned by an earlier request), and `prompts` [N].
The SAM image embedding is computed by the `sam_image_encoder` engine only on a cache miss; the N
prompts go through `beit3_fusion_encoder` and `prompt_mask_decoder` as batches (BLS calls to the
engine models, so this works with every engine flavor).  Outputs: `masks` [N,H,W], `scores` [N],
`image_key`.  Cache hits, misses and evictions are Prometheus counters on Triton's metrics port.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from evfsam.embedding_cache import CachedImage, EmbeddingCache, image_key
from evfsam.model_config import InputLimits, config_parameters
from evfsam.processing import InvalidImage, beit3_view, binary_mask, decode_image, sam_view
from evfsam.specs import (BEIT3_FUSION_ENCODER, CACHE_BYTES_METRIC, CACHE_ENTRIES_METRIC, CACHE_METRICS,
                          EVF_SAM_PROMPTS, MAX_PROMPTS_PER_REQUEST, PROMPT_MASK_DECODER, SAM_IMAGE_ENCODER)
from evfsam.tokenization import InvalidPrompt, decode_prompt, pad_batch

IMAGE, IMAGE_KEY, PROMPTS = (t.name for t in EVF_SAM_PROMPTS.inputs)
MASKS, SCORES, KEY_OUT = (t.name for t in EVF_SAM_PROMPTS.outputs)


class InvalidRequest(ValueError):
    pass


class EngineError(RuntimeError):
    pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        limits = InputLimits.from_parameters(params)
        self.tokenizer = limits.tokenizer(Path(args["model_repository"]) / args["model_version"])
        self.limits = limits.image_limits()
        self.cache = EmbeddingCache(int(params["cache_bytes"]))
        self._init_metrics()

    def _init_metrics(self):
        # Triton invalidates a Metric whose MetricFamily is garbage collected: keep the families.
        labels = {"model": EVF_SAM_PROMPTS.name}
        self.families = {key: pb_utils.MetricFamily(name=name, description=f"image embedding cache {key}",
                                                    kind=pb_utils.MetricFamily.COUNTER)
                         for key, name in CACHE_METRICS.items()}
        self.counters = {key: family.Metric(labels=labels) for key, family in self.families.items()}
        self.families["bytes"] = pb_utils.MetricFamily(name=CACHE_BYTES_METRIC, description="bytes held by the cache",
                                                       kind=pb_utils.MetricFamily.GAUGE)
        self.families["entries"] = pb_utils.MetricFamily(name=CACHE_ENTRIES_METRIC, description="images in the cache",
                                                         kind=pb_utils.MetricFamily.GAUGE)
        self.gauges = {key: self.families[key].Metric(labels=labels) for key in ("bytes", "entries")}
        self.reported = {key: 0 for key in CACHE_METRICS}

    def execute(self, requests):
        responses = [self._respond(request) for request in requests]
        self._publish_metrics()
        return responses

    def _respond(self, request):
        try:
            masks, scores, key = self._segment(request)
        except (InvalidImage, InvalidPrompt, InvalidRequest) as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        except EngineError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        except Exception as exc:  # never leak a traceback or a path to the client
            pb_utils.Logger.log_error(f"evf_sam_prompts failed: {type(exc).__name__}: {exc}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("internal error"))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(MASKS, masks),
            pb_utils.Tensor(SCORES, scores),
            pb_utils.Tensor(KEY_OUT, np.array([key.encode()], dtype=np.object_)),
        ])

    def _segment(self, request):
        ids = self._tokenize(_prompts(request))
        image = _optional_bytes(request, IMAGE)
        key_bytes = _optional_bytes(request, IMAGE_KEY)
        if (image is None) == (key_bytes is None):
            raise InvalidRequest(f"send exactly one of {IMAGE!r} (image bytes) and {IMAGE_KEY!r}")
        if image is not None:
            key = image_key(image)
            entry, _ = self.cache.get_or_compute(key, lambda: self._encode_image(image))
        else:
            key = key_bytes.decode("utf-8", errors="replace")
            entry = self.cache.get(key)
            if entry is None:
                raise InvalidRequest(f"unknown {IMAGE_KEY} {key[:80]!r}: never sent or evicted; send the image bytes")
        low_res, scores = self._decode_prompts(entry, ids)
        masks = np.stack([binary_mask(m[0], entry.resized_size, entry.original_size) for m in low_res])
        return masks, scores[:, 0].astype(np.float32), key

    def _tokenize(self, prompts):
        ids = []
        for index, prompt in enumerate(prompts):
            try:
                ids.append(self.tokenizer.encode(prompt))
            except InvalidPrompt as exc:
                raise InvalidPrompt(f"prompt {index}: {exc}") from None
        return ids

    def _encode_image(self, data):
        rgb = decode_image(data, self.limits)
        images, resized = sam_view(rgb)
        (embeddings,) = _run(SAM_IMAGE_ENCODER, {"images": images[None]})
        return CachedImage(embeddings, beit3_view(rgb)[None], tuple(rgb.shape[:2]), tuple(resized))

    def _decode_prompts(self, entry, ids):
        low_res, scores = [], []
        step = min(BEIT3_FUSION_ENCODER.max_batch_size, PROMPT_MASK_DECODER.max_batch_size)
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            input_ids, attention_mask = pad_batch(chunk)
            images_evf = np.repeat(entry.images_evf, len(chunk), axis=0)
            (text_embeds,) = _run(BEIT3_FUSION_ENCODER, {"images_evf": images_evf, "input_ids": input_ids,
                                                         "attention_mask": attention_mask})
            embeddings = np.repeat(entry.embeddings, len(chunk), axis=0)
            masks, iou = _run(PROMPT_MASK_DECODER, {"image_embeddings": embeddings, "text_embeds": text_embeds})
            low_res.append(masks)
            scores.append(iou)
        return np.concatenate(low_res), np.concatenate(scores)

    def _publish_metrics(self):
        counts = {"hits": self.cache.hits, "misses": self.cache.misses, "evictions": self.cache.evictions}
        for key, value in counts.items():
            if value > self.reported[key]:
                self.counters[key].increment(value - self.reported[key])
                self.reported[key] = value
        self.gauges["bytes"].set(self.cache.bytes)
        self.gauges["entries"].set(len(self.cache))


def _run(spec, inputs):
    """One BLS call to an engine model; input and output names come from its graph spec."""
    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(inputs[name])) for name in spec.input_names]
    response = pb_utils.InferenceRequest(model_name=spec.name, requested_output_names=list(spec.output_names),
                                         inputs=tensors).exec()
    if response.has_error():
        pb_utils.Logger.log_error(f"{spec.name} failed: {response.error().message()}")
        raise EngineError(f"{spec.name} failed")
    return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in spec.output_names]


def _optional_bytes(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy().reshape(-1)
    if array.size != 1:
        raise InvalidRequest(f"input {name!r} must hold exactly one element")
    value = array[0]
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _prompts(request):
    tensor = pb_utils.get_input_tensor_by_name(request, PROMPTS)
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
