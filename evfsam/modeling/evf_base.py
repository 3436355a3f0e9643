"""What both EVF-SAM families share: the BEiT-3 fusion of image and prompt, projected to a SAM prompt.

Subclasses add the segmenter (`visual_model`: SAM for "ori", SAM-2 for "sam2").

Parameter names are upstream's (`mm_extractor.beit3.*`, `text_hidden_fcs.0.{0,2}.*`).
"""
from __future__ import annotations

import torch
from torch import nn

from .beit3 import BEiT3Wrapper


class EvfBase(nn.Module):
    def __init__(self, visual_model: nn.Module, mm_extractor: BEiT3Wrapper, hidden_size: int, out_dim: int):
        super().__init__()
        self.visual_model = visual_model  # SAM or SAM-2; first, as upstream registers it
        self.mm_extractor = mm_extractor
        self.text_hidden_fcs = nn.ModuleList(
            [nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, out_dim))]
        )

    def encode_prompt(
        self, images_evf: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """BEiT-3 fusion of the 224x224 view and the tokens; its [CLS] through the MLP -> [B,1,256]."""
        encoder_out = self.mm_extractor.beit3(
            visual_tokens=images_evf,
            textual_tokens=input_ids,
            text_padding_position=attention_mask == 0,
        )
        return self.text_hidden_fcs[0](encoder_out[:, :1, :])
