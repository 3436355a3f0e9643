"""The served contract (`evfsam.specs.EVF_SAM`) on the wire: requests, responses, metadata checks.

Nothing here names a tensor: names, datatypes and shapes all come from the `ServedModelSpec`.
The request builders take the `tritonclient.grpc` or `tritonclient.http` module, whose `InferInput`
and `InferRequestedOutput` the asyncio clients share.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from evfsam.specs import EVF_SAM, ServedModelSpec, TensorSpec

from .errors import ContractMismatch, InvalidInput

DEFAULT_SPEC = EVF_SAM


@dataclass(frozen=True)
class Segmentation:
    """One (image, prompt) answer: a 0/1 uint8 mask [H, W] at the image's size and the IoU score."""

    prompt: str
    mask: np.ndarray
    score: float

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))


def spec_for_model(name: str, spec: ServedModelSpec = DEFAULT_SPEC) -> ServedModelSpec:
    """The contract under another served name (a second deployment, a versioned copy)."""
    if not name:
        raise InvalidInput("the model name is empty")
    return spec if name == spec.name else replace(spec, name=name)


def wire_datatype(tensor: TensorSpec) -> str:
    """The datatype as model metadata reports it: TYPE_STRING -> BYTES, TYPE_FP32 -> FP32, ..."""
    config_type = tensor.triton_dtype.replace("TYPE_", "", 1)
    return "BYTES" if config_type == "STRING" else config_type


def wire_shape(tensor: TensorSpec) -> List[int]:
    """The shape as model metadata reports it: the batch and other named axes are -1."""
    return [-1 if isinstance(dim, str) else dim for dim in tensor.shape]


def check_metadata(metadata: Mapping[str, Any], spec: ServedModelSpec = DEFAULT_SPEC) -> None:
    """Raise `ContractMismatch` listing every difference between the model metadata and `spec`."""
    problems = _compare(spec.inputs, metadata.get("inputs", []), "input", extra_is_problem=True)
    problems += _compare(spec.outputs, metadata.get("outputs", []), "output", extra_is_problem=False)
    if problems:
        raise ContractMismatch(f"served model {spec.name!r} does not match the client contract: " + "; ".join(problems))


def build_inputs(protocol: ModuleType, image: bytes, prompt: str, spec: ServedModelSpec = DEFAULT_SPEC) -> List[Any]:
    """One request's inputs: the image bytes and the UTF-8 prompt, each a [1, 1] BYTES tensor."""
    if not isinstance(prompt, str):
        raise InvalidInput(f"prompt must be a str, got {type(prompt).__name__}")
    image_spec, prompt_spec = spec.inputs
    return [
        _bytes_input(protocol, image_spec, image),
        _bytes_input(protocol, prompt_spec, prompt.encode("utf-8")),
    ]


def requested_outputs(protocol: ModuleType, spec: ServedModelSpec = DEFAULT_SPEC) -> List[Any]:
    return [protocol.InferRequestedOutput(tensor.name) for tensor in spec.outputs]


def parse_result(result: Any, prompt: str, spec: ServedModelSpec = DEFAULT_SPEC) -> Segmentation:
    """An `InferResult` -> `Segmentation`, checking the outputs against the contract."""
    mask_spec, score_spec = spec.outputs
    mask = _output(result, mask_spec)
    score = _output(result, score_spec)
    if mask.shape[0] != spec.max_batch_size or score.size != 1:
        raise ContractMismatch(
            f"expected one {mask_spec.name!r} and one {score_spec.name!r} per request, "
            f"got shapes {list(mask.shape)} and {list(score.shape)}"
        )
    if mask.size and mask.max() > 1:
        raise ContractMismatch(f"output {mask_spec.name!r} must hold 0/1 values, found {int(mask.max())}")
    return Segmentation(prompt=prompt, mask=mask[0], score=float(score.reshape(-1)[0]))


def _bytes_input(protocol: ModuleType, tensor: TensorSpec, value: bytes) -> Any:
    shape = [1] * len(tensor.shape)
    infer_input = protocol.InferInput(tensor.name, shape, wire_datatype(tensor))
    infer_input.set_data_from_numpy(np.array([value], dtype=np.object_).reshape(shape))
    return infer_input


def _output(result: Any, tensor: TensorSpec) -> np.ndarray:
    array = result.as_numpy(tensor.name)
    if array is None:
        raise ContractMismatch(f"the response has no output {tensor.name!r}")
    if array.dtype != tensor.np_dtype or array.ndim != len(tensor.shape):
        raise ContractMismatch(
            f"output {tensor.name!r} is {array.dtype} with shape {list(array.shape)}, "
            f"expected {tensor.dtype} with shape {list(tensor.shape)}"
        )
    return array


def _compare(
    expected: Sequence[TensorSpec], served: Sequence[Mapping[str, Any]], kind: str, extra_is_problem: bool
) -> List[str]:
    served_by_name: Dict[str, Mapping[str, Any]] = {t.get("name"): t for t in served}
    problems = [_difference(tensor, served_by_name.get(tensor.name), kind) for tensor in expected]
    if extra_is_problem:
        known = {tensor.name for tensor in expected}
        problems += [f"unexpected {kind} {name!r}" for name in served_by_name if name not in known]
    return [problem for problem in problems if problem]


def _difference(tensor: TensorSpec, served: Any, kind: str) -> str:
    if served is None:
        return f"missing {kind} {tensor.name!r}"
    datatype, shape = served.get("datatype"), [int(d) for d in served.get("shape", [])]
    if datatype != wire_datatype(tensor):
        return f"{kind} {tensor.name!r} has datatype {datatype}, expected {wire_datatype(tensor)}"
    if shape != wire_shape(tensor):
        return f"{kind} {tensor.name!r} has shape {shape}, expected {wire_shape(tensor)}"
    return ""
