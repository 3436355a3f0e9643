"""Hiera, SAM-2's hierarchical image trunk (https://arxiv.org/abs/2306.00989), as SAM-2 configures it.

Four stages; at each stage change the first block halves the resolution by max-pooling its queries
(and its shortcut) and doubles the channels.  Blocks attend within non-overlapping windows
(zero-padded when the window does not divide the feature map) except the global-attention blocks.
The trunk returns the last feature map of every stage, highest resolution first.

Parameter names are SAM-2's (`patch_embed.proj`, `pos_embed`, `pos_embed_window`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.layers.K,proj}`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """[B,H,W,C] -> [B*nWindows, ws, ws, C], zero-padding H and W up to multiples of ws.

    Returns the windows and the padded size (Hp, Wp).
    """
    _, height, width, channels = x.shape
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.reshape(-1, padded_h // window_size, window_size, padded_w // window_size, window_size, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`: [B*nWindows, ws, ws, C] -> [B,H,W,C] without the padding."""
    padded_h, padded_w = padded_hw
    height, width = hw
    channels = windows.shape[-1]
    x = windows.reshape(-1, padded_h // window_size, padded_w // window_size, window_size, window_size, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, padded_h, padded_w, channels)
    if padded_h > height or padded_w > width:
        x = x[:, :height, :width, :]
    return x


def pool_nhwc(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """Apply a [B,C,H,W] pooling module to a [B,H,W,C] tensor."""
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """7x7 stride-4 convolution; [B,3,H,W] -> [B,H/4,W/4,C]."""

    def __init__(self, embed_dim: int, in_chans: int = 3, kernel_size: int = 7, stride: int = 4, padding: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries are optionally max-pooled (stage changes)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: Optional[nn.Module] = None):
        super().__init__()
        self.dim_out = dim_out
        self.num_heads = num_heads
        self.head_dim = dim_out // num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(-1, height * width, 3, self.num_heads, self.head_dim)
        q, k, v = torch.unbind(qkv, 2)  # [B, HW, heads, head_dim]
        if self.q_pool is not None:
            q = pool_nhwc(q.reshape(-1, height, width, self.dim_out), self.q_pool)
            height, width = q.shape[1:3]
            q = q.reshape(-1, height * width, self.num_heads, self.head_dim)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x.transpose(1, 2).reshape(-1, height, width, self.dim_out)
        return self.proj(x)


class MultiScaleBlock(nn.Module):
    """Pre-norm (windowed) attention + MLP block; with `q_stride` it also downsamples by that stride."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        window_size: int,
        q_stride: Optional[Tuple[int, int]] = None,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride, ceil_mode=False) if q_stride else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads=num_heads, q_pool=self.pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=norm_eps)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=nn.GELU)
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.proj is not None:
            shortcut = self.proj(x)
            if self.pool is not None:
                shortcut = pool_nhwc(shortcut, self.pool)

        window_size = self.window_size
        if window_size > 0:
            hw = x.shape[1:3]
            x, padded_hw = window_partition(x, window_size)
        x = self.attn(x)
        if window_size > 0:
            if self.q_stride:
                # The queries were pooled: the windows and the map shrank by the stride.
                window_size //= self.q_stride[0]
                hw = shortcut.shape[1:3]
                # ceil without a negative floor division: ONNX's integer Div truncates, so a traced
                # -(-size // ws) would round down where the windows were padded.
                padded_hw = tuple((size + window_size - 1) // window_size * window_size for size in hw)
            x = window_unpartition(x, window_size, padded_hw, hw)

        x = shortcut + x
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class BlockSpec:
    dim: int
    dim_out: int
    num_heads: int
    window_size: int  # 0: global attention
    q_stride: Optional[Tuple[int, int]]


def block_specs(
    embed_dim: int,
    num_heads: int,
    stages: Sequence[int],
    global_att_blocks: Sequence[int],
    window_spec: Sequence[int],
    q_pool: int = 3,
    q_stride: Tuple[int, int] = (2, 2),
    dim_mul: float = 2.0,
    head_mul: float = 2.0,
) -> List[BlockSpec]:
    """Per-block sizes as Hiera lays them out.

    The first block of a stage already has the new width and head count, pools its queries, and
    (lagging by one block) still uses the previous stage's window size, which the pooling shrinks.
    """
    stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
    q_pool_blocks = [end + 1 for end in stage_ends[:-1]][:q_pool]
    specs, stage = [], 0
    for index in range(sum(stages)):
        window_size = 0 if index in global_att_blocks else window_spec[stage]
        dim_out = embed_dim
        if index - 1 in stage_ends:
            dim_out = int(embed_dim * dim_mul)
            num_heads = int(num_heads * head_mul)
            stage += 1
        specs.append(BlockSpec(embed_dim, dim_out, num_heads, window_size,
                               q_stride if index in q_pool_blocks else None))
        embed_dim = dim_out
    return specs


class Hiera(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        stages: Sequence[int],
        global_att_blocks: Sequence[int],
        window_spec: Sequence[int],
        window_pos_embed_bkg_spatial_size: Tuple[int, int],
    ):
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(f"Hiera: {len(stages)} stages but {len(window_spec)} window sizes")
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        self.patch_embed = PatchEmbed(embed_dim)
        # Windowed positional embedding (https://arxiv.org/abs/2311.05613): a background
        # embedding interpolated to the feature map plus one window's embedding tiled over it.
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        specs = block_specs(embed_dim, num_heads, stages, global_att_blocks, window_spec)
        self.blocks = nn.ModuleList(
            MultiScaleBlock(s.dim, s.dim_out, s.num_heads, s.window_size, s.q_stride) for s in specs
        )
        self.channel_list = [self.blocks[end].attn.dim_out for end in self.stage_ends[::-1]]

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """[1,H,W,C] for a patch grid of HxW; depends on the weights only, so it can be a constant."""
        background = F.interpolate(self.pos_embed, size=(height, width), mode="bicubic")
        window = self.pos_embed_window
        tiles = (height // window.shape[-2], width // window.shape[-1])
        return (background + window.repeat(1, 1, *tiles)).permute(0, 2, 3, 1)

    def forward(self, images: torch.Tensor, position_embedding: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """[B,3,H,W] -> one [B,C_s,H_s,W_s] map per stage (strides 4, 8, 16, 32).

        `position_embedding` (from `position_embedding()`) skips recomputing it from the weights.
        """
        x = self.patch_embed(images)
        if position_embedding is None:
            position_embedding = self.position_embedding(x.shape[1], x.shape[2])
        x = x + position_embedding
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
