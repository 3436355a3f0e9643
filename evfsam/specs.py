"""The single source of truth for the three exported graphs.

Every tensor name, dtype, shape, dynamic axis and optimisation profile of the deployment is written
here once.  The ONNX exporter, the validator, the TensorRT builder, the Triton model repository
generator and the clients read them from these specs; nothing else types a tensor name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np

SAM_IMAGE_SIZE = 1024
SAM_EMBEDDING_SIZE = 64  # SAM_IMAGE_SIZE / patch 16
SAM_EMBEDDING_DIM = 256
LOW_RES_MASK_SIZE = 256  # 4 x SAM_EMBEDDING_SIZE
BEIT3_IMAGE_SIZE = 224
MAX_TEXT_TOKENS = 128  # <s> + prompt + </s>; longer prompts are rejected, see README
TEXT_BUCKET = 16  # prompts are right-padded to a multiple of this so that similar lengths batch

Dim = Union[int, str]


@dataclass(frozen=True)
class AxisRange:
    """min / opt / max of one dynamic axis: a TensorRT optimisation profile dimension."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: Tuple[Dim, ...]  # ints are fixed; strings name a dynamic axis
    optional: bool = False  # a request may leave this input out

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def triton_dtype(self) -> str:
        return NUMPY_TO_TRITON[self.dtype]

    def concrete_shape(self, axes: Mapping[str, int]) -> Tuple[int, ...]:
        return tuple(axes[d] if isinstance(d, str) else d for d in self.shape)

    def dynamic_axes(self) -> Dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def triton_dims(self) -> Tuple[int, ...]:
        """Config dims, dynamic ones as -1: without the leading batch axis when there is one
        (a model with max_batch_size > 0), the full shape otherwise."""
        dims = self.shape[1:] if self.shape and self.shape[0] == BATCH else self.shape
        return tuple(-1 if isinstance(d, str) else d for d in dims)


BATCH = "batch"
TEXT_LEN = "text_len"

NUMPY_TO_TRITON = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
    "object": "TYPE_STRING",
}


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its file, its tensors and the range of shapes it is built for."""

    name: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    axes: Mapping[str, AxisRange]
    preferred_batch_sizes: Tuple[int, ...]
    # Compute-heavy graphs keep fewer requests in flight; values only shape the Triton config.
    max_queue_delay_us: int = 2000
    description: str = ""
    # Batch sizes the exporter traces and then validates with (they must differ).
    export_batches: Tuple[int, int] = (2, 3)

    @property
    def onnx_file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def max_batch_size(self) -> int:
        return self.axes[BATCH].max

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.name)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.name)

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def dynamic_axes(self) -> Dict[str, Dict[int, str]]:
        """`torch.onnx.export(dynamic_axes=...)` for every input and output."""
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}

    def profile_shapes(self, which: str) -> Dict[str, Tuple[int, ...]]:
        """Input shapes at the profile's 'min', 'opt' or 'max' point."""
        point = {axis: getattr(rng, which) for axis, rng in self.axes.items()}
        return {t.name: t.concrete_shape(point) for t in self.inputs}

    def sample_inputs(
        self, rng: np.random.Generator, axes: Optional[Mapping[str, int]] = None, vocab_size: int = 1000
    ) -> Dict[str, np.ndarray]:
        """Random inputs of valid content: images in the normalised range, real-looking token ids
        with a right-padded attention mask."""
        point = {axis: r.opt for axis, r in self.axes.items()}
        point.update(axes or {})
        return {t.name: _sample(t, t.concrete_shape(point), rng, vocab_size) for t in self.inputs}


def _by_name(tensors: Tuple[TensorSpec, ...], name: str, graph: str) -> TensorSpec:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise KeyError(f"graph {graph!r} has no tensor {name!r}")


def _sample(spec: TensorSpec, shape: Tuple[int, ...], rng: np.random.Generator, vocab_size: int) -> np.ndarray:
    if spec.name == "input_ids":
        ids = rng.integers(4, vocab_size, size=shape, dtype=np.int64)
        ids[:, 0] = 0  # <s>
        return ids
    if spec.name == "attention_mask":
        batch, length = shape
        lengths = rng.integers(max(2, length // 2), length + 1, size=batch)
        lengths[0] = length  # at least one unpadded row
        return (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return rng.standard_normal(shape).astype(spec.np_dtype)


SAM_IMAGE_ENCODER = GraphSpec(
    name="sam_image_encoder",
    description="SAM ViT image encoder: padded, normalised 1024x1024 view -> 64x64 embeddings",
    inputs=(TensorSpec("images", "float32", (BATCH, 3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE)),),
    outputs=(
        TensorSpec(
            "image_embeddings",
            "float32",
            (BATCH, SAM_EMBEDDING_DIM, SAM_EMBEDDING_SIZE, SAM_EMBEDDING_SIZE),
        ),
    ),
    axes={BATCH: AxisRange(1, 1, 4)},
    preferred_batch_sizes=(2, 4),
    max_queue_delay_us=5000,
    # One global-attention matrix of ViT-H on a 1024² image is 16 x 4096² floats (1 GiB): keep
    # the export's sample batches small.
    export_batches=(1, 2),
)

BEIT3_FUSION_ENCODER = GraphSpec(
    name="beit3_fusion_encoder",
    description="BEiT-3 early fusion of the 224x224 view with the prompt tokens -> prompt embedding",
    inputs=(
        TensorSpec("images_evf", "float32", (BATCH, 3, BEIT3_IMAGE_SIZE, BEIT3_IMAGE_SIZE)),
        TensorSpec("input_ids", "int64", (BATCH, TEXT_LEN)),
        TensorSpec("attention_mask", "int64", (BATCH, TEXT_LEN)),
    ),
    outputs=(TensorSpec("text_embeds", "float32", (BATCH, 1, SAM_EMBEDDING_DIM)),),
    axes={BATCH: AxisRange(1, 4, 16), TEXT_LEN: AxisRange(2, TEXT_BUCKET, MAX_TEXT_TOKENS)},
    preferred_batch_sizes=(4, 8, 16),
)

PROMPT_MASK_DECODER = GraphSpec(
    name="prompt_mask_decoder",
    description="SAM prompt encoder (text prompt as one sparse token) + mask decoder, single mask",
    inputs=(
        TensorSpec(
            "image_embeddings",
            "float32",
            (BATCH, SAM_EMBEDDING_DIM, SAM_EMBEDDING_SIZE, SAM_EMBEDDING_SIZE),
        ),
        TensorSpec("text_embeds", "float32", (BATCH, 1, SAM_EMBEDDING_DIM)),
    ),
    outputs=(
        TensorSpec("low_res_masks", "float32", (BATCH, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE)),
        TensorSpec("iou_predictions", "float32", (BATCH, 1)),
    ),
    axes={BATCH: AxisRange(1, 4, 16)},
    preferred_batch_sizes=(4, 8, 16),
)

GRAPHS: Tuple[GraphSpec, ...] = (SAM_IMAGE_ENCODER, BEIT3_FUSION_ENCODER, PROMPT_MASK_DECODER)
GRAPHS_BY_NAME: Dict[str, GraphSpec] = {g.name: g for g in GRAPHS}
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class ServedModelSpec:
    """The client-facing contract of a served (ensemble) model; batch is one image per request."""

    name: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    max_batch_size: int = 1

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.name)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.name)


HEIGHT = "height"
WIDTH = "width"
PROMPTS = "prompts"

# image: the encoded file's bytes (JPEG, PNG, ...); prompt: UTF-8 text.
# mask: uint8 0/1 at the original image size; score: the mask decoder's IoU prediction.
EVF_SAM = ServedModelSpec(
    name="evf_sam",
    inputs=(TensorSpec("image", "object", (BATCH, 1)), TensorSpec("prompt", "object", (BATCH, 1))),
    outputs=(TensorSpec("mask", "uint8", (BATCH, HEIGHT, WIDTH)), TensorSpec("score", "float32", (BATCH, 1))),
)

# Tensors the pre/post-processing models pass along inside the ensemble, besides the graphs' own.
ORIGINAL_SIZE = TensorSpec("original_size", "int64", (BATCH, 2))  # (H, W) of the decoded image
RESIZED_SIZE = TensorSpec("resized_size", "int64", (BATCH, 2))  # (h, w) inside the 1024 SAM view

# Prometheus counters the pipeline's python models publish on Triton's metrics port.  In flight =
# started - finished; the launcher drains on it before stopping Triton (see serving/server.py).
PIPELINE_STARTED_METRIC = "evf_sam_pipeline_requests_started"
PIPELINE_FINISHED_METRIC = "evf_sam_pipeline_requests_finished"

# Encode once, prompt many: one image (or the key of one sent before) and N prompts -> N masks.
# Image embeddings are cached across requests under image_key = sha256(image bytes), hex.
EVF_SAM_PROMPTS = ServedModelSpec(
    name="evf_sam_prompts",
    inputs=(
        TensorSpec("image", "object", (1,), optional=True),
        TensorSpec("image_key", "object", (1,), optional=True),
        TensorSpec("prompts", "object", (PROMPTS,)),
    ),
    outputs=(
        TensorSpec("masks", "uint8", (PROMPTS, HEIGHT, WIDTH)),
        TensorSpec("scores", "float32", (PROMPTS,)),
        TensorSpec("image_key", "object", (1,)),
    ),
    max_batch_size=0,
)
MAX_PROMPTS_PER_REQUEST = 64
CACHE_METRICS = {
    "hits": "evf_sam_embedding_cache_hits",
    "misses": "evf_sam_embedding_cache_misses",
    "evictions": "evf_sam_embedding_cache_evictions",
}
CACHE_BYTES_METRIC = "evf_sam_embedding_cache_bytes"
CACHE_ENTRIES_METRIC = "evf_sam_embedding_cache_entries"
