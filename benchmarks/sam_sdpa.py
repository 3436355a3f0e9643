"""segment-anything's image-encoder attention on `F.scaled_dot_product_attention`.

The original computes softmax((q * scale) @ k^T + rel_pos) @ v with explicit tensors and builds its
relative-position gather indices on the host at every call (a host sync, which CUDA-graph capture
rejects).  Here the decomposed relative-position term is an additive attention bias handed to SDPA,
and the gather indices are precomputed device buffers.  Same weights, same result up to rounding:
`gpu_torch` checks it against the eager model.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


def relative_index(size: int, device=None) -> torch.Tensor:
    """[size, size] rows of the (2 * size - 1)-row table for query i and key j: i - j + size - 1."""
    positions = torch.arange(size, device=device)
    return positions[:, None] - positions[None, :] + (size - 1)


class SdpaAttention(nn.Module):
    """Drop-in for `segment_anything.modeling.image_encoder.Attention` (use_rel_pos=True), sharing its
    parameters."""

    def __init__(self, original: nn.Module, grid: Tuple[int, int]):
        super().__init__()
        height, width = grid
        for table, size in ((original.rel_pos_h, height), (original.rel_pos_w, width)):
            if table.shape[0] != 2 * size - 1:
                raise ValueError(f"relative-position table of {table.shape[0]} rows does not fit a {grid} grid")
        self.num_heads = original.num_heads
        self.qkv, self.proj = original.qkv, original.proj
        self.rel_pos_h, self.rel_pos_w = original.rel_pos_h, original.rel_pos_w
        device = original.rel_pos_h.device
        self.register_buffer("index_h", relative_index(height, device), persistent=False)
        self.register_buffer("index_w", relative_index(width, device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, H*W, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias(q, height, width))
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))

    def position_bias(self, q: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, heads, H*W, H*W]: bias[(h, w), (kh, kw)] = q(h, w) . Rh[h, kh] + q(h, w) . Rw[w, kw]."""
        batch, heads, _, dim = q.shape
        grid_q = q.reshape(batch, heads, height, width, dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, self.rel_pos_h[self.index_h])
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, self.rel_pos_w[self.index_w])
        bias = rel_h[..., :, None] + rel_w[..., None, :]
        return bias.reshape(batch, heads, height * width, height * width)


def use_sdpa(image_encoder: nn.Module) -> int:
    """Swap every block's attention of a SAM `ImageEncoderViT` in place; returns how many."""
    grid = image_encoder.patch_embed.proj.stride
    tokens = (image_encoder.img_size // grid[0], image_encoder.img_size // grid[1])
    for block in image_encoder.blocks:
        size = (block.window_size, block.window_size) if block.window_size > 0 else tokens
        block.attn = SdpaAttention(block.attn, size)
    return len(image_encoder.blocks)
