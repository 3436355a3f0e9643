"""In-process baselines on the same inputs, for either model family:

(a) `EagerPipeline`: upstream's eager PyTorch path (`evfsam.pipeline.TorchPipeline`, either family, the
    checkpoint's recipe), fed the same file bytes;
(b) `OrtPipeline`: the family's three exported graphs on ONNX Runtime with the steps the served pipeline
    (model_repository/segment.py) runs, from the same functions: `decode_image`, the recipe's
    `sam_view` and `beit3_view`, the image encoder once, BEiT-3 and the mask decoder on chunks of at
    most `rows` prompts with the image's features broadcast, `masks_to_original`.

Stages: `preprocess` (decode + views + tokens), the family's three graphs by their Triton model names,
`postprocess` (masks at the original size).  In the server the pre/post stages run inside
`evf_sam` / `evf_sam_prompts` themselves.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from evfsam import provenance
from evfsam.processing import beit3_view, decode_image, masks_to_original, sam_view
from evfsam.recipes import get_recipe
from evfsam.specs import TOKENIZER_FILE, FamilySpec, GraphSpec, family
from evfsam.tokenization import PromptTokenizer, pad_batch

from .samples import Sample

PREPROCESS, POSTPROCESS = "preprocess", "postprocess"
Tensors = Dict[str, np.ndarray]


def stages(family_spec: FamilySpec) -> Tuple[str, ...]:
    return (PREPROCESS, *(g.name for g in family_spec.graphs), POSTPROCESS)


def prompt_rows(family_spec: FamilySpec) -> int:
    """Prompts per BEiT-3 / decoder call, as the served pipeline chunks them."""
    return min(family_spec.prompt_encoder.max_rows, family_spec.mask_decoder.max_rows)


def exported_family(onnx_dir: Path) -> Tuple[FamilySpec, str]:
    """(family spec, recipe name) recorded by `python -m export` in the folder's manifest."""
    manifest = provenance.read_manifest(Path(onnx_dir))
    if manifest is None or "family" not in manifest:
        raise FileNotFoundError(f"{onnx_dir}/{provenance.MANIFEST_FILE} is missing or predates families: export again")
    return family(manifest["family"]), manifest["recipe"]


class StageClock:
    """Wall time per named stage of one call."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    def time(self, stage: str, fn: Callable, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        return result


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> List[float]:
    """Seconds per call of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


@dataclass
class Prepared:
    sam_view: np.ndarray  # [1,3,1024,1024]
    images_evf: np.ndarray  # [1,3,224,224]
    prompt_ids: List[List[int]]
    original: Tuple[int, int]
    resized: Tuple[int, int]


class OrtPipeline:
    """(b): what `evf_sam` / `evf_sam_prompts` compute, in one process, without Triton."""

    def __init__(self, onnx_dir: Path, threads: int = 0):
        import onnxruntime as ort

        self.family, recipe = exported_family(onnx_dir)
        self.recipe = get_recipe(recipe)
        self.rows = prompt_rows(self.family)
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        self.sessions = {
            spec.name: ort.InferenceSession(str(Path(onnx_dir) / spec.onnx_file), options,
                                            providers=["CPUExecutionProvider"])
            for spec in self.family.graphs
        }
        self.tokenizer = PromptTokenizer(Path(onnx_dir) / TOKENIZER_FILE)

    @property
    def stages(self) -> Tuple[str, ...]:
        return stages(self.family)

    def prepare(self, image: bytes, prompts: Sequence[str]) -> Prepared:
        rgb = decode_image(image)
        sam, resized = sam_view(rgb, self.recipe)
        return Prepared(sam[None], beit3_view(rgb, recipe=self.recipe)[None],
                        [self.tokenizer.encode(p) for p in prompts], tuple(rgb.shape[:2]), tuple(resized))

    def run(self, spec: GraphSpec, tensors: Mapping[str, np.ndarray]) -> Tensors:
        outputs = self.sessions[spec.name].run(list(spec.output_names), {n: tensors[n] for n in spec.input_names})
        return dict(zip(spec.output_names, outputs))

    def encode_image(self, prepared: Prepared) -> Tensors:
        return self.run(self.family.image_encoder, {"images": prepared.sam_view})

    def prompt_feed(self, images_evf: np.ndarray, prompt_ids: Sequence[Sequence[int]]) -> Tensors:
        input_ids, attention_mask = pad_batch(prompt_ids)
        return {"images_evf": np.repeat(images_evf, len(input_ids), axis=0), "input_ids": input_ids,
                "attention_mask": attention_mask}

    def encode_prompts(self, images_evf: np.ndarray, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
        spec = self.family.prompt_encoder
        return np.concatenate([self.run(spec, self.prompt_feed(images_evf, prompt_ids[i:i + self.rows]))["text_embeds"]
                               for i in range(0, len(prompt_ids), self.rows)])

    def decode(self, features: Tensors, text_embeds: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        spec = self.family.mask_decoder
        outputs = [self.run(spec, {**features, "text_embeds": text_embeds[i:i + self.rows]})
                   for i in range(0, len(text_embeds), self.rows)]
        return (np.concatenate([o["low_res_masks"] for o in outputs]),
                np.concatenate([o["iou_predictions"] for o in outputs])[:, 0])

    def postprocess(self, decoded: Tuple[np.ndarray, np.ndarray], prepared: Prepared) -> List[Tuple[np.ndarray, float]]:
        low_res, scores = decoded
        masks = masks_to_original(low_res, prepared.resized, prepared.original, self.recipe).view(np.uint8)
        return [(mask, float(score)) for mask, score in zip(masks, scores)]

    def segment(self, image: bytes, prompts: Sequence[str], clock: StageClock = None) -> List[Tuple[np.ndarray, float]]:
        """One image, N prompts: the image encoder once, BEiT-3 and the decoder on chunks of N."""
        clock = clock or StageClock()
        encoder, beit3, decoder = self.family.graphs
        prepared = clock.time(PREPROCESS, self.prepare, image, prompts)
        features = clock.time(encoder.name, self.encode_image, prepared)
        text_embeds = clock.time(beit3.name, self.encode_prompts, prepared.images_evf, prepared.prompt_ids)
        decoded = clock.time(decoder.name, self.decode, features, text_embeds)
        return clock.time(POSTPROCESS, self.postprocess, decoded, prepared)

    def graph_feeds(self, samples: Sequence[Sample]) -> Dict[str, List[Tensors]]:
        """Real one-row inputs of every graph, one per sample (the decoder's from the encoders' outputs)."""
        feeds: Dict[str, List[Tensors]] = {spec.name: [] for spec in self.family.graphs}
        encoder, beit3, decoder = self.family.graphs
        for sample in samples:
            prepared = self.prepare(sample.image, [sample.prompt])
            features = self.encode_image(prepared)
            prompt = self.prompt_feed(prepared.images_evf, prepared.prompt_ids)
            feeds[encoder.name].append({"images": prepared.sam_view})
            feeds[beit3.name].append(prompt)
            feeds[decoder.name].append({**features, "text_embeds": self.run(beit3, prompt)["text_embeds"]})
        return feeds


def batch_feed(spec: GraphSpec, feeds: Sequence[Tensors], batch: int) -> Tensors:
    """`batch` rows from real one-row feeds (cycled): images stacked for the encoders, token inputs
    re-padded together for BEiT-3, and for a mask decoder (one image broadcast over its prompts) the
    first feed's image features with `batch` prompts."""
    chosen = [feeds[i % len(feeds)] for i in range(batch)]
    if "input_ids" in spec.input_names:
        rows = [f["input_ids"][0][f["attention_mask"][0] == 1].tolist() for f in chosen]
        input_ids, attention_mask = pad_batch(rows)
        return {"images_evf": np.concatenate([f["images_evf"] for f in chosen]), "input_ids": input_ids,
                "attention_mask": attention_mask}
    if not spec.triton_batching:
        return {**{n: chosen[0][n] for n in spec.input_names if n != "text_embeds"},
                "text_embeds": np.concatenate([f["text_embeds"] for f in chosen])}
    return {name: np.concatenate([f[name] for f in chosen]) for name in spec.input_names}


@dataclass
class EagerInputs:
    rgb: np.ndarray
    images: "object"  # torch tensors on the pipeline's device and dtype
    images_evf: "object"
    input_ids: "object"
    resized: Tuple[int, int]


class EagerPipeline:
    """(a): upstream's eager PyTorch path for the checkpoint's family, fed the same file bytes."""

    def __init__(self, checkpoint: Path, recipe: str, device: str = "cpu", dtype=None):
        import torch
        from transformers import XLMRobertaTokenizer

        from evfsam.checkpoint import load_evf_sam
        from evfsam.pipeline import TorchPipeline

        model, self.config, _ = load_evf_sam(checkpoint)
        self.family = family(self.config.family)
        self.recipe = get_recipe(recipe)
        tokenizer = XLMRobertaTokenizer.from_pretrained(str(checkpoint))
        tokenize = lambda prompt: tokenizer(prompt)["input_ids"]  # noqa: E731
        self.pipeline = TorchPipeline(model, tokenize, device, dtype or torch.float32, recipe=self.recipe)

    @property
    def model(self):
        return self.pipeline.model

    @property
    def stages(self) -> Tuple[str, ...]:
        return stages(self.family)

    def segment(self, image: bytes, prompts: Sequence[str]):
        """upstream `inference.py`: cv2 decode, then the encoder once and one pass per prompt."""
        return self.pipeline.segment_many(decode_image(image), prompts)

    def encode_image(self, images):
        outputs = self.model.encode_image(images)
        return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)

    def decode(self, features, text_embeds):
        if self.family.name == "sam2":
            return self.pipeline.decode(features, text_embeds)
        (image_embeddings,) = features
        return self.pipeline.decode(image_embeddings, text_embeds)

    def segment_staged(self, image: bytes, prompt: str, clock: StageClock) -> np.ndarray:
        """The computation of `segment`, stage by stage, for the per-stage breakdown."""
        import torch

        from evfsam.pipeline import torch_mask_logits

        encoder, beit3, decoder = self.family.graphs
        with torch.inference_mode():
            x = clock.time(PREPROCESS, self.prepare, image, prompt)
            features = clock.time(encoder.name, self.encode_image, x.images)
            text = clock.time(beit3.name, self.model.encode_prompt, x.images_evf, x.input_ids,
                              torch.ones_like(x.input_ids))
            low_res, _ = clock.time(decoder.name, self.decode, features, text)
            logits = clock.time(POSTPROCESS, torch_mask_logits, low_res.float(), x.resized, x.rgb.shape[:2],
                                self.recipe)
        return (logits[0, 0] > 0).cpu().numpy()

    def prepare(self, image: bytes, prompt: str) -> EagerInputs:
        import torch

        from evfsam.pipeline import torch_beit3_view, torch_sam_view

        p = self.pipeline
        rgb = decode_image(image)
        images, resized = torch_sam_view(rgb, self.recipe)
        input_ids = torch.tensor([p.tokenize(prompt)], dtype=torch.long, device=p.device)
        images_evf = torch_beit3_view(rgb, self.recipe)[None].to(p.device, p.dtype)
        return EagerInputs(rgb, images[None].to(p.device, p.dtype), images_evf, input_ids, resized)

    def parameter_counts(self) -> Dict[str, int]:
        encoder = sum(p.numel() for p in self.model.visual_model.image_encoder.parameters())
        beit3 = sum(p.numel() for p in self.model.mm_extractor.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        return {self.family.image_encoder.name: encoder, "beit3": beit3, "decoder_and_rest": total - encoder - beit3,
                "total": total}
