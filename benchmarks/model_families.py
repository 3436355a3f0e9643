"""The model families `gpu_check` measures, behind one interface.

A family says whether it can run here (and why not), builds a random-weight model of a size preset on
a device, and swaps in its fast attention.  Models share EVF-SAM's interface:
`encode_image(images) -> tensor or tuple of tensors`, `encode_prompt(images_evf, input_ids,
attention_mask) -> [B,1,256]`, `decode_masks(*image_outputs, text_embeds) -> (low-res logits, IoU)`.
Weights are `export.tiny_checkpoint.random_state_dict` (random, scaled so that masks have both signs:
mask agreement between dtypes then means something), loaded into a model constructed on the device.

* `evf-sam`: SAM ViT + BEiT-3 (evfsam/modeling/evf_sam.py), presets tiny / vit-b / full (ViT-H).
* `evf-sam2`: SAM-2 Hiera + BEiT-3 (evfsam/modeling/evf_sam2.py), when the checkout has it; skipped
  with the reason otherwise.  Its presets are `export.tiny_checkpoint.SAM2_SIZES`.  SAM-2's own
  attention already calls `F.scaled_dot_product_attention`, so its fast path swaps BEiT-3's only, and
  runs under autocast like its eager path: the model cast to bf16 returns float32 image embeddings
  beside bf16 high-resolution features, which its decoder only accepts under autocast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .beit3_sdpa import use_sdpa_beit3
from .sam_sdpa import use_sdpa


@dataclass(frozen=True)
class ModelFamily:
    name: str
    family: str  # evfsam's name of the family: "ori" or "sam2"
    module: str  # must be importable for the family to run
    sizes_attribute: str  # the size presets in export.tiny_checkpoint
    fast_attention: Callable[[nn.Module], List[str]]  # swaps attention in place; says what it did
    fast_autocast: bool = False  # run the fast path under autocast too (models whose half-precision
    #                              forward mixes dtypes and relies on autocast, as upstream SAM-2 does)

    def unavailable(self) -> Optional[str]:
        """Why this family cannot run in this checkout, or None."""
        try:
            importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name == self.module:
                return f"{self.module.replace('.', '/')}.py is not in this checkout"
            return f"cannot import {self.module}: {exc}"
        except ImportError as exc:
            return f"cannot import {self.module}: {exc}"
        tiny_checkpoint = importlib.import_module("export.tiny_checkpoint")
        if not hasattr(tiny_checkpoint, self.sizes_attribute):
            return f"export.tiny_checkpoint has no {self.sizes_attribute} presets for {self.name}"
        return None

    def sizes(self) -> Dict[str, dict]:
        return getattr(importlib.import_module("export.tiny_checkpoint"), self.sizes_attribute)

    def build(self, size: str, device: str, seed: int = 0) -> Tuple[nn.Module, int]:
        """(fp32 model on `device` in eval mode, its text vocabulary size)."""
        from export.tiny_checkpoint import random_state_dict

        if size not in self.sizes():
            raise KeyError(f"{self.name} has no size {size!r}; presets: {sorted(self.sizes())}")
        config = family_config({"model_type": "evf", "out_dim": 256, **self.sizes()[size]}, self.family)
        state = random_state_dict(config, seed)
        with torch.device(device):
            model = build_model(config)
        model.load_state_dict(state)
        return model.eval(), config.beit3.vocab_size


def family_config(raw: dict, family: str):
    """The evfsam config of `family`: the two-family builder where the checkout has it."""
    builder = importlib.import_module("evfsam.modeling.builder")
    if hasattr(builder, "config_from_dict"):
        return builder.config_from_dict(raw, family)
    if family != "ori":
        raise ValueError(f"this checkout's builder knows only the 'ori' family, not {family!r}")
    return builder.EvfSamConfig.from_dict(raw)


def build_model(config) -> nn.Module:
    builder = importlib.import_module("evfsam.modeling.builder")
    return builder.build_evf_model(config) if hasattr(builder, "build_evf_model") else builder.build_evf_sam(config)


def sam_fast_attention(model: nn.Module) -> List[str]:
    swapped = use_sdpa(model.visual_model.image_encoder)
    return [f"SAM image encoder: {swapped} blocks on SDPA, relative positions folded into q.k (no mask)",
            f"BEiT-3: {use_sdpa_beit3(model.mm_extractor)} layers on SDPA with a boolean key-padding mask "
            "(none when no prompt is padded)"]


def sam2_fast_attention(model: nn.Module) -> List[str]:
    return ["SAM-2 image encoder: upstream's own F.scaled_dot_product_attention, unchanged",
            f"BEiT-3: {use_sdpa_beit3(model.mm_extractor)} layers on SDPA with a boolean key-padding mask "
            "(none when no prompt is padded)"]


FAMILIES: Tuple[ModelFamily, ...] = (
    ModelFamily("evf-sam", "ori", "evfsam.modeling.evf_sam", "SIZES", sam_fast_attention),
    ModelFamily("evf-sam2", "sam2", "evfsam.modeling.evf_sam2", "SAM2_SIZES", sam2_fast_attention, fast_autocast=True),
)
FAMILIES_BY_NAME: Dict[str, ModelFamily] = {f.name: f for f in FAMILIES}


def image_outputs(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    outputs = model.encode_image(images)
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def forward(model: nn.Module, images, images_evf, input_ids, attention_mask):
    """Image encoder, BEiT-3 and mask decoder for B (image, prompt) pairs -> (low-res logits, IoU)."""
    return decode(model, image_outputs(model, images), images_evf, input_ids, attention_mask)


def decode(model: nn.Module, encoded: Tuple[torch.Tensor, ...], images_evf, input_ids, attention_mask):
    return model.decode_masks(*encoded, model.encode_prompt(images_evf, input_ids, attention_mask))
