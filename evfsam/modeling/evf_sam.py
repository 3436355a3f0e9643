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
        # The prompt encoder with only a text prompt: sparse = the text token, dense = the no-mask
        # embedding.  The image side (embedding + dense, positional encoding) keeps the images' batch:
        # the transformer's attention broadcasts it over the prompts, so no copy of the 64x64 maps is
        # made per prompt and its first block projects the image tokens once.
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), text_embeds), dim=1)
        src = image_embeddings + prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        _, c, h, w = src.shape
        hs, src = decoder.transformer(src, prompt_encoder.get_dense_pe(), tokens)
        iou_token_out = hs[:, 0, :]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(batch, c, h, w))
        # multimask_output=False, as upstream's inference: the first mask token only.
        hyper_in = decoder.output_hypernetworks_mlps[0](hs[:, 1, :]).unsqueeze(1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, 1, h, w)
        iou_pred = decoder.iou_prediction_head(iou_token_out)
        return masks, iou_pred[:, 0:1]
