"""Builders for EVF-SAM ("ori": SAM) and EVF-SAM2 ("sam2": SAM-2) from `config.json`, with every
hyper-parameter written out.

Size presets are upstream's: SAM ViT-H/L/B as in segment-anything's `build_sam.py`; SAM-2 Hiera-L/T
as in `model/segment_anything_2/sam2_configs/sam2_hiera_{l,t}.yaml` (what upstream's
`EvfSam2Model` builds for `sam_scale` "large" / "tiny", with `build_sam2`'s dynamic multimask
fallback); BEiT-3 base/large as in `model/unilm/beit3/modeling_utils.py`.  `config.json` does not
name the family (both have `model_type` "evf", and `sam_scale` "large" exists in both): the
checkpoint's weight names decide it (`evfsam.checkpoint`).

Optional config blocks override a preset so that tests can build small models in the real
checkpoint layout: `"sam_image_encoder": {"embed_dim", "depth", "num_heads", "global_attn_indexes"}`
("ori"), `"sam2_image_encoder": {"embed_dim", "num_heads", "stages", "global_att_blocks",
"window_spec", "window_pos_embed_bkg_spatial_size"}` ("sam2"; the FPN channels follow from
embed_dim x 2^stage) and `"beit3": {"embed_dim", "layers", "attention_heads", "ffn_embed_dim",
"vocab_size", "img_size", "patch_size"}`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, ClassVar, Dict, List, Mapping, Tuple, Union

import torch
from . import sam_modeling

from ..processing import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from ..specs import SAM_EMBEDDING_DIM, SAM_EMBEDDING_SIZE, SAM_IMAGE_SIZE
from . import sam2
from .beit3 import BEiT3Config, BEiT3Wrapper
from .evf_sam import EvfSamModel
from .evf_sam2 import EvfSam2Model

FAMILIES = ("ori", "sam2")


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


@dataclass(frozen=True)
class HieraConfig:
    embed_dim: int
    num_heads: int
    stages: Tuple[int, ...]
    global_att_blocks: Tuple[int, ...]
    window_spec: Tuple[int, ...]
    window_pos_embed_bkg_spatial_size: Tuple[int, int]

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def channel_list(self) -> List[int]:
        """Trunk output channels, coarsest level first (SAM-2's `backbone_channel_list`)."""
        return [self.embed_dim * 2**stage for stage in reversed(range(len(self.stages)))]


SAM2_IMAGE_ENCODERS: Dict[str, HieraConfig] = {
    "large": HieraConfig(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                         window_spec=(8, 4, 16, 8), window_pos_embed_bkg_spatial_size=(7, 7)),
    "tiny": HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                        window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(7, 7)),
}

BEIT3_ENCODERS: Dict[str, BEiT3Config] = {
    "large": BEiT3Config(embed_dim=1024, layers=24, attention_heads=16, ffn_embed_dim=4096, vocab_size=64010),
    "base": BEiT3Config(embed_dim=768, layers=12, attention_heads=12, ffn_embed_dim=3072, vocab_size=64010),
}

PIXEL_MEAN = SAM_PIXEL_MEAN.tolist()
PIXEL_STD = SAM_PIXEL_STD.tolist()

SAM_OVERRIDE_KEYS = frozenset(f.name for f in fields(SamImageEncoderConfig))
SAM2_OVERRIDE_KEYS = frozenset(f.name for f in fields(HieraConfig))
IMAGE_ENCODER_BLOCKS = {"ori": "sam_image_encoder", "sam2": "sam2_image_encoder"}
BEIT3_OVERRIDE_KEYS = frozenset(
    {"embed_dim", "layers", "attention_heads", "ffn_embed_dim", "vocab_size", "img_size", "patch_size"}
)


@dataclass(frozen=True)
class EvfSamConfig:
    """EVF-SAM "ori": SAM ViT image encoder."""

    family: ClassVar[str] = "ori"
    hidden_size: int
    out_dim: int
    sam: SamImageEncoderConfig
    beit3: BEiT3Config
    sam_scale: str
    mm_extractor_scale: str

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "EvfSamConfig":
        hidden_size, out_dim, beit_scale, beit3 = _common_fields(raw, cls.family)
        sam_scale = _choice(raw, "sam_scale", SAM_IMAGE_ENCODERS, default="huge")
        sam = _override(SAM_IMAGE_ENCODERS[sam_scale], raw.get("sam_image_encoder"), SAM_OVERRIDE_KEYS, "sam_image_encoder")
        sam = replace(sam, global_attn_indexes=tuple(sam.global_attn_indexes))
        if any(not 0 <= i < sam.depth for i in sam.global_attn_indexes):
            raise ConfigError(f"config.json: global_attn_indexes {sam.global_attn_indexes} outside depth {sam.depth}")
        return cls(hidden_size, out_dim, sam, beit3, sam_scale, beit_scale)


@dataclass(frozen=True)
class EvfSam2Config:
    """EVF-SAM2: SAM-2 with a Hiera image encoder.  `sam` is the Hiera trunk."""

    family: ClassVar[str] = "sam2"
    hidden_size: int
    out_dim: int
    sam: HieraConfig
    beit3: BEiT3Config
    sam_scale: str
    mm_extractor_scale: str

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "EvfSam2Config":
        hidden_size, out_dim, beit_scale, beit3 = _common_fields(raw, cls.family)
        sam_scale = _choice(raw, "sam_scale", SAM2_IMAGE_ENCODERS, default=None)
        hiera = _override(SAM2_IMAGE_ENCODERS[sam_scale], raw.get("sam2_image_encoder"), SAM2_OVERRIDE_KEYS, "sam2_image_encoder")
        hiera = _check_hiera(replace(
            hiera,
            stages=_int_tuple(hiera.stages, "stages"),
            global_att_blocks=_int_tuple(hiera.global_att_blocks, "global_att_blocks"),
            window_spec=_int_tuple(hiera.window_spec, "window_spec"),
            window_pos_embed_bkg_spatial_size=_int_tuple(
                hiera.window_pos_embed_bkg_spatial_size, "window_pos_embed_bkg_spatial_size"),
        ))
        return cls(hidden_size, out_dim, hiera, beit3, sam_scale, beit_scale)


EvfConfig = Union[EvfSamConfig, EvfSam2Config]
CONFIGS = {"ori": EvfSamConfig, "sam2": EvfSam2Config}


def config_from_dict(raw: Mapping[str, Any], family: str) -> EvfConfig:
    """The config of `family` ("ori" or "sam2") from config.json's contents."""
    if family not in CONFIGS:
        raise ConfigError(f"unknown EVF-SAM family {family!r}; expected one of {FAMILIES}")
    return CONFIGS[family].from_dict(raw)


def _common_fields(raw: Mapping[str, Any], family: str) -> Tuple[int, int, str, BEiT3Config]:
    model_type = raw.get("model_type")
    if model_type != "evf":
        raise ConfigError(f"config.json: model_type is {model_type!r}, expected 'evf'")
    for other, block in IMAGE_ENCODER_BLOCKS.items():
        if other != family and block in raw:
            raise ConfigError(f"config.json: {block!r} sizes an EVF-SAM {other!r} image encoder, not {family!r}")
    beit_scale = _choice(raw, "mm_extractor_scale", BEIT3_ENCODERS, default=None)
    beit3 = _override(BEIT3_ENCODERS[beit_scale], raw.get("beit3"), BEIT3_OVERRIDE_KEYS, "beit3")
    for key in ("hidden_size", "out_dim"):
        if not isinstance(raw.get(key), int):
            raise ConfigError(f"config.json: {key!r} must be an integer, got {raw.get(key)!r}")
    if raw["hidden_size"] != beit3.embed_dim:
        raise ConfigError(f"config.json: hidden_size {raw['hidden_size']} != BEiT-3 embed_dim {beit3.embed_dim}")
    if raw["out_dim"] != SAM_EMBEDDING_DIM:
        raise ConfigError(f"config.json: out_dim must be {SAM_EMBEDDING_DIM} (SAM's prompt dim)")
    return raw["hidden_size"], raw["out_dim"], beit_scale, beit3


def _int_tuple(value: Any, name: str) -> Tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ConfigError(f"config.json: sam2_image_encoder {name!r} must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def _check_hiera(cfg: HieraConfig) -> HieraConfig:
    """SAM-2's image path needs 4 stages (strides 4..32; the decoder takes strides 4, 8, 16)."""
    problems = []
    if len(cfg.stages) != 4 or min(cfg.stages) < 1:
        problems.append(f"stages {cfg.stages} must be 4 positive block counts")
    if len(cfg.window_spec) != len(cfg.stages):
        problems.append(f"window_spec {cfg.window_spec} needs one window size per stage ({len(cfg.stages)})")
    if any(not 0 <= i < cfg.depth for i in cfg.global_att_blocks):
        problems.append(f"global_att_blocks {cfg.global_att_blocks} outside depth {cfg.depth}")
    if len(cfg.window_pos_embed_bkg_spatial_size) != 2:
        problems.append(f"window_pos_embed_bkg_spatial_size {cfg.window_pos_embed_bkg_spatial_size} must be [h, w]")
    if not isinstance(cfg.embed_dim, int) or not isinstance(cfg.num_heads, int) or cfg.num_heads < 1 \
            or cfg.embed_dim % cfg.num_heads:
        problems.append(f"num_heads {cfg.num_heads} must divide embed_dim {cfg.embed_dim}")
    if problems:
        raise ConfigError("config.json: sam2_image_encoder: " + "; ".join(problems))
    return cfg


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


def build_sam2(cfg: HieraConfig) -> sam2.Sam2Base:
    """SAM-2 as `sam2_hiera_*.yaml` + upstream's `build_sam2` build it, trunk sized by `cfg`."""
    d_model = SAM_EMBEDDING_DIM
    mem_dim = 64
    image_encoder = sam2.ImageEncoder(
        trunk=sam2.Hiera(
            embed_dim=cfg.embed_dim,
            num_heads=cfg.num_heads,
            stages=cfg.stages,
            global_att_blocks=cfg.global_att_blocks,
            window_spec=cfg.window_spec,
            window_pos_embed_bkg_spatial_size=cfg.window_pos_embed_bkg_spatial_size,
        ),
        neck=sam2.FpnNeck(
            d_model=d_model,
            backbone_channel_list=cfg.channel_list,
            fpn_top_down_levels=(2, 3),  # levels 0 and 1 (strides 4, 8) are lateral only
            position_encoding=sam2.PositionEmbeddingSine(num_pos_feats=d_model, temperature=10000),
        ),
        scalp=1,  # the stride-32 level is dropped
    )
    memory_attention = sam2.MemoryAttention(d_model=d_model, num_layers=4, dim_feedforward=2048, num_heads=1, kv_in_dim=mem_dim)
    memory_encoder = sam2.MemoryEncoder(
        in_dim=d_model,
        out_dim=mem_dim,
        mask_downsampler=sam2.MaskDownSampler(embed_dim=d_model, kernel_size=3, stride=2, padding=1, total_stride=16),
        fuser=sam2.Fuser(dim=d_model, num_layers=2, kernel_size=7, padding=3),
    )
    prompt_encoder = sam2.PromptEncoder(
        embed_dim=d_model,
        image_embedding_size=(SAM_EMBEDDING_SIZE, SAM_EMBEDDING_SIZE),
        mask_in_chans=16,
    )
    mask_decoder = sam2.MaskDecoder(
        transformer_dim=d_model,
        transformer=sam2.TwoWayTransformer(depth=2, embedding_dim=d_model, num_heads=8, mlp_dim=2048),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        stability_delta=0.05,
        stability_thresh=0.98,
    )
    return sam2.Sam2Base(
        image_encoder=image_encoder,
        memory_attention=memory_attention,
        memory_encoder=memory_encoder,
        sam_prompt_encoder=prompt_encoder,
        sam_mask_decoder=mask_decoder,
        num_maskmem=7,
        hidden_dim=d_model,
        mem_dim=mem_dim,
    )


def build_evf_sam(cfg: EvfSamConfig) -> EvfSamModel:
    return EvfSamModel(
        visual_model=build_sam(cfg.sam),
        mm_extractor=BEiT3Wrapper(cfg.beit3),
        hidden_size=cfg.hidden_size,
        out_dim=cfg.out_dim,
    )


def build_evf_sam2(cfg: EvfSam2Config) -> EvfSam2Model:
    return EvfSam2Model(
        visual_model=build_sam2(cfg.sam),
        mm_extractor=BEiT3Wrapper(cfg.beit3),
        hidden_size=cfg.hidden_size,
        out_dim=cfg.out_dim,
    )


def build_evf_model(cfg: EvfConfig) -> Union[EvfSamModel, EvfSam2Model]:
    """EVF-SAM or EVF-SAM2, whichever `cfg` describes."""
    return build_evf_sam2(cfg) if cfg.family == "sam2" else build_evf_sam(cfg)
