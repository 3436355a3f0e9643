"""The eager PyTorch reference: upstream `inference.py` + `EvfSamModel.inference` (`TorchPipeline`) and
`EvfSam2Model.inference` (`Sam2TorchPipeline`), op for op.

Pre- and post-processing here use torch (as upstream does); the numpy versions in
`evfsam.processing` that the server runs are tested against these.  The mask decoder is called
through segment-anything's own `MaskDecoder.forward` with upstream's text-prompt convention, so it is
an independent check of the batched decoder graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .modeling.evf_sam import EvfSamModel
from .modeling.evf_sam2 import EvfSam2Model
from .processing import SAM_PIXEL_MEAN, SAM_PIXEL_STD, RecipeLike, get_recipe, resized_shape
from .specs import BEIT3_IMAGE_SIZE, SAM_IMAGE_SIZE


def torch_sam_view(rgb: np.ndarray, recipe: RecipeLike = "ori") -> Tuple[torch.Tensor, Tuple[int, int]]:
    """upstream's SAM preprocessing for `recipe` (see `evfsam.processing.RECIPES`), op for op."""
    name = get_recipe(recipe).name
    if name == "ori":  # inference.py sam_preprocess(model_type="ori")
        new_h, new_w = resized_shape(*rgb.shape[:2])
        x = _normalise(torch.from_numpy(_pil_resize(rgb, new_h, new_w)).permute(2, 0, 1).contiguous())
        return F.pad(x, (0, SAM_IMAGE_SIZE - new_w, 0, SAM_IMAGE_SIZE - new_h)), (new_h, new_w)
    if name == "sam2-v1":  # inference.py at 9d00853^: ResizeLongestSide, normalise, F.interpolate bilinear
        new_h, new_w = resized_shape(*rgb.shape[:2])
        x = _normalise(torch.from_numpy(_pil_resize(rgb, new_h, new_w)).permute(2, 0, 1).contiguous())
        x = F.interpolate(x.unsqueeze(0), (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mode="bilinear").squeeze(0)
    elif name == "sam2-v2":  # inference.py from 9d00853: F.interpolate on the uint8 tensor, then normalise
        x = _normalise(torch_uint8_resize(rgb, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE))
    else:  # eval.py: utils/dataset.py Resize(1024).apply_image, ValDataset.preprocess (no pad for sam2)
        x = _normalise(torch.from_numpy(_pil_resize(rgb, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE)).permute(2, 0, 1).contiguous())
    return x, (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE)


def torch_uint8_resize(rgb: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [3, height, width]: `F.interpolate` of the uint8 CHW tensor (torch's CPU uint8 kernel)."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    return F.interpolate(x.unsqueeze(0), (height, width), mode="bilinear", align_corners=False).squeeze(0)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.from_numpy(SAM_PIXEL_MEAN).view(-1, 1, 1)) / torch.from_numpy(SAM_PIXEL_STD).view(-1, 1, 1)


def _pil_resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision `resize(to_pil_image(rgb), (height, width))` on a PIL image is PIL's bilinear."""
    return np.array(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def torch_beit3_view(rgb: np.ndarray, recipe: RecipeLike = "ori") -> torch.Tensor:
    """upstream `beit3_preprocess` (every recipe): ToTensor, Resize(224, BICUBIC, antialias=None), Normalize(0.5, 0.5)."""
    get_recipe(recipe)
    x = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float().div(255)
    x = F.interpolate(x[None], size=(BEIT3_IMAGE_SIZE, BEIT3_IMAGE_SIZE), mode="bicubic", align_corners=False)[0]
    return (x - 0.5) / 0.5


def torch_mask_logits(low_res: torch.Tensor, resized: Tuple[int, int], original: Tuple[int, int],
                      recipe: RecipeLike = "ori") -> torch.Tensor:
    """[B,1,256,256] -> [B,1,H,W]: segment-anything `Sam.postprocess_masks` ("crop") or
    `EvfSam2Model.postprocess_masks` ("direct")."""
    if get_recipe(recipe).mask_postprocess == "direct":
        return F.interpolate(low_res.float(), original, mode="bilinear", align_corners=False)
    masks = F.interpolate(low_res, (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mode="bilinear", align_corners=False)
    masks = masks[..., : resized[0], : resized[1]]
    return F.interpolate(masks, original, mode="bilinear", align_corners=False)


@dataclass
class Segmentation:
    mask: np.ndarray  # uint8 0/1 [H, W]
    score: float  # the decoder's IoU prediction
    logits: np.ndarray  # float32 [H, W] before the threshold


class TorchPipeline:
    """One image + one prompt -> mask, exactly as upstream's `inference.py` computes it."""

    def __init__(self, model: EvfSamModel, tokenize: Callable[[str], List[int]], device="cpu", dtype=torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenize = tokenize
        self.device = device
        self.dtype = dtype

    @torch.inference_mode()
    def image_embeddings(self, rgb: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
        images, resized = torch_sam_view(rgb)
        return self.model.encode_image(images[None].to(self.device, self.dtype)), resized

    @torch.inference_mode()
    def text_embeds(self, rgb: np.ndarray, prompt: str) -> torch.Tensor:
        input_ids = torch.tensor([self.tokenize(prompt)], dtype=torch.long, device=self.device)
        images_evf = torch_beit3_view(rgb)[None].to(self.device, self.dtype)
        return self.model.encode_prompt(images_evf, input_ids, torch.ones_like(input_ids))

    @torch.inference_mode()
    def decode(self, image_embeddings: torch.Tensor, text_embeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        sam = self.model.visual_model
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        sparse = torch.cat([sparse.to(text_embeds), text_embeds], dim=1)
        return sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(text_embeds),
            multimask_output=False,
        )

    def __call__(self, rgb: np.ndarray, prompt: str) -> Segmentation:
        return self.segment_many(rgb, [prompt])[0]

    @torch.inference_mode()
    def segment_many(self, rgb: np.ndarray, prompts: Sequence[str]) -> List[Segmentation]:
        embeddings, resized = self.image_embeddings(rgb)
        results = []
        for prompt in prompts:
            low_res, iou = self.decode(embeddings, self.text_embeds(rgb, prompt))
            logits = torch_mask_logits(low_res.float(), resized, rgb.shape[:2])[0, 0].cpu().numpy()
            results.append(Segmentation((logits > 0).astype(np.uint8), float(iou[0, 0]), logits))
        return results


class Sam2TorchPipeline:
    """EVF-SAM2: one image + one prompt -> mask, as upstream's `inference.py` (model_type "sam2") and
    `EvfSam2Model.inference` compute it for `recipe`: its SAM-2 view, SAM-2's image encoder with
    `no_mem_embed`, BEiT-3, the mask decoder with the recipe's mask selection, and the direct resize of
    the low-resolution logits to the original size."""

    def __init__(self, model: EvfSam2Model, tokenize: Callable[[str], List[int]], recipe: RecipeLike = "sam2-v2",
                 device="cpu", dtype=torch.float32):
        self.recipe = get_recipe(recipe)
        if self.recipe.family != "sam2":
            raise ValueError(f"recipe {self.recipe.name!r} is for the {self.recipe.family!r} family, not sam2")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenize = tokenize
        self.device = device
        self.dtype = dtype

    @torch.inference_mode()
    def image_features(self, rgb: np.ndarray) -> Tuple[Tuple[torch.Tensor, ...], Tuple[int, int]]:
        """(image_embeddings, high_res_feats_0, high_res_feats_1), and the size inside the SAM view."""
        images, resized = torch_sam_view(rgb, self.recipe)
        return tuple(self.model.encode_image(images[None].to(self.device, self.dtype))), resized

    @torch.inference_mode()
    def text_embeds(self, rgb: np.ndarray, prompt: str) -> torch.Tensor:
        input_ids = torch.tensor([self.tokenize(prompt)], dtype=torch.long, device=self.device)
        images_evf = torch_beit3_view(rgb, self.recipe)[None].to(self.device, self.dtype)
        return self.model.encode_prompt(images_evf, input_ids, torch.ones_like(input_ids))

    @torch.inference_mode()
    def decode(self, features: Tuple[torch.Tensor, ...], text_embeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.decode_masks(*features, text_embeds, self.recipe.mask_selection)

    def __call__(self, rgb: np.ndarray, prompt: str) -> Segmentation:
        return self.segment_many(rgb, [prompt])[0]

    @torch.inference_mode()
    def segment_many(self, rgb: np.ndarray, prompts: Sequence[str]) -> List[Segmentation]:
        features, resized = self.image_features(rgb)
        results = []
        for prompt in prompts:
            low_res, iou = self.decode(features, self.text_embeds(rgb, prompt))
            logits = torch_mask_logits(low_res.float(), resized, rgb.shape[:2], self.recipe)[0, 0].cpu().numpy()
            results.append(Segmentation((logits > 0).astype(np.uint8), float(iou[0, 0]), logits))
        return results
