"""The "ori" EVF-SAM model: SAM (segment-anything's modules) + BEiT-3 + the projection MLP.

Parameter names are upstream's (hustvl/EVF-SAM `model/evf_sam.py`): `visual_model.*`,
`mm_extractor.beit3.*`, `text_hidden_fcs.0.{0,2}.*`, so a published state dict loads unchanged.
`encode_prompt` (BEiT-3 + projection) comes from `EvfBase`, shared with EVF-SAM2.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import sam_modeling
from .beit3 import BEiT3Wrapper
from .evf_base import EvfBase


class EvfSamModel(EvfBase):
    def __init__(self, visual_model: sam_modeling.Sam, mm_extractor: BEiT3Wrapper, hidden_size: int, out_dim: int):
        super().__init__(visual_model, mm_extractor, hidden_size, out_dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,1024,1024] normalised, padded SAM view -> [B,256,64,64]."""
        return self.visual_model.image_encoder(images)

    def decode_masks(
        self, image_embeddings: torch.Tensor, text_embeds: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """`text_embeds` [N,1,256] with `image_embeddings` [1,256,64,64] (one image broadcast over the N
        prompts, as upstream's decoder repeats an image for every prompt) or [N,256,64,64] (image i
        with prompt i).  Returns single-mask logits [N,1,256,256] and IoU [N,1].
        """
        prompt_encoder = self.visual_model.prompt_encoder
        decoder = self.visual_model.mask_decoder
        batch = text_embeds.shape[0]
        # The prompt encoder with only a text prompt: sparse = the text token, dense = no-mask embed.
        sparse = text_embeds
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            batch, -1, image_embeddings.shape[-2], image_embeddings.shape[-1]
        )
        image_pe = prompt_encoder.get_dense_pe()

        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse), dim=1)
        src = image_embeddings.expand(batch, -1, -1, -1) + dense
        pos_src = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = decoder.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
            dim=1,
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, decoder.num_mask_tokens, h, w)
        iou_pred = decoder.iou_prediction_head(iou_token_out)
        # multimask_output=False, as upstream's inference: the first mask token only.
        return masks[:, 0:1], iou_pred[:, 0:1]
