"""In-process baselines on the same inputs: (a) the eager PyTorch reference, (b) the three ONNX
graphs on ONNX Runtime with the server's numpy pre/post-processing; batch and prompt-count scaling.

Stage names are the Triton model names, so a stage here lines up with a composing model there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from evfsam.processing import beit3_view, binary_mask, decode_image, sam_view
from evfsam.specs import BEIT3_FUSION_ENCODER, GRAPHS, PROMPT_MASK_DECODER, SAM_IMAGE_ENCODER, TOKENIZER_FILE, GraphSpec
from evfsam.tokenization import PromptTokenizer, pad_batch
from serving.repository import POSTPROCESS, PREPROCESS

from .samples import Sample

STAGES = (PREPROCESS, SAM_IMAGE_ENCODER.name, BEIT3_FUSION_ENCODER.name, PROMPT_MASK_DECODER.name, POSTPROCESS)
LOW_RES_MASKS, IOU_PREDICTIONS = PROMPT_MASK_DECODER.output_names
Tensors = Dict[str, np.ndarray]


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
    tensors: Tensors  # graph inputs by spec name, batch axis first
    original: Tuple[int, int]
    resized: Tuple[int, int]


class OrtPipeline:
    """(b): what the ensemble computes, in one process, without Triton."""

    def __init__(self, onnx_dir: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        self.sessions = {
            spec.name: ort.InferenceSession(str(Path(onnx_dir) / spec.onnx_file), options,
                                            providers=["CPUExecutionProvider"])
            for spec in GRAPHS
        }
        self.tokenizer = PromptTokenizer(Path(onnx_dir) / TOKENIZER_FILE)

    def prepare(self, image: bytes, prompts: Sequence[str]) -> Prepared:
        """Decode once; SAM view once; BEiT-3 view and tokens for each prompt (batch = len(prompts))."""
        rgb = decode_image(image)
        images, resized = sam_view(rgb)
        input_ids, attention_mask = pad_batch([self.tokenizer.encode(p) for p in prompts])
        (images_name,) = SAM_IMAGE_ENCODER.input_names
        evf_name, ids_name, mask_name = BEIT3_FUSION_ENCODER.input_names
        evf = np.repeat(beit3_view(rgb)[None], len(prompts), axis=0)
        tensors = {images_name: images[None], evf_name: evf, ids_name: input_ids, mask_name: attention_mask}
        return Prepared(tensors, tuple(rgb.shape[:2]), resized)

    def run(self, spec: GraphSpec, tensors: Mapping[str, np.ndarray]) -> Tensors:
        outputs = self.sessions[spec.name].run(list(spec.output_names), {n: tensors[n] for n in spec.input_names})
        return dict(zip(spec.output_names, outputs))

    def segment(self, image: bytes, prompts: Sequence[str], clock: StageClock = None) -> List[Tuple[np.ndarray, float]]:
        """One image, N prompts: the image encoder runs once, BEiT-3 and the decoder on batch N."""
        clock = clock or StageClock()
        prepared = clock.time(PREPROCESS, self.prepare, image, prompts)
        tensors = dict(prepared.tensors)
        tensors.update(clock.time(SAM_IMAGE_ENCODER.name, self.run, SAM_IMAGE_ENCODER, tensors))
        tensors.update(clock.time(BEIT3_FUSION_ENCODER.name, self.run, BEIT3_FUSION_ENCODER, tensors))
        (embeddings_name, _) = PROMPT_MASK_DECODER.input_names
        tensors[embeddings_name] = np.repeat(tensors[embeddings_name], len(prompts), axis=0)
        tensors.update(clock.time(PROMPT_MASK_DECODER.name, self.run, PROMPT_MASK_DECODER, tensors))
        return clock.time(POSTPROCESS, self.postprocess, tensors, prepared)

    @staticmethod
    def postprocess(tensors: Tensors, prepared: Prepared) -> List[Tuple[np.ndarray, float]]:
        low_res, iou = tensors[LOW_RES_MASKS], tensors[IOU_PREDICTIONS]
        return [(binary_mask(low_res[i, 0], prepared.resized, prepared.original), float(iou[i, 0]))
                for i in range(low_res.shape[0])]

    def graph_feeds(self, samples: Sequence[Sample]) -> Dict[str, List[Tensors]]:
        """Real batch-1 inputs of every graph, one per sample (the decoder's from the encoders' outputs)."""
        feeds: Dict[str, List[Tensors]] = {spec.name: [] for spec in GRAPHS}
        for sample in samples:
            tensors = dict(self.prepare(sample.image, [sample.prompt]).tensors)
            for spec in GRAPHS:
                feeds[spec.name].append({n: tensors[n] for n in spec.input_names})
                tensors.update(self.run(spec, tensors))
        return feeds


def batch_feed(spec: GraphSpec, feeds: Sequence[Tensors], batch: int) -> Tensors:
    """`batch` real batch-1 feeds (cycled) stacked along the batch axis; token inputs re-padded together."""
    chosen = [feeds[i % len(feeds)] for i in range(batch)]
    if spec is BEIT3_FUSION_ENCODER:
        evf_name, ids_name, mask_name = spec.input_names
        rows = [f[ids_name][0][f[mask_name][0] == 1].tolist() for f in chosen]
        input_ids, attention_mask = pad_batch(rows)
        return {evf_name: np.concatenate([f[evf_name] for f in chosen]), ids_name: input_ids, mask_name: attention_mask}
    return {name: np.concatenate([f[name] for f in chosen]) for name in spec.input_names}


@dataclass
class EagerInputs:
    rgb: np.ndarray
    images: "object"  # torch tensors on the pipeline's device and dtype
    images_evf: "object"
    input_ids: "object"
    resized: Tuple[int, int]


class EagerPipeline:
    """(a): upstream's eager PyTorch path (`evfsam.pipeline.TorchPipeline`), fed the same file bytes."""

    def __init__(self, checkpoint: Path, device: str = "cpu", dtype=None):
        import torch
        from transformers import XLMRobertaTokenizer

        from evfsam.checkpoint import load_evf_sam
        from evfsam.pipeline import TorchPipeline

        model, self.config, _ = load_evf_sam(checkpoint)
        tokenizer = XLMRobertaTokenizer.from_pretrained(str(checkpoint))
        self.pipeline = TorchPipeline(model, lambda prompt: tokenizer(prompt)["input_ids"], device,
                                      dtype or torch.float32)

    def segment(self, image: bytes, prompts: Sequence[str]):
        """upstream `inference.py`: cv2 decode, then the encoder once and one pass per prompt."""
        return self.pipeline.segment_many(decode_image(image), prompts)

    def segment_staged(self, image: bytes, prompt: str, clock: StageClock) -> np.ndarray:
        """The computation of `segment`, stage by stage, for the per-stage breakdown."""
        import torch

        from evfsam.pipeline import torch_mask_logits

        model = self.pipeline.model
        with torch.inference_mode():
            x = clock.time(PREPROCESS, self.prepare, image, prompt)
            embeddings = clock.time(SAM_IMAGE_ENCODER.name, model.encode_image, x.images)
            text = clock.time(BEIT3_FUSION_ENCODER.name, model.encode_prompt, x.images_evf, x.input_ids,
                              torch.ones_like(x.input_ids))
            low_res, _ = clock.time(PROMPT_MASK_DECODER.name, self.pipeline.decode, embeddings, text)
            logits = clock.time(POSTPROCESS, torch_mask_logits, low_res.float(), x.resized, x.rgb.shape[:2])
        return (logits[0, 0] > 0).cpu().numpy()

    def prepare(self, image: bytes, prompt: str) -> EagerInputs:
        import torch

        from evfsam.pipeline import torch_beit3_view, torch_sam_view

        p = self.pipeline
        rgb = decode_image(image)
        images, resized = torch_sam_view(rgb)
        input_ids = torch.tensor([p.tokenize(prompt)], dtype=torch.long, device=p.device)
        images_evf = torch_beit3_view(rgb)[None].to(p.device, p.dtype)
        return EagerInputs(rgb, images[None].to(p.device, p.dtype), images_evf, input_ids, resized)
