"""Parameter holders for SAM-2's video-memory modules.

EVF-SAM2 segments single images, where SAM-2's memory attention and memory encoder never run, but
the published checkpoints carry their weights (`visual_model.memory_attention.*`,
`visual_model.memory_encoder.*`).  These modules reproduce SAM-2's names and shapes so that a
checkpoint loads strictly (every key, every shape); they have no forward.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d
from .transformer import Attention


class MemoryAttentionLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, num_heads: int, kv_in_dim: int):
        super().__init__()
        self.self_attn = Attention(d_model, num_heads)  # SAM-2: RoPEAttention (no extra parameters)
        self.cross_attn_image = Attention(d_model, num_heads, kv_in_dim=kv_in_dim)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)


class MemoryAttention(nn.Module):
    def __init__(self, d_model: int, num_layers: int, dim_feedforward: int, num_heads: int, kv_in_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(d_model, dim_feedforward, num_heads, kv_in_dim) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)


class MaskDownSampler(nn.Module):
    """`encoder`: (conv, LayerNorm2d, GELU) per stride step, channels x stride^2 each, then a 1x1 conv."""

    def __init__(self, embed_dim: int, kernel_size: int, stride: int, padding: int, total_stride: int):
        super().__init__()
        steps = round(math.log(total_stride, stride))
        layers, channels = [], 1
        for _ in range(steps):
            layers += [
                nn.Conv2d(channels, channels * stride**2, kernel_size=kernel_size, stride=stride, padding=padding),
                LayerNorm2d(channels * stride**2),
                nn.GELU(),
            ]
            channels *= stride**2
        layers.append(nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)


class CXBlock(nn.Module):
    """ConvNeXt block.  Its layer scale is `weight` in EVF-SAM's vendored SAM-2 (Meta's `gamma`)."""

    def __init__(self, dim: int, kernel_size: int, padding: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.weight = nn.Parameter(torch.full((dim,), 1e-6))  # layer scale


class Fuser(nn.Module):
    def __init__(self, dim: int, num_layers: int, kernel_size: int, padding: int):
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim, kernel_size, padding) for _ in range(num_layers))


class MemoryEncoder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, mask_downsampler: MaskDownSampler, fuser: Fuser):
        super().__init__()
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = fuser
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)
