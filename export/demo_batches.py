"""Training batches for the demo model, made by the serve-time preprocessing.

Each scene of `export.demo_scenes` is encoded as a client would send it (PNG, or JPEG at a random
quality), decoded by `evfsam.processing.decode_image`, and viewed by `sam_view` / `beit3_view`;
prompts are tokenized by the checkpoint's slow XLM-R tokenizer (upstream's) and padded by
`evfsam.tokenization.pad_batch`.  Next to the inputs a batch holds every target the training uses:
the masks at the decoder's 256x256 low-res frame, and the auxiliary targets (what is where in the
image embedding and in BEiT-3's patch grid, where each prompt's target is and what it looks like).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from evfsam.processing import beit3_view, decode_image, sam_view
from evfsam.specs import BEIT3_IMAGE_SIZE, LOW_RES_MASK_SIZE, SAM_EMBEDDING_SIZE, SAM_IMAGE_SIZE
from evfsam.tokenization import pad_batch

from .demo_scenes import (COLOURS, SHAPES, TEXTURES, Scene, SceneObject, encode_image, expressions, pick_expressions,
                          random_scene)

BEIT3_PATCH_SIZE = 32  # the demo's BEiT-3 (upstream's is 16): 7x7 patches, 4x cheaper, text less diluted
PATCH_GRID = BEIT3_IMAGE_SIZE // BEIT3_PATCH_SIZE
ATTRIBUTES = (tuple(COLOURS), SHAPES, TEXTURES)  # classified per embedding cell, per patch, per target
IGNORE = -100  # torch's cross-entropy ignore_index: a region target has no single colour or shape
JPEG_FRACTION = 0.5
JPEG_QUALITY_RANGE = (75, 95)


@dataclass
class Batch:
    """S scenes, M prompts; the first K prompts (all of scene 0) also go through the mask decoder, and
    scene 0 through the image encoder when K > 0 (or when asked for)."""

    sam_image: Optional[torch.Tensor]  # [1, 3, 1024, 1024]: scene 0
    cell_labels: Optional[torch.Tensor]  # [3, 64, 64] int64: attribute index + 1 per image-embedding cell, 0 = none
    beit3_images: torch.Tensor  # [S, 3, 224, 224]
    patch_labels: torch.Tensor  # [S, 3, 7, 7] int64, as cell_labels over BEiT-3's patches
    owner: torch.Tensor  # [M] int64: the scene of each prompt
    input_ids: torch.Tensor  # [M, L]
    attention_mask: torch.Tensor  # [M, L]
    grounding: torch.Tensor  # [M, 49]: the fraction of each BEiT-3 patch the prompt's target covers
    target_labels: torch.Tensor  # [M, 3] int64: the target object's attributes (IGNORE for a region)
    target_centres: torch.Tensor  # [M, 2]: the target object's centre (x, y) / (width, height); 0 for a region
    has_object: torch.Tensor  # [M] bool: the prompt names one object
    masks: Optional[torch.Tensor]  # [K, 256, 256]: the fraction of each low-res cell the target covers
    cell_masks: Optional[torch.Tensor]  # [P, 64, 64]: the same per image-embedding cell, scene 0's P prompts
    kinds: List[str]  # [M] expression types

    @property
    def decoded(self) -> int:
        return 0 if self.masks is None else self.masks.shape[0]


class Tokenize:
    """The slow XLM-R tokenizer (upstream's), memoised: the expressions repeat."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: Dict[str, List[int]] = {}

    def __call__(self, text: str) -> List[int]:
        if text not in self.cache:
            self.cache[text] = self.tokenizer(text)["input_ids"]
        return self.cache[text]


def make_batch(rng: np.random.Generator, tokenize: Tokenize, scenes: int, prompts_per_scene: int, decoded: int,
               image: bool = False) -> Batch:
    """`scenes` new scenes, `prompts_per_scene` expressions of each (types as even as the scene allows);
    the first `decoded` of scene 0 are the ones the mask decoder sees.  Scene 0's SAM view (and its
    per-cell labels) comes with the batch when `decoded` > 0 or `image`."""
    views, prompts, owner = [], [], []
    for index in range(scenes):
        scene = random_scene(rng)
        chosen = pick_expressions(expressions(scene, rng), prompts_per_scene, rng)
        rgb = decode_image(random_encoding(rng, scene.rgb))
        views.append((scene, rgb))
        prompts += chosen
        owner += [index] * len(chosen)
    sam_image = cell_labels = masks = cell_masks = None
    if decoded or image:
        scene, rgb = views[0]
        sam, resized = sam_view(rgb)
        sam_image = torch.from_numpy(sam)[None]
        cell_labels = torch.from_numpy(attribute_map(scene, lambda m: frame_coverage(m, resized, SAM_EMBEDDING_SIZE)))
        cell_masks = torch.from_numpy(np.stack([frame_coverage(e.mask, resized, SAM_EMBEDDING_SIZE)
                                                for e, i in zip(prompts, owner) if i == 0]))
    if decoded:
        masks = torch.from_numpy(np.stack([frame_coverage(e.mask, resized, LOW_RES_MASK_SIZE) for e in prompts[:decoded]]))
    input_ids, attention = pad_batch([tokenize(e.text) for e in prompts])
    return Batch(
        sam_image=sam_image,
        cell_labels=cell_labels,
        beit3_images=torch.from_numpy(np.stack([beit3_view(rgb) for _, rgb in views])),
        patch_labels=torch.from_numpy(np.stack([attribute_map(s, patch_coverage) for s, _ in views])),
        owner=torch.tensor(owner),
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        grounding=torch.from_numpy(np.stack([patch_coverage(e.mask).ravel() for e in prompts])),
        target_labels=torch.tensor([object_labels(e.target) for e in prompts]),
        target_centres=torch.tensor([object_centre(e.target, views[i][0]) for e, i in zip(prompts, owner)]),
        has_object=torch.tensor([e.target is not None for e in prompts]),
        masks=masks,
        cell_masks=cell_masks,
        kinds=[e.kind for e in prompts],
    )


def random_encoding(rng: np.random.Generator, rgb: np.ndarray) -> bytes:
    """PNG or JPEG bytes, as clients send: the model sees decoded images, artefacts included."""
    if rng.random() < JPEG_FRACTION:
        return encode_image(rgb, "JPEG", int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1)))
    return encode_image(rgb, "PNG")


def frame_coverage(mask: np.ndarray, resized: Tuple[int, int], grid: int) -> np.ndarray:
    """GT [H,W] 0/1 -> the fraction of each cell of a grid x grid split of the padded 1024 frame it covers
    (the frame `sam_view` makes: the image resized to `resized`, zero-padded bottom and right)."""
    new_h, new_w = resized
    frame = np.zeros((SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), dtype=np.float32)
    frame[:new_h, :new_w] = cv2.resize(mask.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    cell = SAM_IMAGE_SIZE // grid
    return frame.reshape(grid, cell, grid, cell).mean(axis=(1, 3))


def patch_coverage(mask: np.ndarray) -> np.ndarray:
    """GT [H,W] -> the fraction of each BEiT-3 patch it covers [7, 7] (the 224 view squashes the image)."""
    return cv2.resize(mask.astype(np.float32), (PATCH_GRID, PATCH_GRID), interpolation=cv2.INTER_AREA)


def attribute_map(scene: Scene, coverage) -> np.ndarray:
    """[3, g, g]: per cell the colour, shape and texture index + 1 of the object covering most of it."""
    maps = [coverage(obj.mask) for obj in scene.objects]
    labels = np.zeros((len(ATTRIBUTES),) + maps[0].shape, dtype=np.int64)
    for obj, covered in zip(scene.objects, maps):
        for row, index in enumerate(object_labels(obj)):
            labels[row][covered > 0.5] = index + 1
    return labels


def object_labels(obj: SceneObject | None) -> Tuple[int, int, int]:
    if obj is None:
        return (IGNORE, IGNORE, IGNORE)
    return tuple(names.index(value) for names, value in zip(ATTRIBUTES, (obj.colour, obj.shape, obj.texture)))


def object_centre(obj: SceneObject | None, scene: Scene) -> Tuple[float, float]:
    if obj is None:
        return (0.0, 0.0)
    height, width = scene.size
    return (obj.cx / width, obj.cy / height)
