"""SAM-2's image encoder: the Hiera trunk and a feature-pyramid neck.

The neck projects every trunk level to `d_model` channels with a 1x1 convolution and adds the
nearest-upsampled coarser level to the levels in `fpn_top_down_levels`.  `scalp` drops the
coarsest levels from the output.  Parameter names are SAM-2's (`trunk.*`, `neck.convs.N.conv`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
from torch import nn

from .hiera import Hiera
from .position_encoding import PositionEmbeddingSine


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of [B,C,H,W] as a broadcast (no Resize op in exported graphs)."""
    _, channels, height, width = x.shape
    return x[:, :, :, None, :, None].expand(-1, -1, -1, 2, -1, 2).reshape(-1, channels, 2 * height, 2 * width)


class FpnNeck(nn.Module):
    def __init__(
        self,
        d_model: int,
        backbone_channel_list: Sequence[int],
        fpn_top_down_levels: Sequence[int],
        position_encoding: PositionEmbeddingSine,
    ):
        """`backbone_channel_list` runs from the coarsest level to the finest, as SAM-2 orders it."""
        super().__init__()
        self.backbone_channel_list = list(backbone_channel_list)
        self.fpn_top_down_levels = list(fpn_top_down_levels)
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(channels, d_model, kernel_size=1)))
            for channels in backbone_channel_list
        )
        self.position_encoding = position_encoding

    def forward(self, levels: List[torch.Tensor]) -> List[torch.Tensor]:
        """Trunk levels (finest first) -> neck features (finest first)."""
        last = len(levels) - 1
        outputs: List[Optional[torch.Tensor]] = [None] * len(levels)
        coarser = None
        for level in range(last, -1, -1):
            lateral = self.convs[last - level](levels[level])
            if level in self.fpn_top_down_levels and coarser is not None:
                # SAM-2 upsamples in float32.
                lateral = lateral + upsample_nearest_2x(coarser.float())
            coarser = outputs[level] = lateral
        return outputs


class ImageEncoder(nn.Module):
    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int):
        super().__init__()
        if trunk.channel_list != neck.backbone_channel_list:
            raise ValueError(f"trunk channels {trunk.channel_list} != neck channels {neck.backbone_channel_list}")
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, images: torch.Tensor, trunk_position_embedding: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """[B,3,H,W] -> neck features of the kept levels, finest first (SAM-2's `backbone_fpn`)."""
        features = self.neck(self.trunk(images, trunk_position_embedding))
        return features[: len(features) - self.scalp]

    def position_encodings(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """SAM-2's `vision_pos_enc` for `features` (used by video memory attention only)."""
        return [self.neck.position_encoding(f).to(f.dtype) for f in features]
