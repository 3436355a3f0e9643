"""The served contracts on the wire: requests, responses, metadata checks.

`evfsam.specs.EVF_SAM` (one image, one prompt per request) and `evfsam.specs.EVF_SAM_PROMPTS` (one
image or the key of one sent before, N prompts per request).  Nothing here names a tensor: names,
datatypes and shapes all come from the `ServedModelSpec`.
The request builders take the `tritonclient.grpc` or `tritonclient.http` module, whose `InferInput`
and `InferRequestedOutput` the asyncio clients share.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from evfsam import mask_codecs
from evfsam.specs import EVF_SAM, EVF_SAM_PROMPTS, MASK_FORMATS, RAW_MASKS, ServedModelSpec, TensorSpec

from .errors import ContractMismatch, InvalidInput

DEFAULT_SPEC = EVF_SAM
DEFAULT_PROMPTS_SPEC = EVF_SAM_PROMPTS


@dataclass(frozen=True)
class Segmentation:
    """One (image, prompt) answer: a 0/1 uint8 mask [H, W] at the image's size and the IoU score."""

    prompt: str
    mask: np.ndarray
    score: float
    # The server's key of the image (sha256 of its bytes, hex) when the answer came from the
    # many-prompts model, which caches the image's features under it; None otherwise.
    image_key: Optional[str] = None
    # Whether the image's features came from the server's cache (many-prompts model only).
    cache_hit: Optional[bool] = None
    # The mask as the server encoded it, for mask_format "rle" (COCO RLE JSON) or "png".
    encoded_mask: Optional[bytes] = None
    mask_format: str = RAW_MASKS

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
    check_prompt(prompt)
    return [
        _bytes_input(protocol, spec.input("image"), image),
        _bytes_input(protocol, spec.input("prompt"), prompt.encode("utf-8")),
    ]


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise InvalidInput(f"prompt must be a str, got {type(prompt).__name__}")
    return prompt


def check_prompts(prompts: Sequence[str]) -> List[str]:
    """A list of str prompts (a single str is refused rather than split into characters)."""
    if isinstance(prompts, (str, bytes)):
        raise InvalidInput(f"prompts must be a sequence of str, got a single {type(prompts).__name__}")
    return [check_prompt(prompt) for prompt in prompts]


def check_image_key(image_key: Any) -> str:
    if not isinstance(image_key, str) or not image_key:
        raise InvalidInput(f"image_key must be a non-empty str as the server returned it, got {image_key!r:.80}")
    return image_key


def check_mask_format(mask_format: str) -> str:
    if mask_format not in MASK_FORMATS:
        raise InvalidInput(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r:.40}")
    return mask_format


def build_prompts_inputs(
    protocol: ModuleType,
    prompts: Sequence[str],
    image: Optional[bytes] = None,
    image_key: Optional[str] = None,
    spec: ServedModelSpec = DEFAULT_PROMPTS_SPEC,
    mask_format: str = RAW_MASKS,
) -> List[Any]:
    """One many-prompts request: the image bytes or an image key (exactly one), the N UTF-8 prompts
    as one [N] BYTES tensor and, unless raw, the mask format."""
    if (image is None) == (image_key is None):
        raise InvalidInput("give exactly one of an image and an image key")
    source = (
        _bytes_input(protocol, spec.input("image"), image)
        if image is not None
        else _bytes_input(protocol, spec.input("image_key"), check_image_key(image_key).encode("utf-8"))
    )
    prompts_spec = spec.input("prompts")
    encoded = [check_prompt(prompt).encode("utf-8") for prompt in prompts]
    shape = [len(encoded) if isinstance(dim, str) else dim for dim in prompts_spec.shape]
    prompts_input = protocol.InferInput(prompts_spec.name, shape, wire_datatype(prompts_spec))
    prompts_input.set_data_from_numpy(np.array(encoded, dtype=np.object_).reshape(shape))
    inputs = [source, prompts_input]
    if check_mask_format(mask_format) != RAW_MASKS:
        inputs.append(_bytes_input(protocol, spec.input("mask_format"), mask_format.encode("ascii")))
    return inputs


def requested_outputs(protocol: ModuleType, spec: ServedModelSpec = DEFAULT_SPEC) -> List[Any]:
    return [protocol.InferRequestedOutput(tensor.name) for tensor in spec.outputs]


def requested_prompts_outputs(protocol: ModuleType, spec: ServedModelSpec = DEFAULT_PROMPTS_SPEC,
                              mask_format: str = RAW_MASKS) -> List[Any]:
    """The many-prompts outputs to ask for: raw masks or encoded ones, never both."""
    masks = "masks" if mask_format == RAW_MASKS else "masks_encoded"
    names = [masks, "scores", "image_key", "cache_hit"]
    return [protocol.InferRequestedOutput(spec.output(name).name) for name in names]


def parse_result(result: Any, prompt: str, spec: ServedModelSpec = DEFAULT_SPEC) -> Segmentation:
    """An `InferResult` -> `Segmentation`, checking the outputs against the contract."""
    mask_spec, score_spec = spec.output("mask"), spec.output("score")
    mask = _output(result, mask_spec)
    score = _output(result, score_spec)
    if mask.shape[0] != spec.max_batch_size or score.size != 1:
        raise ContractMismatch(
            f"expected one {mask_spec.name!r} and one {score_spec.name!r} per request, "
            f"got shapes {list(mask.shape)} and {list(score.shape)}"
        )
    _check_binary(mask, mask_spec.name)
    return Segmentation(prompt=prompt, mask=mask[0], score=float(score.reshape(-1)[0]))


def parse_prompts_result(
    result: Any, prompts: Sequence[str], spec: ServedModelSpec = DEFAULT_PROMPTS_SPEC, mask_format: str = RAW_MASKS
) -> List[Segmentation]:
    """A many-prompts `InferResult` -> one `Segmentation` per prompt, in order, each with the key;
    encoded masks are decoded (and kept as `encoded_mask`)."""
    scores = _output(result, spec.output("scores"))
    keys = _output(result, spec.output("image_key"))
    hits = _output(result, spec.output("cache_hit"))
    if mask_format == RAW_MASKS:
        masks = _output(result, spec.output("masks"))
        encoded: List[Optional[bytes]] = [None] * masks.shape[0]
        _check_binary(masks, "masks")
    else:
        encoded = [bytes(v) for v in _output(result, spec.output("masks_encoded")).reshape(-1)]
        masks = [_decoded(data, mask_format) for data in encoded]
    if len(masks) != len(prompts) or scores.shape != (len(prompts),) or keys.size != 1 or hits.size != 1:
        raise ContractMismatch(
            f"expected {len(prompts)} masks and {len(prompts)} scores, one image_key and one cache_hit for "
            f"{len(prompts)} prompts, got {len(masks)} masks and shapes {list(scores.shape)}, {list(keys.shape)}, "
            f"{list(hits.shape)}"
        )
    key = keys.reshape(-1)[0]
    key = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else str(key)
    hit = bool(hits.reshape(-1)[0])
    return [
        Segmentation(prompt=prompt, mask=masks[i], score=float(scores[i]), image_key=key, cache_hit=hit,
                     encoded_mask=encoded[i], mask_format=mask_format)
        for i, prompt in enumerate(prompts)
    ]


def _decoded(data: bytes, mask_format: str) -> np.ndarray:
    try:
        mask = mask_codecs.decode_mask(data, mask_format)
    except ValueError as exc:
        raise ContractMismatch(f"the server sent a {mask_format} mask that does not decode: {exc}") from None
    _check_binary(mask, "masks_encoded")
    return mask


def _check_binary(masks: np.ndarray, name: str) -> None:
    if masks.size and masks.max() > 1:
        raise ContractMismatch(f"output {name!r} must hold 0/1 values, found {int(masks.max())}")


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
