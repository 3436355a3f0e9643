"""EVF-SAM2: SAM-2 (Hiera image encoder) + BEiT-3 + the projection MLP.

Parameter names are upstream's (hustvl/EVF-SAM `model/evf_sam2.py`): `visual_model.*` is SAM2Base
(`visual_model.image_encoder.trunk.*`, `visual_model.sam_mask_decoder.*`, ...), and
`mm_extractor.beit3.*`, `text_hidden_fcs.*` are as in "ori", so a published state dict loads unchanged.

The image path is upstream's `EvfSam2Model.inference`: `forward_image`, `no_mem_embed` added to the
stride-16 level, the text-only prompt encoder, and SAM-2's mask decoder with the high-res features.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..specs import SAM_IMAGE_SIZE
from .beit3 import BEiT3Wrapper
from .evf_base import EvfBase
from .sam2 import MULTIMASK_BEST, Sam2Base

HIERA_PATCH_STRIDE = 4


class EvfSam2Model(EvfBase):
    visual_model: Sam2Base

    def __init__(self, visual_model: Sam2Base, mm_extractor: BEiT3Wrapper, hidden_size: int, out_dim: int):
        super().__init__(visual_model, mm_extractor, hidden_size, out_dim)

    @torch.no_grad()
    def trunk_position_embedding(self) -> torch.Tensor:
        """Hiera's position embedding for a 1024x1024 input, [1,256,256,C]: weights only, so an
        export can hold it as a constant instead of bicubic-resizing and tiling in the graph."""
        grid = SAM_IMAGE_SIZE // HIERA_PATCH_STRIDE
        return self.visual_model.image_encoder.trunk.position_embedding(grid, grid)

    def encode_image(
        self, images: torch.Tensor, trunk_position_embedding: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B,3,1024,1024] normalised SAM-2 view -> (image_embeddings [B,256,64,64],
        high_res_feats_0 [B,32,256,256], high_res_feats_1 [B,64,128,128])."""
        return self.visual_model.forward_image(images, trunk_position_embedding)

    def decode_masks(
        self,
        image_embeddings: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        text_embeds: torch.Tensor,
        mask_selection: str = MULTIMASK_BEST,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """N prompts [N,1,256] against image tensors of batch 1 (one image for all prompts) or N
        (image i with prompt i) -> the chosen mask's logits [N,1,256,256] and IoU prediction [N,1].

        `mask_selection` is `sam2.MULTIMASK_BEST` (upstream from commit 9d00853) or
        `sam2.SINGLE_STABILITY` (before it); a Python string, so a traced graph holds it as a constant.
        """
        sam = self.visual_model
        sparse, dense = sam.sam_prompt_encoder(text_embeds)
        return sam.sam_mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            high_res_features=[high_res_feats_0, high_res_feats_1],
            mask_selection=mask_selection,
        )
