"""`perf_analyzer --input-data` JSON built from real inputs (never its random data).

Random data is wrong for this model: the served models take encoded image files and UTF-8 prompts
(BYTES tensors), and the BEiT-3 graph takes token ids that must lie inside the vocabulary.

perf_analyzer's JSON format: {"data": [step, ...]}, one step per request it may send (used round
robin); a step maps every input name to {"b64": ..., "shape": [...]}, the shape without the batch
axis for a model Triton batches (max_batch_size > 0), the full shape otherwise.  For a BYTES tensor the base64 payload is Triton's serialised form of the tensor (each element
as a 4-byte little-endian length followed by its bytes): perf_analyzer 2.51 sends the decoded bytes
as they are, and a bare file would be read as a bogus length prefix by the server.
"""
from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np

from evfsam.embedding_cache import image_key
from evfsam.specs import EVF_SAM, EVF_SAM_PROMPTS, GraphSpec

from .samples import PROMPTS, Sample

LENGTH_PREFIX = struct.Struct("<I")


def serialize_bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """Triton's wire format of a BYTES tensor (row-major elements)."""
    return b"".join(LENGTH_PREFIX.pack(len(e)) + e for e in elements)


def deserialize_bytes_tensor(data: bytes) -> List[bytes]:
    elements, offset = [], 0
    while offset < len(data):
        (length,) = LENGTH_PREFIX.unpack_from(data, offset)
        offset += LENGTH_PREFIX.size
        if offset + length > len(data):
            raise ValueError(f"BYTES element of {length} bytes overruns the buffer at offset {offset}")
        elements.append(data[offset : offset + length])
        offset += length
    return elements


def bytes_entry(value: bytes, shape: Sequence[int]) -> Dict[str, object]:
    """One BYTES input of a batch-1 request holding `value` in each of its (usually 1) elements."""
    return elements_entry([value] * int(np.prod(shape)), shape)


def elements_entry(elements: Sequence[bytes], shape: Sequence[int]) -> Dict[str, object]:
    """One BYTES input holding `elements` (row-major) in a tensor of `shape`."""
    return {"b64": base64.b64encode(serialize_bytes_tensor(elements)).decode("ascii"), "shape": list(shape)}


def array_entry(array: np.ndarray, dtype: np.dtype) -> Dict[str, object]:
    """One fixed-width input of a batch-1 request: `array` is that request's tensor without the batch axis."""
    data = np.ascontiguousarray(array, dtype=dtype)
    return {"b64": base64.b64encode(data.tobytes()).decode("ascii"), "shape": list(data.shape)}


def single_prompt_input_data(samples: Sequence[Sample]) -> Dict[str, list]:
    """Steps for `evf_sam`: the image file's bytes and the prompt's UTF-8 bytes, one step per sample."""
    image, prompt = EVF_SAM.inputs
    return {"data": [
        {
            image.name: bytes_entry(sample.image, image.shape[1:]),
            prompt.name: bytes_entry(sample.prompt.encode("utf-8"), prompt.shape[1:]),
        }
        for sample in samples
    ]}


def prompts_input_data(samples: Sequence[Sample], count: int, by_key: bool = False) -> Dict[str, list]:
    """Steps for `evf_sam_prompts`: one step per distinct image, holding its file bytes (or, with
    `by_key`, only its image_key) and `count` prompts: the sample's own, then the others in turn."""
    image, key, prompts = (EVF_SAM_PROMPTS.input(n) for n in ("image", "image_key", "prompts"))
    steps, seen = [], set()
    for sample in samples:
        if sample.image in seen:
            continue
        seen.add(sample.image)
        texts = [sample.prompt, *(p for p in PROMPTS if p != sample.prompt)]
        elements = [texts[i % len(texts)].encode("utf-8") for i in range(count)]
        step = {prompts.name: elements_entry(elements, [count])}
        if by_key:
            step[key.name] = bytes_entry(image_key(sample.image).encode("ascii"), key.shape)
        else:
            step[image.name] = bytes_entry(sample.image, image.shape)
        steps.append(step)
    return {"data": steps}


def engine_input_data(spec: GraphSpec, feeds: Sequence[Mapping[str, np.ndarray]]) -> Dict[str, list]:
    """Steps for one engine model from real one-row feeds (preprocessed images, tokens, an image's
    features with one prompt's embedding): without the batch axis where Triton batches the model,
    whole tensors where it does not (the mask decoders)."""
    steps = []
    for feed in feeds:
        for tensor in spec.inputs:
            if feed[tensor.name].shape[0] != 1:
                raise ValueError(f"{spec.name}.{tensor.name}: feeds must be batch 1, got {feed[tensor.name].shape}")
        steps.append({t.name: array_entry(feed[t.name][0] if spec.triton_batching else feed[t.name], t.np_dtype)
                      for t in spec.inputs})
    return {"data": steps}


def decode_entry(entry: Mapping[str, object]) -> bytes:
    return base64.b64decode(entry["b64"])


def write_json(data: Mapping[str, object], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
