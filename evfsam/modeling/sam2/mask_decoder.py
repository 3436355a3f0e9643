"""SAM-2's mask decoder, with EVF-SAM2's two ways of choosing the one mask it serves.

Output tokens are [object-score, IoU, 4 mask tokens] followed by the prompt tokens.  The upscaled
image embedding adds the projected stride-8 and stride-4 backbone features ("high-res features",
projected once per image by `conv_s1` / `conv_s0`).  IoU predictions go through a sigmoid.

Mask selection (upstream `EvfSam2Model.inference`, which calls this decoder directly):
- MULTIMASK_BEST (hustvl/EVF-SAM from commit 9d00853, `multimask_output=True`): of the three
  multimask outputs (tokens 1..3), the one with the highest predicted IoU.
- SINGLE_STABILITY (before 9d00853, `multimask_output=False`): token 0, but SAM-2's
  `dynamic_multimask_via_stability` (switched on by upstream's `build_sam2`) falls back to the best
  multimask output when token 0's mask has a stability score below the threshold.
Either way the served score is the (sigmoid) IoU prediction of the chosen mask.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .transformer import TwoWayTransformer

MULTIMASK_BEST = "multimask-best"
SINGLE_STABILITY = "single-stability"
MASK_SELECTIONS = (MULTIMASK_BEST, SINGLE_STABILITY)


class MaskDecoder(nn.Module):
    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int,
        iou_head_depth: int,
        iou_head_hidden_dim: int,
        stability_delta: float,
        stability_thresh: float,
    ):
        super().__init__()
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.stability_delta = stability_delta
        self.stability_thresh = stability_thresh
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, sigmoid_output=True
        )
        self.pred_obj_score_head = MLP(transformer_dim, transformer_dim, 1, 3)

    def upscale(self, image_tokens: torch.Tensor, feat_s0: torch.Tensor, feat_s1: torch.Tensor) -> torch.Tensor:
        """[N,C,h,w] transformer output -> [N,C/8,4h,4w], adding the high-res features on the way."""
        deconv1, norm1, act1, deconv2, act2 = self.output_upscaling
        upscaled = act1(norm1(deconv1(image_tokens) + feat_s1))
        return act2(deconv2(upscaled) + feat_s0)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        feat_s0: torch.Tensor,
        feat_s1: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All mask tokens: logits [N,4,4h,4w], IoU [N,4], object-score logits [N,1].

        Image tensors have batch 1 (one image for all N prompts) or N (image i with prompt i).
        """
        prompts = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(prompts, -1, -1), sparse_prompt_embeddings), dim=1)
        # Image batch, not prompts: the transformer's attention broadcasts one image over the prompts.
        src = image_embeddings + dense_prompt_embeddings
        _, channels, height, width = src.shape

        hs, image_tokens = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 1, :]
        mask_tokens_out = hs[:, 2 : 2 + self.num_mask_tokens, :]

        upscaled = self.upscale(image_tokens.transpose(1, 2).reshape(-1, channels, height, width), feat_s0, feat_s1)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        _, up_channels, up_height, up_width = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(-1, up_channels, up_height * up_width)).reshape(
            -1, self.num_mask_tokens, up_height, up_width
        )
        return masks, self.iou_prediction_head(iou_token_out), self.pred_obj_score_head(hs[:, 0, :])

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: List[torch.Tensor],
        mask_selection: str,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The chosen mask per prompt: logits [N,1,4h,4w] and its IoU prediction [N,1].

        `high_res_features` = [feat_s0 (stride 4, C/8), feat_s1 (stride 8, C/4)], already projected.
        """
        if mask_selection not in MASK_SELECTIONS:
            raise ValueError(f"mask_selection {mask_selection!r}; expected one of {MASK_SELECTIONS}")
        feat_s0, feat_s1 = high_res_features
        masks, iou_pred, _ = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, feat_s0, feat_s1
        )
        best_masks, best_iou = best_multimask(masks, iou_pred)
        if mask_selection == MULTIMASK_BEST:
            return best_masks, best_iou
        stable = self.stability_scores(masks[:, 0:1]) >= self.stability_thresh  # [N,1]
        return (
            torch.where(stable[..., None, None], masks[:, 0:1], best_masks),
            torch.where(stable, iou_pred[:, 0:1], best_iou),
        )

    def stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """IoU of the masks thresholded at +delta and at -delta; 1 where both are empty."""
        mask_logits = mask_logits.flatten(-2)
        area_inner = torch.sum(mask_logits > self.stability_delta, dim=-1).float()
        area_outer = torch.sum(mask_logits > -self.stability_delta, dim=-1).float()
        return torch.where(area_outer > 0, area_inner / area_outer, 1.0)


def best_multimask(masks: torch.Tensor, iou_pred: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Of mask tokens 1.., the one with the highest predicted IoU: ([N,1,H,W], [N,1])."""
    best = iou_pred[:, 1:].argmax(dim=1, keepdim=True) + 1  # [N,1]
    best_masks = torch.gather(masks, 1, best[:, :, None, None].expand(-1, -1, masks.shape[2], masks.shape[3]))
    return best_masks, torch.gather(iou_pred, 1, best)
