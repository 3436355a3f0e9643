"""Export wrappers: one module per graph, `forward` takes and returns tensors only."""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from evfsam.recipes import get_recipe
from evfsam.specs import (BEIT3_FUSION_ENCODER, PROMPT_MASK_DECODER, SAM2_IMAGE_ENCODER, SAM2_PROMPT_MASK_DECODER,
                          SAM_IMAGE_ENCODER, GraphSpec)


class SamImageEncoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class Sam2ImageEncoderGraph(nn.Module):
    """Hiera's position embedding (a bicubic resize of one weight plus a tiled window embedding) is
    computed once here and traced as a constant: no Resize or Tile in the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("trunk_position_embedding", model.trunk_position_embedding(), persistent=False)

    def forward(self, images: torch.Tensor):
        return self.model.encode_image(images, self.trunk_position_embedding)


class Beit3FusionEncoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images_evf: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_prompt(images_evf, input_ids, attention_mask)


class PromptMaskDecoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_embeddings: torch.Tensor, text_embeds: torch.Tensor):
        return self.model.decode_masks(image_embeddings, text_embeds)


class Sam2PromptMaskDecoderGraph(nn.Module):
    """The recipe's mask selection ("single-stability" or "multimask-best") is fixed in the graph."""

    def __init__(self, model: nn.Module, mask_selection: str):
        super().__init__()
        self.model = model
        self.mask_selection = mask_selection

    def forward(self, image_embeddings: torch.Tensor, high_res_feats_0: torch.Tensor, high_res_feats_1: torch.Tensor,
                text_embeds: torch.Tensor):
        return self.model.decode_masks(image_embeddings, high_res_feats_0, high_res_feats_1, text_embeds,
                                       self.mask_selection)


GRAPH_WRAPPERS: Dict[str, Callable[[nn.Module, str], nn.Module]] = {
    SAM_IMAGE_ENCODER.name: lambda model, _selection: SamImageEncoderGraph(model),
    SAM2_IMAGE_ENCODER.name: lambda model, _selection: Sam2ImageEncoderGraph(model),
    BEIT3_FUSION_ENCODER.name: lambda model, _selection: Beit3FusionEncoderGraph(model),
    PROMPT_MASK_DECODER.name: lambda model, _selection: PromptMaskDecoderGraph(model),
    SAM2_PROMPT_MASK_DECODER.name: Sam2PromptMaskDecoderGraph,
}


def graph_wrapper(spec: GraphSpec, model: nn.Module, recipe: str) -> nn.Module:
    """The export module of `spec` around `model`, in eval mode; `recipe` fixes what the graph bakes in
    (the SAM-2 decoder's mask selection)."""
    try:
        make = GRAPH_WRAPPERS[spec.name]
    except KeyError:
        raise KeyError(f"no export wrapper for graph {spec.name!r}") from None
    return make(model, get_recipe(recipe).mask_selection).eval()
