"""Meta's SAM-2 (pip `sam2==1.1.0`) built as upstream EVF-SAM2 builds it, for parity tests.

`sam2/__init__.py` starts hydra; the modeling subpackage needs only torch (and iopath), so the
parent package is registered bare, as `evfsam.modeling` does for segment-anything.  The model is
constructed directly with `sam2_hiera_l.yaml`'s arguments plus the three `build_sam2` overrides
(`dynamic_multimask_via_stability`, delta 0.05, thresh 0.98), trunk sized by a `HieraConfig`.

pip sam2 1.1.0 is the SAM 2.1 code base.  For the modules compared here it is numerically the same
as the first SAM-2 release that upstream vendors (checked by diffing the two): the differences are
`contiguous().view` -> `reshape` in the window (un)partition, no `sdp_kernel` context around
`scaled_dot_product_attention` (on CPU the same kernel runs), the prompt encoder's point labels
via `torch.where` (points are unused here), the SAM-2.1 `no_obj_embed_spatial` / signed-tpos
options (off in the SAM-2 config, no parameters), and `CXBlock.gamma`, which upstream renamed
`weight`.  Upstream's `text_embeds` prompt is reproduced by concatenating the text embeddings to
the (empty) sparse embeddings, as upstream's prompt encoder does.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Dict

import torch

from evfsam.modeling.builder import HieraConfig


def _sam2_modules() -> types.SimpleNamespace:
    if "sam2" not in sys.modules:
        spec = importlib.util.find_spec("sam2")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("pip sam2==1.1.0 is not installed (see the Makefile's install recipe)")
        package = types.ModuleType("sam2")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["sam2"] = package
    names = {
        "sam2_base": "sam2.modeling.sam2_base",
        "hieradet": "sam2.modeling.backbones.hieradet",
        "image_encoder": "sam2.modeling.backbones.image_encoder",
        "position_encoding": "sam2.modeling.position_encoding",
        "memory_attention": "sam2.modeling.memory_attention",
        "memory_encoder": "sam2.modeling.memory_encoder",
        "transformer": "sam2.modeling.sam.transformer",
    }
    return types.SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})


meta = _sam2_modules()


def build_meta_sam2(hiera: HieraConfig) -> "meta.sam2_base.SAM2Base":
    m = meta
    trunk = m.hieradet.Hiera(
        embed_dim=hiera.embed_dim,
        num_heads=hiera.num_heads,
        stages=list(hiera.stages),
        global_att_blocks=list(hiera.global_att_blocks),
        window_pos_embed_bkg_spatial_size=list(hiera.window_pos_embed_bkg_spatial_size),
        window_spec=list(hiera.window_spec),
    )
    neck = m.image_encoder.FpnNeck(
        position_encoding=m.position_encoding.PositionEmbeddingSine(num_pos_feats=256, normalize=True, scale=None, temperature=10000),
        d_model=256,
        backbone_channel_list=hiera.channel_list,
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    image_encoder = m.image_encoder.ImageEncoder(scalp=1, trunk=trunk, neck=neck)

    def rope_attention(**extra):
        return m.transformer.RoPEAttention(rope_theta=10000.0, feat_sizes=[32, 32], embedding_dim=256, num_heads=1,
                                           downsample_rate=1, dropout=0.1, **extra)

    layer = m.memory_attention.MemoryAttentionLayer(
        activation="relu", dim_feedforward=2048, dropout=0.1, pos_enc_at_attn=False,
        self_attention=rope_attention(), d_model=256, pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False, cross_attention=rope_attention(rope_k_repeat=True, kv_in_dim=64),
    )
    memory_attention = m.memory_attention.MemoryAttention(d_model=256, pos_enc_at_input=True, layer=layer, num_layers=4)
    memory_encoder = m.memory_encoder.MemoryEncoder(
        out_dim=64,
        position_encoding=m.position_encoding.PositionEmbeddingSine(num_pos_feats=64, normalize=True, scale=None, temperature=10000),
        mask_downsampler=m.memory_encoder.MaskDownSampler(kernel_size=3, stride=2, padding=1),
        fuser=m.memory_encoder.Fuser(
            layer=m.memory_encoder.CXBlock(dim=256, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True),
            num_layers=2,
        ),
    )
    return m.sam2_base.SAM2Base(
        image_encoder=image_encoder,
        memory_attention=memory_attention,
        memory_encoder=memory_encoder,
        num_maskmem=7,
        image_size=1024,
        sigmoid_scale_for_mem_enc=20.0,
        sigmoid_bias_for_mem_enc=-10.0,
        use_mask_input_as_output_without_sam=True,
        directly_add_no_mem_embed=True,
        use_high_res_features_in_sam=True,
        multimask_output_in_sam=True,
        iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True,
        add_tpos_enc_to_obj_ptrs=False,
        only_obj_ptrs_in_the_past_for_eval=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True,
        multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        use_mlp_for_obj_ptr_proj=True,
        compile_image_encoder=False,
        sam_mask_decoder_extra_args={
            "dynamic_multimask_via_stability": True,
            "dynamic_multimask_stability_delta": 0.05,
            "dynamic_multimask_stability_thresh": 0.98,
        },
    ).eval()


def upstream_state_dict(meta_model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Meta's state dict under upstream's names (CXBlock `gamma` -> `weight`)."""
    return {
        (k[: -len("gamma")] + "weight" if k.endswith(".gamma") else k): v for k, v in meta_model.state_dict().items()
    }


def meta_state_dict(upstream_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Upstream's SAM-2 state dict under Meta's names (CXBlock `weight` -> `gamma`)."""
    return {
        (k[: -len("weight")] + "gamma" if _is_cx_layer_scale(k) else k): v for k, v in upstream_state.items()
    }


def _is_cx_layer_scale(name: str) -> bool:
    parts = name.split(".")
    return parts[:3] == ["memory_encoder", "fuser", "layers"] and len(parts) == 5 and parts[4] == "weight"


def upstream_decode(meta_model, image_embeddings, feat_s0, feat_s1, text_embeds, multimask_output: bool):
    """Upstream `EvfSam2Model.inference` from the prompt encoder on, for ONE image (batch 1) and N prompts.

    Returns the chosen masks [N,1,256,256] and their IoU predictions [N,1].
    """
    prompt_encoder = meta_model.sam_prompt_encoder
    batch = text_embeds.shape[0]
    # Upstream's prompt encoder with text_embeds only: empty sparse embeddings + the text, and the
    # no-mask embedding expanded to the prompt batch.
    sparse = torch.cat([torch.empty((batch, 0, text_embeds.shape[-1])), text_embeds], dim=1)
    _, dense = prompt_encoder(points=None, boxes=None, masks=None)
    dense = dense.expand(batch, -1, -1, -1)
    masks, iou, _, _ = meta_model.sam_mask_decoder(
        image_embeddings=image_embeddings,
        image_pe=prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        repeat_image=True,
        high_res_features=[feat_s0, feat_s1],
    )
    if multimask_output:
        sorted_ids = torch.argsort(iou, dim=-1, descending=True)
        masks = torch.take_along_dim(masks, sorted_ids[..., None, None], dim=1)[:, :1]
        iou = torch.take_along_dim(iou, sorted_ids, dim=1)[:, :1]
    return masks, iou


def upstream_image_features(meta_model, images):
    """Upstream `EvfSam2Model.inference`'s image part: (image_embed, high_res_feats[0], high_res_feats[1])."""
    backbone_out = meta_model.forward_image(images)
    _, features, _, _ = meta_model._prepare_backbone_features(backbone_out)
    features[-1] = features[-1] + meta_model.no_mem_embed
    batch = images.shape[0]
    sizes = [(256, 256), (128, 128), (64, 64)]
    feats = [f.permute(1, 2, 0).view(batch, -1, *size) for f, size in zip(features, sizes)]
    return feats[2], feats[0], feats[1]
