"""Triton python model running one exported graph on ONNX Runtime (engine flavor `python-ort`).

Triton's dynamic batcher hands `execute` several requests; requests whose inputs have the same
shape are concatenated along the batch axis and run together, then the outputs are split back.  If a
batch fails, its requests are run again one by one, so that one bad request fails alone and the rest
of its batch is answered.  Execution providers come from the config (`execution_providers`: CPU, or
CUDA/TensorRT with onnxruntime-gpu on `DEVICE=gpu`).
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
        providers = _providers(json.loads(params.get("execution_providers", '["CPUExecutionProvider"]')),
                               args.get("model_instance_device_id", "0"))
        self.session = ort.InferenceSession(str(version_dir / params["onnx_file"]), options, providers=providers)
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.name = config["name"]
        # Rows per ONNX Runtime run (0: as Triton batched them).  Its CPU memory arena keeps what the largest
        # run needed and runs of several sizes fragment it: a SAM ViT-B encoder fed 1, 2, 3, 4, 2 images grew
        # to 12.3 GB and was OOM-killed at the next 4; one image per run stays at 4.2 GB
        # (benchmarks/reliability, the ViT-B soak).
        self.max_rows = int(params.get("max_rows_per_run", "0"))
        # A model Triton does not batch (the mask decoders: one image, N prompts) runs request by request.
        self.batched = config.get("max_batch_size", 0) > 0
        pb_utils.Logger.log_info(f"{self.name}: onnxruntime providers {self.session.get_providers()}")

    def execute(self, requests):
        if not self.batched:
            return [self._run_group([request])[0] for request in requests]
        responses = [None] * len(requests)
        for indices in _group_by_shape(requests, self.input_names).values():
            for index, response in zip(indices, self._run_group([requests[i] for i in indices])):
                responses[index] = response
        return responses

    def _run_group(self, requests):
        feeds = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names}
                 for r in requests]
        try:
            return self._run_together(feeds)
        except Exception as exc:
            if len(requests) == 1:
                pb_utils.Logger.log_error(f"{self.name}: onnxruntime failed: {exc}")
                return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: inference failed"))]
        return [self._run_group([request])[0] for request in requests]  # isolate the failing request(s)

    def _run_together(self, feeds):
        if len(feeds) == 1:  # also every request of a model Triton does not batch: outputs as they come
            outputs = self._run(feeds[0])
            return [pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, out) for name, out in zip(self.output_names, outputs)])]
        batched = {name: np.concatenate([f[name] for f in feeds]) for name in self.input_names}
        outputs = self._run(batched)
        bounds = np.cumsum([0] + [f[self.input_names[0]].shape[0] for f in feeds])
        return [
            pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(out[start:stop])) for name, out in zip(self.output_names, outputs)
            ])
            for start, stop in zip(bounds[:-1], bounds[1:])
        ]


    def _run(self, feed):
        rows = feed[self.input_names[0]].shape[0]
        if not self.batched or self.max_rows <= 0 or rows <= self.max_rows:
            return self.session.run(self.output_names, feed)
        parts = [self.session.run(self.output_names, {name: value[start:start + self.max_rows] for name, value in feed.items()})
                 for start in range(0, rows, self.max_rows)]
        return [np.concatenate(outputs) for outputs in zip(*parts)]


def _providers(names, device_id):
    """ONNX Runtime providers with the instance's GPU for the CUDA and TensorRT ones."""
    options = {"CUDAExecutionProvider": {"device_id": int(device_id)},
               "TensorrtExecutionProvider": {"device_id": int(device_id)}}
    return [(name, options[name]) if name in options else name for name in names]


def _group_by_shape(requests, input_names):
    groups = defaultdict(list)
    for index, request in enumerate(requests):
        key = tuple(pb_utils.get_input_tensor_by_name(request, n).as_numpy().shape[1:] for n in input_names)
        groups[key].append(index)
    return groups
