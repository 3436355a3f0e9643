"""The settings of the python-backend models, as config.pbtxt parameters: serving/repository.py writes
them from these classes and the models read them back with the same classes (Triton keeps every
parameter value as a string)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Mapping, Type, TypeVar

from .processing import ImageLimits
from .tokenization import PromptTokenizer

T = TypeVar("T")

# Defaults of the request limits (README "Bad input contract").  Raw masks: prompts x H x W bytes;
# 256 Mi keeps a response far below gRPC's 2 GiB message limit and fits the python backend's shared
# memory comfortably.  Encoded masks travel small but cost the same CPU per pixel: 4x that.
DEFAULT_MAX_OUTPUT_PIXELS = 256 * 1024**2
DEFAULT_MAX_ENCODED_OUTPUT_PIXELS = 1024**3
DEFAULT_BLS_TIMEOUT_S = 600.0  # a full-size SAM ViT-H encodes one image in ~80 s on a small CPU


def config_parameters(config: Mapping) -> Dict[str, str]:
    """A parsed model config's `parameters` (Triton keeps every value as a string)."""
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def _from_parameters(cls: Type[T], params: Mapping[str, str]) -> T:
    values = {}
    for f in fields(cls):
        if f.name not in params:
            raise KeyError(f"model config parameter {f.name!r} is missing")
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}[f.type]
        values[f.name] = kind(params[f.name])
    return cls(**values)


@dataclass(frozen=True)
class InputLimits:
    tokenizer_file: str  # relative to the model's version directory
    max_text_tokens: int
    max_image_bytes: int
    max_image_pixels: int
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS
    max_encoded_output_pixels: int = DEFAULT_MAX_ENCODED_OUTPUT_PIXELS

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "InputLimits":
        return _from_parameters(cls, params)

    def to_parameters(self) -> Dict[str, object]:
        return asdict(self)

    def tokenizer(self, version_dir: Path) -> PromptTokenizer:
        return PromptTokenizer(version_dir / self.tokenizer_file, self.max_text_tokens)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_image_pixels)


@dataclass(frozen=True)
class PipelineSettings:
    """What the two served models (`evf_sam`, `evf_sam_prompts`: one source, model_repository/segment.py)
    need beyond the limits: which contract they serve, the family and recipe of the exported graphs,
    and how long a call to another model may take."""

    contract: str  # the ServedModelSpec name: "evf_sam" | "evf_sam_prompts"
    family: str
    recipe: str
    bls_timeout_s: float = DEFAULT_BLS_TIMEOUT_S

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "PipelineSettings":
        return _from_parameters(cls, params)

    def to_parameters(self) -> Dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class CacheSettings:
    """The feature cache model: its byte budget, after how long a claim counts as abandoned, and how
    many images may be encoded at once (claims in flight; 0: unbounded)."""

    family: str
    cache_bytes: int
    claim_timeout_s: float = DEFAULT_BLS_TIMEOUT_S
    max_claims: int = 0

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "CacheSettings":
        return _from_parameters(cls, params)

    def to_parameters(self) -> Dict[str, object]:
        return asdict(self)
