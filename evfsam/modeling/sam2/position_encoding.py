"""Sine position encoding of a feature map (DETR style, normalised), as SAM-2's neck computes it.

Only SAM-2's memory attention (video) consumes these encodings; the image path of EVF-SAM2 does not.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    def __init__(self, num_pos_feats: int, temperature: float = 10000, scale: float = 2 * math.pi, eps: float = 1e-6):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be even, got {num_pos_feats}")
        self.half_dim = num_pos_feats // 2
        self.temperature = temperature
        self.scale = scale
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] -> [B,num_pos_feats,H,W] (y encodings first, then x)."""
        batch, _, height, width = x.shape
        y = torch.arange(1, height + 1, dtype=torch.float32, device=x.device)
        x_pos = torch.arange(1, width + 1, dtype=torch.float32, device=x.device)
        y = y / (y[-1:] + self.eps) * self.scale
        x_pos = x_pos / (x_pos[-1:] + self.eps) * self.scale
        pos_y = self._encode(y)[:, None, :].expand(height, width, -1)
        pos_x = self._encode(x_pos)[None, :, :].expand(height, width, -1)
        pos = torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)
        return pos[None].expand(batch, -1, -1, -1)

    def _encode(self, positions: torch.Tensor) -> torch.Tensor:
        """[N] -> [N, half_dim]: sin on even channels, cos on odd ones, frequencies in pairs."""
        dim_t = torch.arange(self.half_dim, dtype=torch.float32, device=positions.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.half_dim)
        angles = positions[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)
