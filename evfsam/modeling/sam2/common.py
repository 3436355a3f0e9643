"""Building blocks shared by the SAM-2 modules."""
from __future__ import annotations

from typing import Type

import torch
from torch import nn

from .. import sam_modeling

# SAM-2's LayerNorm2d is segment-anything's, formula and parameter names alike.
LayerNorm2d = sam_modeling.common.LayerNorm2d


class MLP(nn.Module):
    """`num_layers` linear layers (`layers.0`, `layers.1`, ...), `activation` between them."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: Type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        x = self.layers[-1](x)
        return torch.sigmoid(x) if self.sigmoid_output else x
