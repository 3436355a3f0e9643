"""SAM-2's prompt encoder, text prompts only (EVF-SAM2 feeds neither points, boxes nor masks).

Upstream EVF-SAM2 adds a `text_embeds` argument to SAM-2's prompt encoder: with only a text
prompt the sparse embeddings are the text embeddings and the dense embedding is `no_mask_embed`
at every position.  The point, box and mask-input parameters are in the published state dict, so
they are kept (unused) under SAM-2's names.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .. import sam_modeling
from .common import LayerNorm2d

# SAM-2 computes the dense positional encoding exactly as segment-anything does.
PositionEmbeddingRandom = sam_modeling.prompt_encoder.PositionEmbeddingRandom


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int], mask_in_chans: int, num_point_embeddings: int = 4):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # Unused with text prompts: point / box-corner labels, padding point, mask-input encoder.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """[1,C,h,w] positional encoding of the image-embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def forward(self, text_embeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[N,T,C] text embeddings -> sparse [N,T,C] and dense [1,C,1,1] (broadcast over N, h, w)."""
        return text_embeds, self.no_mask_embed.weight.reshape(1, -1, 1, 1)
