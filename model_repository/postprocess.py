"""Triton python model `postprocess`: decoder logits -> uint8 mask at the original size + score."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from evfsam.processing import binary_mask
from evfsam.specs import EVF_SAM, ORIGINAL_SIZE, PIPELINE_FINISHED_METRIC, PROMPT_MASK_DECODER, RESIZED_SIZE

LOW_RES_MASKS, IOU_PREDICTIONS = PROMPT_MASK_DECODER.output_names
MASK, SCORE = (t.name for t in EVF_SAM.outputs)


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        # Triton invalidates a Metric whose MetricFamily is garbage collected: keep both.
        self.metric_family = pb_utils.MetricFamily(
            name=PIPELINE_FINISHED_METRIC, description="requests that left the evf_sam pipeline",
            kind=pb_utils.MetricFamily.COUNTER)
        self.finished = self.metric_family.Metric(labels={"model": EVF_SAM.name})

    def execute(self, requests):
        responses = [self._respond(request) for request in requests]
        self.finished.increment(len(requests))
        return responses

    def _respond(self, request):
        try:
            low_res = _input(request, LOW_RES_MASKS)
            original = _input(request, ORIGINAL_SIZE.name)
            resized = _input(request, RESIZED_SIZE.name)
            masks = np.stack([
                binary_mask(low_res[i, 0], tuple(resized[i]), tuple(original[i])) for i in range(low_res.shape[0])
            ])
            scores = _input(request, IOU_PREDICTIONS).astype(np.float32)
        except Exception as exc:
            pb_utils.Logger.log_error(f"postprocess failed: {type(exc).__name__}: {exc}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("internal error while postprocessing"))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(MASK, masks), pb_utils.Tensor(SCORE, scores)])


def _input(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy()
