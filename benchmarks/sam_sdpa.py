"""segment-anything's image-encoder attention on `F.scaled_dot_product_attention`, two ways.

The original computes softmax((q * scale) @ k^T + rel_h + rel_w) @ v with explicit [H*W, H*W] score
tensors (16 x 4096² per image in a SAM ViT-H global block), and builds its relative-position gather
indices on the host at every call (a host sync, which CUDA-graph capture rejects).  Both versions
here precompute the indices as device buffers and share the original's parameters.

* `SdpaAttention` (the fast path): no attention mask at all, so SDPA may choose its flash kernel.
  The decomposed relative-position term is bilinear in q and a one-hot of the key's row / column:
      rel_h[(h, w), kh] + rel_w[(h, w), kw] = [rel_h(h, w), rel_w(h, w)] . [onehot(kh), onehot(kw)]
  so it folds into the dot product: q' = [q * scale, rel_h, rel_w, 0], k' = [k, onehot_h, onehot_w, 0],
  v' = [v, 0], all padded to one head size that is a multiple of 8 (flash needs q, k, v of one head
  size <= 256: 80 + 64 + 64 = 208 for ViT-H's global blocks, 80 + 14 + 14 -> 112 for its windows),
  and SDPA runs with scale 1.  Same function exactly; the matmuls are wider (2.6x the score FLOPs of a
  global block) but no score, bias or probability tensor is ever written to memory.
* `BiasSdpaAttention`: the relative-position term as a dense float bias [B, heads, N, N]: SDPA can
  then only use its memory-efficient, cuDNN or math kernels (flash takes no mask), and the bias itself
  is one score-sized tensor per call.  Kept to measure what the fold buys.

`gpu_check` checks both against the eager model and reports which SDPA kernel each one ran.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

HEAD_SIZE_MULTIPLE = 8


def relative_index(size: int, device=None) -> torch.Tensor:
    """[size, size] rows of the (2 * size - 1)-row table for query i and key j: i - j + size - 1."""
    positions = torch.arange(size, device=device)
    return positions[:, None] - positions[None, :] + (size - 1)


class _RelPosAttention(nn.Module):
    """What both versions share: the original's parameters and precomputed gather indices."""

    def __init__(self, original: nn.Module, grid: Tuple[int, int]):
        super().__init__()
        height, width = grid
        for table, size in ((original.rel_pos_h, height), (original.rel_pos_w, width)):
            if table.shape[0] != 2 * size - 1:
                raise ValueError(f"relative-position table of {table.shape[0]} rows does not fit a {grid} grid")
        self.num_heads = original.num_heads
        self.scale = original.scale
        self.qkv, self.proj = original.qkv, original.proj
        self.rel_pos_h, self.rel_pos_w = original.rel_pos_h, original.rel_pos_w
        device = original.rel_pos_h.device
        self.register_buffer("index_h", relative_index(height, device), persistent=False)
        self.register_buffer("index_w", relative_index(width, device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, H*W, head_dim]
        out = self.attend(q, k, v, height, width)
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))

    def relative_terms(self, q: torch.Tensor, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """rel_h [B, heads, H*W, H] = q(h, w) . Rh[h, kh]; rel_w [B, heads, H*W, W] = q(h, w) . Rw[w, kw]."""
        batch, heads, _, dim = q.shape
        grid_q = q.reshape(batch, heads, height, width, dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, self.rel_pos_h[self.index_h])
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, self.rel_pos_w[self.index_w])
        return rel_h.reshape(batch, heads, height * width, height), rel_w.reshape(batch, heads, height * width, width)

    def attend(self, q, k, v, height: int, width: int) -> torch.Tensor:
        raise NotImplementedError


class SdpaAttention(_RelPosAttention):
    """Drop-in for `segment_anything.modeling.image_encoder.Attention` (use_rel_pos=True) with no
    attention mask: the relative positions folded into q and k (see the module docstring)."""

    def __init__(self, original: nn.Module, grid: Tuple[int, int]):
        super().__init__(original, grid)
        height, width = grid
        head_dim = original.qkv.out_features // 3 // original.num_heads
        self.head_dim = head_dim
        self.folded_dim = -(-(head_dim + height + width) // HEAD_SIZE_MULTIPLE) * HEAD_SIZE_MULTIPLE
        keys = torch.arange(height * width, device=original.rel_pos_h.device)
        key_rows = F.one_hot(keys // width, height)
        key_cols = F.one_hot(keys % width, width)
        padding = key_rows.new_zeros(height * width, self.folded_dim - head_dim - height - width)
        positions = torch.cat([key_rows, key_cols, padding], dim=1).to(original.rel_pos_h.dtype)
        self.register_buffer("key_positions", positions, persistent=False)  # cast with the module

    def attend(self, q, k, v, height: int, width: int) -> torch.Tensor:
        rel_h, rel_w = self.relative_terms(q, height, width)
        extra = self.folded_dim - self.head_dim
        q_folded = torch.cat([q * self.scale, rel_h, rel_w, q.new_zeros(*q.shape[:-1], extra - height - width)], -1)
        positions = self.key_positions.to(k.dtype).expand(*k.shape[:-1], extra)
        k_folded = torch.cat([k, positions], dim=-1)
        v_folded = F.pad(v, (0, extra))
        out = F.scaled_dot_product_attention(q_folded, k_folded, v_folded, scale=1.0)
        return out[..., : self.head_dim]


class BiasSdpaAttention(_RelPosAttention):
    """Drop-in for segment-anything's Attention with the relative positions as a dense float bias."""

    def attend(self, q, k, v, height: int, width: int) -> torch.Tensor:
        rel_h, rel_w = self.relative_terms(q, height, width)
        batch, heads, tokens, _ = q.shape
        bias = (rel_h.view(batch, heads, tokens, height, 1) + rel_w.view(batch, heads, tokens, 1, width))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(batch, heads, tokens, tokens))


def attention_grid(image_encoder: nn.Module, block: nn.Module) -> Tuple[int, int]:
    """The token grid one block attends over: its window, or the whole image for a global block."""
    if block.window_size > 0:
        return block.window_size, block.window_size
    stride = image_encoder.patch_embed.proj.stride
    return image_encoder.img_size // stride[0], image_encoder.img_size // stride[1]


def use_sdpa(image_encoder: nn.Module, attention: type = SdpaAttention) -> int:
    """Swap every block's attention of a SAM `ImageEncoderViT` in place; returns how many."""
    for block in image_encoder.blocks:
        block.attn = attention(block.attn, attention_grid(image_encoder, block))
    return len(image_encoder.blocks)
