"""The single source of truth for the exported graphs and the served contracts.

Every tensor name, dtype, shape, dynamic axis and optimisation profile of the deployment is written
here once.  The ONNX exporter, the validator, the TensorRT builder, the Triton model repository
generator and the clients read them from these specs; nothing else types a tensor name.

Two model families share the BEiT-3 prompt encoder and differ in the image side:

* `ori`  (EVF-SAM): SAM ViT image encoder -> one 64x64 embedding; SAM mask decoder.
* `sam2` (EVF-SAM2): SAM-2 Hiera + FPN -> the 64x64 embedding and two high-resolution feature maps;
  SAM-2 mask decoder (object-score head, IoU through a sigmoid, the recipe's mask selection).

The mask decoders take ONE image's features and broadcast them over N prompts (or pair image i with
prompt i when given N images), so a request with many prompts never copies an image's features.
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
SAM2_HIGH_RES_FEATURES = ((32, 256), (64, 128))  # (channels, size) of the decoder's two skip levels
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

    def triton_dims(self, batched: bool = True) -> Tuple[int, ...]:
        """Config dims, dynamic ones as -1: without the leading batch axis in a model Triton batches
        (max_batch_size > 0), the full shape otherwise."""
        dims = self.shape[1:] if batched and self.shape and self.shape[0] == BATCH else self.shape
        return tuple(-1 if isinstance(d, str) else d for d in dims)


BATCH = "batch"  # rows of a call: images for the encoders, prompts for BEiT-3 and the decoders
TEXT_LEN = "text_len"
IMAGES = "images"  # images given to a mask decoder: 1 (broadcast over the prompts) or one per prompt

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
    # Whether Triton's dynamic batcher concatenates requests along BATCH (max_batch_size > 0).  The
    # mask decoders are called with one image and N prompts, two leading axes of different sizes,
    # which Triton cannot batch: they are served with max_batch_size 0 and full shapes.
    triton_batching: bool = True

    @property
    def onnx_file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def max_rows(self) -> int:
        """The most rows (BATCH) one call may carry: the profile's maximum."""
        return self.axes[BATCH].max

    @property
    def max_batch_size(self) -> int:
        """Triton's max_batch_size for this graph's model (0: not batched by Triton)."""
        return self.max_rows if self.triton_batching else 0

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


def _sam_images() -> TensorSpec:
    return TensorSpec("images", "float32", (BATCH, 3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE))


def _image_embeddings(leading: str) -> TensorSpec:
    return TensorSpec("image_embeddings", "float32", (leading, SAM_EMBEDDING_DIM, SAM_EMBEDDING_SIZE, SAM_EMBEDDING_SIZE))


def _high_res_features(leading: str) -> Tuple[TensorSpec, ...]:
    return tuple(TensorSpec(f"high_res_feats_{level}", "float32", (leading, channels, size, size))
                 for level, (channels, size) in enumerate(SAM2_HIGH_RES_FEATURES))


TEXT_EMBEDS = TensorSpec("text_embeds", "float32", (BATCH, 1, SAM_EMBEDDING_DIM))
DECODER_OUTPUTS = (
    TensorSpec("low_res_masks", "float32", (BATCH, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE)),
    TensorSpec("iou_predictions", "float32", (BATCH, 1)),
)
# One image broadcast over up to 16 prompts is the served case; up to 16 images (one per prompt)
# keeps the graph usable paired, which the tests compare it with.
DECODER_AXES = {IMAGES: AxisRange(1, 1, 16), BATCH: AxisRange(1, 4, 16)}

SAM_IMAGE_ENCODER = GraphSpec(
    name="sam_image_encoder",
    description="SAM ViT image encoder: padded, normalised 1024x1024 view -> 64x64 embeddings",
    inputs=(_sam_images(),),
    outputs=(_image_embeddings(BATCH),),
    axes={BATCH: AxisRange(1, 1, 4)},
    preferred_batch_sizes=(2, 4),
    max_queue_delay_us=5000,
    # One global-attention matrix of ViT-H on a 1024² image is 16 x 4096² floats (1 GiB): keep
    # the export's sample batches small.
    export_batches=(1, 2),
)

SAM2_IMAGE_ENCODER = GraphSpec(
    name="sam2_image_encoder",
    description="SAM-2 Hiera + FPN image encoder: normalised 1024x1024 view -> 64x64 embeddings (no_mem_embed "
                "added) and the decoder's 256x256 and 128x128 high-resolution features",
    inputs=(_sam_images(),),
    outputs=(_image_embeddings(BATCH),) + _high_res_features(BATCH),
    axes={BATCH: AxisRange(1, 1, 4)},
    preferred_batch_sizes=(2, 4),
    max_queue_delay_us=5000,
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
    outputs=(TEXT_EMBEDS,),
    axes={BATCH: AxisRange(1, 4, 16), TEXT_LEN: AxisRange(2, TEXT_BUCKET, MAX_TEXT_TOKENS)},
    preferred_batch_sizes=(4, 8, 16),
)

PROMPT_MASK_DECODER = GraphSpec(
    name="prompt_mask_decoder",
    description="SAM prompt encoder (text prompt as one sparse token) + mask decoder, single mask; "
                "one image's embedding broadcast over the prompts",
    inputs=(_image_embeddings(IMAGES), TEXT_EMBEDS),
    outputs=DECODER_OUTPUTS,
    axes=DECODER_AXES,
    preferred_batch_sizes=(),
    triton_batching=False,
)

SAM2_PROMPT_MASK_DECODER = GraphSpec(
    name="sam2_prompt_mask_decoder",
    description="SAM-2 prompt encoder (text prompt only) + mask decoder with high-resolution features; the "
                "recipe's mask selection is part of the graph; one image's features broadcast over the prompts",
    inputs=(_image_embeddings(IMAGES),) + _high_res_features(IMAGES) + (TEXT_EMBEDS,),
    outputs=DECODER_OUTPUTS,
    axes=DECODER_AXES,
    preferred_batch_sizes=(),
    triton_batching=False,
)


@dataclass(frozen=True)
class FamilySpec:
    """A model family: which image encoder and mask decoder graphs it exports (BEiT-3 is shared).

    The image encoder's outputs are the per-image features the embedding cache keeps and the mask
    decoder takes, by the same names."""

    name: str
    description: str
    image_encoder: GraphSpec
    mask_decoder: GraphSpec
    prompt_encoder: GraphSpec = BEIT3_FUSION_ENCODER

    @property
    def graphs(self) -> Tuple[GraphSpec, ...]:
        return (self.image_encoder, self.prompt_encoder, self.mask_decoder)

    @property
    def image_features(self) -> Tuple[TensorSpec, ...]:
        return self.image_encoder.outputs

    @property
    def feature_bytes(self) -> int:
        """float32 bytes of one image's features (what a cache entry mostly holds)."""
        return sum(4 * int(np.prod(t.shape[1:])) for t in self.image_features)


ORI = FamilySpec("ori", "EVF-SAM: SAM ViT (huge/large/base) image encoder", SAM_IMAGE_ENCODER, PROMPT_MASK_DECODER)
SAM2 = FamilySpec("sam2", "EVF-SAM2: SAM-2 Hiera image encoder", SAM2_IMAGE_ENCODER, SAM2_PROMPT_MASK_DECODER)
FAMILIES: Dict[str, FamilySpec] = {f.name: f for f in (ORI, SAM2)}

GRAPHS: Tuple[GraphSpec, ...] = tuple({g.name: g for f in FAMILIES.values() for g in f.graphs}.values())
GRAPHS_BY_NAME: Dict[str, GraphSpec] = {g.name: g for g in GRAPHS}
TOKENIZER_FILE = "tokenizer.json"


def family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}") from None


@dataclass(frozen=True)
class ServedModelSpec:
    """The client-facing contract of a served model."""

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

# Encode once, prompt many: one image (or the key of one sent before) and N prompts -> N masks.
# Image features are cached across requests (and across both served models) under
# image_key = sha256(image bytes), hex.  `mask_format` picks how masks come back: "raw" (the
# `masks` tensor, the default), "rle" (COCO RLE JSON per mask) or "png" (a PNG file per mask), the
# last two in `masks_encoded`.  `cache_hit` says whether the image's features came from the cache.
RAW_MASKS, RLE_MASKS, PNG_MASKS = "raw", "rle", "png"
MASK_FORMATS = (RAW_MASKS, RLE_MASKS, PNG_MASKS)
EVF_SAM_PROMPTS = ServedModelSpec(
    name="evf_sam_prompts",
    inputs=(
        TensorSpec("image", "object", (1,), optional=True),
        TensorSpec("image_key", "object", (1,), optional=True),
        TensorSpec("prompts", "object", (PROMPTS,)),
        TensorSpec("mask_format", "object", (1,), optional=True),
    ),
    outputs=(
        TensorSpec("masks", "uint8", (PROMPTS, HEIGHT, WIDTH)),
        TensorSpec("scores", "float32", (PROMPTS,)),
        TensorSpec("image_key", "object", (1,)),
        TensorSpec("cache_hit", "bool", (1,)),
        TensorSpec("masks_encoded", "object", (PROMPTS,)),
    ),
    max_batch_size=0,
)
MAX_PROMPTS_PER_REQUEST = 64

# The image-feature cache both served models call (internal, decoupled so that one instance serves
# requests concurrently; model_repository/image_cache.py, evfsam/embedding_cache.py).  One request,
# one response, by `op`:
#   get     image_key [+ claim]  -> status "hit" + the entry, "claimed" (the caller computes the entry
#                                   and must `put` or `release` it) or "unknown" (claim false)
#   put     image_key + the entry -> status "stored"
#   release image_key             -> status "released" (the owner of a claim gave up)
ORIGINAL_SIZE = TensorSpec("original_size", "int64", (2,))  # (H, W) of the decoded image
RESIZED_SIZE = TensorSpec("resized_size", "int64", (2,))  # (h, w) of the image inside the 1024 SAM view
IMAGE_CACHE_NAME = "image_feature_cache"
CACHE_GET, CACHE_PUT, CACHE_RELEASE = "get", "put", "release"
CACHE_HIT, CACHE_CLAIMED, CACHE_UNKNOWN = "hit", "claimed", "unknown"


def cache_entry_tensors(family_spec: FamilySpec) -> Tuple[TensorSpec, ...]:
    """The tensors of one cache entry, each for a single image."""
    single = {BATCH: 1}
    images_evf = BEIT3_FUSION_ENCODER.input("images_evf")
    return (ORIGINAL_SIZE, RESIZED_SIZE, TensorSpec(images_evf.name, images_evf.dtype, images_evf.concrete_shape(single))) \
        + tuple(TensorSpec(t.name, t.dtype, t.concrete_shape(single)) for t in family_spec.image_features)


def image_cache_spec(family_spec: FamilySpec) -> ServedModelSpec:
    entry = tuple(TensorSpec(t.name, t.dtype, t.shape, optional=True) for t in cache_entry_tensors(family_spec))
    return ServedModelSpec(
        name=IMAGE_CACHE_NAME,
        inputs=(TensorSpec("op", "object", (1,)), TensorSpec("image_key", "object", (1,)),
                TensorSpec("claim", "bool", (1,), optional=True)) + entry,
        outputs=(TensorSpec("status", "object", (1,)),) + cache_entry_tensors(family_spec),
        max_batch_size=0,
    )


# Prometheus metrics the python models publish on Triton's metrics port.  In flight = started -
# finished (counted in one try/finally per request of the two served models); the launcher drains
# on it before stopping Triton (see serving/server.py).
PIPELINE_STARTED_METRIC = "evf_sam_pipeline_requests_started"
PIPELINE_FINISHED_METRIC = "evf_sam_pipeline_requests_finished"
CACHE_METRICS = {
    "hits": "evf_sam_embedding_cache_hits",
    "misses": "evf_sam_embedding_cache_misses",
    "evictions": "evf_sam_embedding_cache_evictions",
}
CACHE_BYTES_METRIC = "evf_sam_embedding_cache_bytes"
CACHE_ENTRIES_METRIC = "evf_sam_embedding_cache_entries"
# The encoder admission (the cache's claims): images being encoded now, requests waiting for a slot.
ENCODES_IN_FLIGHT_METRIC = "evf_sam_image_encodes_in_flight"
ENCODES_WAITING_METRIC = "evf_sam_image_encodes_waiting"
