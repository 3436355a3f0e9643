"""Encode once, prompt many, served: what the image-feature cache and many prompts per request buy.

`evf_sam_prompts` with N prompts per request (N = `budget.served_prompt_counts`), three ways a client
asks for N masks of one image, one request each:
- `uncached`: the image bytes, to a server whose cache is off (cache_bytes 0): every request runs the
  image encoder once (and BEiT-3 + the decoder on the N prompts);
- `cached_bytes`: the bytes of an image sent before: its sha256 finds the cached features;
- `cached_key`: only the image_key an earlier response returned.

And a repeated image through `evf_sam` (one prompt per request, image bytes): `uncached` (cache off)
against `cached_bytes` (the same image again: the cache both served models share skips the encoder).

Prompts/s = N / mean request latency at concurrency 1 (see `prompts_per_second`).  Every point is
checked against the server's counters over exactly its requests (`server_stats.check_counts`: one miss
and one encoder run per request uncached, no miss and no encoder run cached; no failure), and broken
down per model from Triton's statistics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Sequence

from evfsam.specs import EVF_SAM, EVF_SAM_PROMPTS, FamilySpec
from serving.server import TritonServer

from . import pa_inputs
from .budgets import Budget
from .samples import Sample
from .server_stats import ServerCounters, breakdown, check_counts
from .triton_sweep import measured_point, warm_up

UNCACHED, CACHED_BYTES, CACHED_KEY = "uncached", "cached_bytes", "cached_key"
MODES = (UNCACHED, CACHED_BYTES, CACHED_KEY)
REPEATED_IMAGE_MODES = (UNCACHED, CACHED_BYTES)  # evf_sam takes image bytes only


def prompts_per_second(point: Mapping, count: int) -> float:
    """From the mean client latency: at concurrency 1 requests go back to back, and perf_analyzer
    2.51's own throughput divides by a window rounded up to whole seconds (13 requests of 252 ms are
    reported as 13 / 4 s = 3.25/s, 24% low), too coarse for short points."""
    return 1000.0 * count / point["mean_ms"]


def distinct_image_samples(samples: Sequence[Sample]) -> list:
    """The first sample of each distinct image: one perf_analyzer step per image."""
    seen, chosen = set(), []
    for sample in samples:
        if sample.image not in seen:
            seen.add(sample.image)
            chosen.append(sample)
    return chosen


def input_data(model: str, mode: str, count: int, samples: Sequence[Sample]) -> Dict[str, list]:
    if model == EVF_SAM.name:
        return pa_inputs.single_prompt_input_data(distinct_image_samples(samples))
    return pa_inputs.prompts_input_data(samples, count, by_key=mode == CACHED_KEY)


def measure_point(server: TritonServer, family_spec: FamilySpec, model: str, mode: str, count: int,
                  samples: Sequence[Sample], budget: Budget, inputs_dir: Path, out_dir: Path) -> Dict:
    """Warm-up (uncached: one request, which sizes the request count; cached: one request per image,
    which fills the cache, then a second pass, all hits, which sizes it), then the measured run at
    concurrency 1 between two readings of the server's counters."""
    data = input_data(model, mode, count, samples)
    path = pa_inputs.write_json(data, inputs_dir / f"{model}_{mode}_n{count}.json")
    steps = len(data["data"])
    if mode != UNCACHED:
        warm_up(server, model, path, steps)
    warm = warm_up(server, model, path, 1 if mode == UNCACHED else steps)
    requests = budget.requests(1, warm.mean_ms / 1000, budget.served_prompt_seconds)

    def inspect(label: str, delta: ServerCounters) -> Dict:
        served = check_counts(f"{label} {mode} N={count}", delta, model, family_spec.image_encoder.name,
                              expect_cached=mode != UNCACHED)
        return {"server_requests": served, "cache": {k: int(v) for k, v in delta.cache.items()},
                "models": breakdown(delta, model, family_spec)}

    point = measured_point(server, model, path, 1, requests, out_dir / model / f"{mode}_n{count}", inspect)
    point.update(model=model, mode=mode, prompts=count, images=steps, prompts_per_s=prompts_per_second(point, count))
    print(f"  {model} {mode} N={count}: {point['prompts_per_s']:.2f} prompts/s, mean {point['mean_ms']:.0f} ms "
          f"({requests} requests; other jobs used {100 * (point['other_jobs_cpu_share'] or 0):.0f}% of the CPUs)",
          flush=True)
    return point


def sweep(server: TritonServer, family_spec: FamilySpec, modes: Sequence[str], samples: Sequence[Sample],
          budget: Budget, inputs_dir: Path, out_dir: Path) -> Dict:
    """The points of `modes` this server can measure: {"prompts": {mode: {N: point}}, "repeated_image":
    {mode: point}} (N as a string: JSON keys)."""
    result: Dict[str, Dict] = {"prompts": {}, "repeated_image": {}}
    for mode in modes:
        if mode in REPEATED_IMAGE_MODES:
            result["repeated_image"][mode] = measure_point(server, family_spec, EVF_SAM.name, mode, 1, samples,
                                                           budget, inputs_dir, out_dir)
        for count in budget.served_prompt_counts:
            result["prompts"].setdefault(mode, {})[str(count)] = measure_point(
                server, family_spec, EVF_SAM_PROMPTS.name, mode, count, samples, budget, inputs_dir, out_dir)
    return result


def merge(*parts: Dict) -> Dict:
    merged: Dict[str, Dict] = {"prompts": {}, "repeated_image": {}}
    for part in parts:
        for key in merged:
            merged[key].update(part.get(key, {}))
    return merged
