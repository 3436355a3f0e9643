"""Export wrappers: one module per graph, `forward` takes and returns tensors only."""
from __future__ import annotations

from typing import Dict, Type

import torch
from torch import nn

from evfsam.modeling.evf_sam import EvfSamModel
from evfsam.specs import BEIT3_FUSION_ENCODER, PROMPT_MASK_DECODER, SAM_IMAGE_ENCODER


class SamImageEncoderGraph(nn.Module):
    def __init__(self, model: EvfSamModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class Beit3FusionEncoderGraph(nn.Module):
    def __init__(self, model: EvfSamModel):
        super().__init__()
        self.model = model

    def forward(self, images_evf: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_prompt(images_evf, input_ids, attention_mask)


class PromptMaskDecoderGraph(nn.Module):
    def __init__(self, model: EvfSamModel):
        super().__init__()
        self.model = model

    def forward(self, image_embeddings: torch.Tensor, text_embeds: torch.Tensor):
        return self.model.decode_masks(image_embeddings, text_embeds)


GRAPH_WRAPPERS: Dict[str, Type[nn.Module]] = {
    SAM_IMAGE_ENCODER.name: SamImageEncoderGraph,
    BEIT3_FUSION_ENCODER.name: Beit3FusionEncoderGraph,
    PROMPT_MASK_DECODER.name: PromptMaskDecoderGraph,
}
