"""SAM-2 (`SAM2Base`) as EVF-SAM2 uses it: the image path, plus the video modules as parameter holders.

Attribute names are SAM2Base's, so the state dict is `image_encoder.*`, `sam_prompt_encoder.*`,
`sam_mask_decoder.*`, `memory_attention.*`, `memory_encoder.*`, `maskmem_tpos_enc`,
`no_mem_embed`, `no_mem_pos_enc`, `no_obj_ptr`, `obj_ptr_proj.*`, `mask_downsample.*`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .common import MLP
from .image_encoder import ImageEncoder
from .mask_decoder import MaskDecoder
from .memory import MemoryAttention, MemoryEncoder
from .prompt_encoder import PromptEncoder


class Sam2Base(nn.Module):
    def __init__(
        self,
        image_encoder: ImageEncoder,
        memory_attention: MemoryAttention,
        memory_encoder: MemoryEncoder,
        sam_prompt_encoder: PromptEncoder,
        sam_mask_decoder: MaskDecoder,
        num_maskmem: int,
        hidden_dim: int,
        mem_dim: int,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)  # video only
        self.memory_attention = memory_attention
        self.memory_encoder = memory_encoder
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(num_maskmem, 1, 1, mem_dim))  # video only
        # Added to the image embedding of a frame without memories (every single image).
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, hidden_dim))  # video only
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, hidden_dim))  # video only
        self.sam_prompt_encoder = sam_prompt_encoder
        self.sam_mask_decoder = sam_mask_decoder
        self.obj_ptr_proj = MLP(hidden_dim, hidden_dim, hidden_dim, 3)  # video only

    def forward_image(
        self, images: torch.Tensor, trunk_position_embedding: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B,3,1024,1024] -> image embedding [B,256,64,64] (with `no_mem_embed` added, as upstream's
        image path does) and the decoder's projected high-res features [B,32,256,256], [B,64,128,128].
        """
        level0, level1, level2 = self.image_encoder(images, trunk_position_embedding)
        image_embed = level2 + self.no_mem_embed.reshape(1, -1, 1, 1)
        return image_embed, self.sam_mask_decoder.conv_s0(level0), self.sam_mask_decoder.conv_s1(level1)
