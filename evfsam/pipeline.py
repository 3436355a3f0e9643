"""The eager PyTorch reference: upstream `inference.py` + `EvfSamModel.inference` (or
`EvfSam2Model.inference`), op for op, for every recipe.

Pre- and post-processing here use torch (as upstream does); the numpy versions in
`evfsam.processing` that the server runs are tested against these.  For EVF-SAM the mask decoder is
called through segment-anything's own `MaskDecoder.forward` with upstream's text-prompt convention,
so it is an independent check of the decoder graph; for EVF-SAM2 it is our SAM-2 decoder, which
tests/test_sam2_model.py checks against Meta's sam2 package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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
    """One image + prompts -> masks, exactly as upstream's `inference.py` computes them for `recipe`."""

    def __init__(self, model: torch.nn.Module, tokenize: Callable[[str], List[int]], device="cpu",
                 dtype=torch.float32, recipe: RecipeLike = "ori"):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenize = tokenize
        self.device = device
        self.dtype = dtype
        self.recipe = get_recipe(recipe)

    @torch.inference_mode()
    def image_embeddings(self, rgb: np.ndarray):
        """(the image encoder's output: a tensor for EVF-SAM, a tuple of three for EVF-SAM2, resized hw)."""
        images, resized = torch_sam_view(rgb, self.recipe)
        return self.model.encode_image(images[None].to(self.device, self.dtype)), resized

    @torch.inference_mode()
    def text_embeds(self, rgb: np.ndarray, prompt: str) -> torch.Tensor:
        input_ids = torch.tensor([self.tokenize(prompt)], dtype=torch.long, device=self.device)
        images_evf = torch_beit3_view(rgb, self.recipe)[None].to(self.device, self.dtype)
        return self.model.encode_prompt(images_evf, input_ids, torch.ones_like(input_ids))

    @torch.inference_mode()
    def decode(self, image_embeddings, text_embeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.recipe.family == "sam2":
            return self.model.decode_masks(*image_embeddings, text_embeds, self.recipe.mask_selection)
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
            logits = torch_mask_logits(low_res.float(), resized, rgb.shape[:2], self.recipe)[0, 0].cpu().numpy()
            results.append(Segmentation((logits > 0).astype(np.uint8), float(iou[0, 0]), logits))
        return results
