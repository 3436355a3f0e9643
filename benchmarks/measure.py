"""The in-process measurements: side by side (a) eager vs (b) ONNX Runtime, per stage, per batch
size and per number of prompts on one image.  Every function returns plain JSON-able dicts."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence

import numpy as np

from .budgets import Budget
from .inprocess import EagerPipeline, OrtPipeline, StageClock, batch_feed, timed
from .samples import PROMPTS, Sample
from .stats import LatencyStats

EAGER, ORT = "eager_pytorch", "onnxruntime"


def _once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def side_by_side(eager: EagerPipeline, ort: OrtPipeline, samples: Sequence[Sample], budget: Budget) -> Dict:
    """End-to-end latency (file bytes + prompt -> mask) of (a) and (b), calls interleaved so that both
    see the same background load; the warm-up pass's masks say how closely (b) reproduces (a)."""
    runners = {EAGER: lambda s: eager.segment(s.image, [s.prompt]), ORT: lambda s: ort.segment(s.image, [s.prompt])}
    pixels, scores = [], []
    for _ in range(max(1, budget.warmup)):
        for sample in samples:
            (reference,), ((mask, score),) = (run(sample) for run in runners.values())
            pixels.append(float(np.mean(reference.mask == mask)))
            scores.append(abs(reference.score - score))
    seconds: Dict[str, List[float]] = {name: [] for name in runners}
    for _ in range(budget.repeats):
        for sample in samples:
            for name, run in runners.items():
                seconds[name].append(_once(lambda: run(sample)))
    result = {name: {"stats": LatencyStats.from_seconds(s).to_dict(), "seconds": s} for name, s in seconds.items()}
    # random weights: boundary pixels whose logits are within float error of 0 may differ
    result["agreement"] = {"min_pixel_agreement": min(pixels), "max_score_difference": max(scores)}
    return result


def stage_breakdown(eager: EagerPipeline, ort: OrtPipeline, samples: Sequence[Sample], budget: Budget) -> Dict:
    """Median milliseconds per stage (the graphs by their Triton model names, and the pre/post steps);
    the median because a busy machine stalls single calls."""
    staged = {EAGER: lambda s, c: eager.segment_staged(s.image, s.prompt, c),
              ORT: lambda s, c: ort.segment(s.image, [s.prompt], c)}
    result = {}
    for name, run in staged.items():
        clocks = []
        for _ in range(budget.stage_repeats):
            for sample in samples:
                clocks.append(StageClock())
                run(sample, clocks[-1])
        result[name] = {stage: 1000.0 * float(np.median([c.seconds[stage] for c in clocks])) for stage in ort.stages}
    return result


def batch_scaling(ort: OrtPipeline, samples: Sequence[Sample], budget: Budget) -> Dict:
    """Items per second of each graph alone at each batch size (rows: images for the image encoder,
    prompts for BEiT-3 and the mask decoder, whose image is broadcast), on real inputs."""
    feeds = ort.graph_feeds(samples)
    result = {}
    for spec in ort.family.graphs:
        result[spec.name] = {}
        for batch in (b for b in budget.batch_sizes if b <= spec.max_rows):
            feed = batch_feed(spec, feeds[spec.name], batch)
            seconds = timed(lambda: ort.run(spec, feed), budget.batch_repeats, budget.warmup)
            result[spec.name][str(batch)] = LatencyStats.from_seconds(seconds, items_per_call=batch).to_dict()
    return result


def prompt_scaling(eager: EagerPipeline, ort: OrtPipeline, sample: Sample, budget: Budget) -> Dict:
    """N prompts on one image: the image encoded once (ORT: BEiT-3 and decoder batched; eager:
    upstream's loop over prompts) against N independent full pipelines."""
    variants = {
        f"{ORT}/encoder_once": lambda ps: ort.segment(sample.image, ps),
        f"{ORT}/n_pipelines": lambda ps: [ort.segment(sample.image, [p]) for p in ps],
        f"{EAGER}/encoder_once": lambda ps: eager.segment(sample.image, ps),
        f"{EAGER}/n_pipelines": lambda ps: [eager.segment(sample.image, [p]) for p in ps],
    }
    result: Dict[str, Dict] = {name: {} for name in variants}
    for count in budget.prompt_counts:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
        for name, run in variants.items():
            warmup = budget.warmup if name.endswith("encoder_once") else 0  # new batch shapes only there
            seconds = timed(lambda: run(prompts), budget.prompt_repeats, warmup)
            result[name][str(count)] = LatencyStats.from_seconds(seconds, items_per_call=count).to_dict()
    return result
