"""Triton python model running one exported graph on ONNX Runtime (engine flavor `python-ort`).

Triton's dynamic batcher hands `execute` several requests; requests whose inputs have the same
shape are concatenated along the batch axis and run together, then the outputs are split back.
"""
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "0"))
        if threads > 0:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(version_dir / params["onnx_file"]), options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.name = config["name"]

    def execute(self, requests):
        responses = [None] * len(requests)
        for indices in _group_by_shape(requests, self.input_names).values():
            for index, response in zip(indices, self._run_group([requests[i] for i in indices])):
                responses[index] = response
        return responses

    def _run_group(self, requests):
        feeds = {name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
                 for name in self.input_names}
        sizes = [a.shape[0] for a in feeds[self.input_names[0]]]
        try:
            outputs = self.session.run(self.output_names, {k: np.concatenate(v) for k, v in feeds.items()})
        except Exception as exc:
            pb_utils.Logger.log_error(f"{self.name}: onnxruntime failed: {exc}")
            error = pb_utils.TritonError(f"{self.name}: inference failed")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        bounds = np.cumsum([0] + sizes)
        return [
            pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(out[start:stop])) for name, out in zip(self.output_names, outputs)
            ])
            for start, stop in zip(bounds[:-1], bounds[1:])
        ]


def _group_by_shape(requests, input_names):
    groups = defaultdict(list)
    for index, request in enumerate(requests):
        key = tuple(pb_utils.get_input_tensor_by_name(request, n).as_numpy().shape[1:] for n in input_names)
        groups[key].append(index)
    return groups
