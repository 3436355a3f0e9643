"""Triton python model `preprocess`: decode, SAM view, BEiT-3 view, tokenize (numpy, no torch).

Bad input gets a per-request INVALID_ARG error with a message safe for the client; the other
requests of the batch are answered normally.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from evfsam.model_config import InputLimits, config_parameters
from evfsam.processing import InvalidImage, beit3_view, decode_image, sam_view
from evfsam.specs import EVF_SAM, ORIGINAL_SIZE, PIPELINE_FINISHED_METRIC, PIPELINE_STARTED_METRIC, RESIZED_SIZE
from evfsam.tokenization import InvalidPrompt, decode_prompt, pad_batch

IMAGE, PROMPT = (t.name for t in EVF_SAM.inputs)


class InvalidRequest(ValueError):
    pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        limits = InputLimits.from_parameters(config_parameters(config))
        self.tokenizer = limits.tokenizer(Path(args["model_repository"]) / args["model_version"])
        self.limits = limits.image_limits()
        self.output_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        self.logger = pb_utils.Logger
        # Triton invalidates a Metric whose MetricFamily is garbage collected: keep both.
        self.metric_families = [
            pb_utils.MetricFamily(name=PIPELINE_STARTED_METRIC, description="requests that entered the evf_sam pipeline",
                                  kind=pb_utils.MetricFamily.COUNTER),
            pb_utils.MetricFamily(name=PIPELINE_FINISHED_METRIC, description="requests that left the evf_sam pipeline",
                                  kind=pb_utils.MetricFamily.COUNTER),
        ]
        self.started, self.finished = (f.Metric(labels={"model": EVF_SAM.name}) for f in self.metric_families)

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        self.started.increment(1)
        try:
            outputs = self._preprocess(request)
        except (InvalidImage, InvalidPrompt, InvalidRequest) as exc:
            self.finished.increment(1)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        except Exception as exc:  # never leak a traceback or a path to the client
            self.finished.increment(1)
            self.logger.log_error(f"preprocess failed: {type(exc).__name__}: {exc}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("internal error while preprocessing"))
        tensors = [pb_utils.Tensor(name, value.astype(self.output_dtypes[name])) for name, value in outputs.items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _preprocess(self, request):
        image_bytes = _single_bytes(request, IMAGE)
        prompt = decode_prompt(_single_bytes(request, PROMPT))
        ids = self.tokenizer.encode(prompt)
        rgb = decode_image(image_bytes, self.limits)
        images, resized = sam_view(rgb)
        input_ids, attention_mask = pad_batch([ids])
        return {
            "images": images[None],
            "images_evf": beit3_view(rgb)[None],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            ORIGINAL_SIZE.name: np.array([rgb.shape[:2]], dtype=np.int64),
            RESIZED_SIZE.name: np.array([resized], dtype=np.int64),
        }


def _single_bytes(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidRequest(f"input {name!r} is missing")
    array = tensor.as_numpy()
    if array.size != 1:
        raise InvalidRequest(f"input {name!r} must hold exactly one element, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, bytes):
        raise InvalidRequest(f"input {name!r} must be BYTES")
    return value
