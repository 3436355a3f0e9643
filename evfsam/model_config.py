"""The request limits that `preprocess` and `evf_sam_prompts` enforce, as config.pbtxt parameters:
serving/repository.py writes them from this class and the python models read them back with it."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Mapping

from .processing import ImageLimits
from .tokenization import PromptTokenizer


def config_parameters(config: Mapping) -> Dict[str, str]:
    """A parsed model config's `parameters` (Triton keeps every value as a string)."""
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


@dataclass(frozen=True)
class InputLimits:
    tokenizer_file: str  # relative to the model's version directory
    max_text_tokens: int
    max_image_bytes: int
    max_image_pixels: int

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "InputLimits":
        return cls(params["tokenizer_file"], int(params["max_text_tokens"]), int(params["max_image_bytes"]),
                   int(params["max_image_pixels"]))

    def to_parameters(self) -> Dict[str, object]:
        return asdict(self)

    def tokenizer(self, version_dir: Path) -> PromptTokenizer:
        return PromptTokenizer(version_dir / self.tokenizer_file, self.max_text_tokens)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_image_pixels)
