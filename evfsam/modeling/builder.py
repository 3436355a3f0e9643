"""Builders for EVF-SAM from its `config.json`, with every hyper-parameter written out.

Size presets are upstream's: SAM ViT-H/L/B as in segment-anything's `build_sam.py`, BEiT-3 base/large
as in `model/unilm/beit3/modeling_utils.py`.  Two optional config blocks override a preset so that
tests can build tiny models in the real checkpoint layout:
`"sam_image_encoder": {"embed_dim", "depth", "num_heads", "global_attn_indexes"}` and
`"beit3": {"embed_dim", "layers", "attention_heads", "ffn_embed_dim", "vocab_size", "img_size",
"patch_size"}`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, Dict, Mapping, Tuple

import torch
from . import sam_modeling

from ..processing import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from ..specs import SAM_EMBEDDING_DIM, SAM_EMBEDDING_SIZE, SAM_IMAGE_SIZE
from .beit3 import BEiT3Config, BEiT3Wrapper
from .evf_sam import EvfSamModel


class ConfigError(ValueError):
    """config.json does not describe an EVF-SAM model this code can build."""


@dataclass(frozen=True)
class SamImageEncoderConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]


SAM_IMAGE_ENCODERS: Dict[str, SamImageEncoderConfig] = {
    "huge": SamImageEncoderConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "large": SamImageEncoderConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "base": SamImageEncoderConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
}

BEIT3_ENCODERS: Dict[str, BEiT3Config] = {
    "large": BEiT3Config(embed_dim=1024, layers=24, attention_heads=16, ffn_embed_dim=4096, vocab_size=64010),
    "base": BEiT3Config(embed_dim=768, layers=12, attention_heads=12, ffn_embed_dim=3072, vocab_size=64010),
}

PIXEL_MEAN = SAM_PIXEL_MEAN.tolist()
PIXEL_STD = SAM_PIXEL_STD.tolist()

SAM_OVERRIDE_KEYS = frozenset(f.name for f in fields(SamImageEncoderConfig))
BEIT3_OVERRIDE_KEYS = frozenset(
    {"embed_dim", "layers", "attention_heads", "ffn_embed_dim", "vocab_size", "img_size", "patch_size"}
)


@dataclass(frozen=True)
class EvfSamConfig:
    hidden_size: int
    out_dim: int
    sam: SamImageEncoderConfig
    beit3: BEiT3Config
    sam_scale: str
    mm_extractor_scale: str

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "EvfSamConfig":
        model_type = raw.get("model_type")
        if model_type != "evf":
            raise ConfigError(f"config.json: model_type is {model_type!r}, expected 'evf' (EVF-SAM 'ori')")
        sam_scale = _choice(raw, "sam_scale", SAM_IMAGE_ENCODERS, default="huge")
        beit_scale = _choice(raw, "mm_extractor_scale", BEIT3_ENCODERS, default=None)
        sam = _override(SAM_IMAGE_ENCODERS[sam_scale], raw.get("sam_image_encoder"), SAM_OVERRIDE_KEYS, "sam_image_encoder")
        sam = replace(sam, global_attn_indexes=tuple(sam.global_attn_indexes))
        beit3 = _override(BEIT3_ENCODERS[beit_scale], raw.get("beit3"), BEIT3_OVERRIDE_KEYS, "beit3")
        for key in ("hidden_size", "out_dim"):
            if not isinstance(raw.get(key), int):
                raise ConfigError(f"config.json: {key!r} must be an integer, got {raw.get(key)!r}")
        if raw["hidden_size"] != beit3.embed_dim:
            raise ConfigError(
                f"config.json: hidden_size {raw['hidden_size']} != BEiT-3 embed_dim {beit3.embed_dim}"
            )
        if raw["out_dim"] != SAM_EMBEDDING_DIM:
            raise ConfigError(f"config.json: out_dim must be {SAM_EMBEDDING_DIM} (SAM's prompt dim)")
        if any(not 0 <= i < sam.depth for i in sam.global_attn_indexes):
            raise ConfigError(f"config.json: global_attn_indexes {sam.global_attn_indexes} outside depth {sam.depth}")
        return cls(raw["hidden_size"], raw["out_dim"], sam, beit3, sam_scale, beit_scale)


def _choice(raw: Mapping[str, Any], key: str, options: Mapping[str, Any], default):
    value = raw.get(key, default)
    if value not in options:
        raise ConfigError(f"config.json: {key!r} is {value!r}, expected one of {sorted(options)}")
    return value


def _override(preset, block, allowed, name):
    if block is None:
        return preset
    if not isinstance(block, Mapping):
        raise ConfigError(f"config.json: {name!r} must be an object")
    unknown = set(block) - allowed
    if unknown:
        raise ConfigError(f"config.json: unknown keys in {name!r}: {sorted(unknown)}; allowed: {sorted(allowed)}")
    return replace(preset, **block)


def build_sam(cfg: SamImageEncoderConfig) -> "sam_modeling.Sam":
    """segment-anything's `_build_sam` with the image encoder sized by `cfg`."""
    patch_size = 16
    return sam_modeling.Sam(
        image_encoder=sam_modeling.ImageEncoderViT(
            depth=cfg.depth,
            embed_dim=cfg.embed_dim,
            img_size=SAM_IMAGE_SIZE,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.num_heads,
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=cfg.global_attn_indexes,
            window_size=14,
            out_chans=SAM_EMBEDDING_DIM,
        ),
        prompt_encoder=sam_modeling.PromptEncoder(
            embed_dim=SAM_EMBEDDING_DIM,
            image_embedding_size=(SAM_EMBEDDING_SIZE, SAM_EMBEDDING_SIZE),
            input_image_size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=sam_modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=sam_modeling.TwoWayTransformer(depth=2, embedding_dim=SAM_EMBEDDING_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=SAM_EMBEDDING_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
    )


def build_evf_sam(cfg: EvfSamConfig) -> EvfSamModel:
    return EvfSamModel(
        visual_model=build_sam(cfg.sam),
        mm_extractor=BEiT3Wrapper(cfg.beit3),
        hidden_size=cfg.hidden_size,
        out_dim=cfg.out_dim,
    )
