"""What the server did during exactly the measured requests: Triton's statistics API per model and the
image-feature cache's counters, read before and after a perf_analyzer run.

`evf_sam` is one python model calling the cache and the engines through BLS, so perf_analyzer sees
only its total; the per-stage breakdown comes from each model's statistics deltas
(`/v2/models/stats`: requests, queue and compute nanoseconds, executions) and the cache's hit and miss
counters (Prometheus, `evfsam.specs.CACHE_METRICS`).  A delta that shows the server did something else
than a point claims (a cache hit in an uncached point, an encoder run in a cached one, a failed
request) raises `SweepIntegrityError` instead of being reported.
"""
from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Dict, Mapping

from evfsam.specs import CACHE_METRICS, IMAGE_CACHE_NAME, FamilySpec
from serving import metrics

PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


class SweepIntegrityError(RuntimeError):
    """The server's counters show that a point did not measure what it claims."""


@dataclass(frozen=True)
class ServerCounters:
    """Cumulative counters of one reading: the cache's, and Triton's per model."""

    cache: Dict[str, float]  # hits, misses, evictions
    models: Dict[str, Dict[str, float]]  # requests, failures, executions, inferences, <phase>_ns

    @classmethod
    def read(cls, server) -> "ServerCounters":
        samples = metrics.scrape(server.metrics_url)
        cache = {key: metrics.total(samples, name) for key, name in CACHE_METRICS.items()}
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/stats", timeout=10) as response:
            stats = json.load(response)["model_stats"]
        return cls(cache, {entry["name"]: model_counters(entry) for entry in stats})

    def minus(self, earlier: "ServerCounters") -> "ServerCounters":
        models = {}
        for name, counters in self.models.items():
            before = earlier.models.get(name, {})
            models[name] = {k: v - before.get(k, 0.0) for k, v in counters.items()}
        return ServerCounters({k: v - earlier.cache.get(k, 0.0) for k, v in self.cache.items()}, models)

    def requests(self, model: str) -> int:
        return int(self.models.get(model, {}).get("requests", 0))


def model_counters(entry: Mapping) -> Dict[str, float]:
    """One model's entry of `/v2/models/stats` as flat counters."""
    stats = entry["inference_stats"]
    counters = {"requests": float(stats["success"]["count"]), "failures": float(stats["fail"]["count"]),
                "executions": float(entry.get("execution_count", 0)), "inferences": float(entry.get("inference_count", 0))}
    counters.update({f"{phase}_ns": float(stats[phase]["ns"]) for phase in PHASES})
    return counters


def check_counts(label: str, delta: ServerCounters, served_model: str, encoder: str, expect_cached: bool) -> int:
    """The number of requests `served_model` answered; raises unless each was a cache miss that ran the
    image encoder once (`expect_cached` False) or a hit that ran no encoder (True), and none failed."""
    requests = delta.requests(served_model)
    failures = int(sum(c.get("failures", 0) for c in delta.models.values()))
    encoder_runs = delta.requests(encoder)
    hits, misses = int(delta.cache["hits"]), int(delta.cache["misses"])
    expected = (0, requests, 0) if expect_cached else (requests, 0, requests)  # misses, hits, encoder runs
    if requests == 0 or failures or (misses, hits, encoder_runs) != expected:
        raise SweepIntegrityError(
            f"{label}: the server answered {requests} {served_model} requests with {misses} cache misses, {hits} hits, "
            f"{encoder_runs} image-encoder runs and {failures} failed requests; expected {expected[0]} misses, "
            f"{expected[1]} hits, {expected[2]} encoder runs and no failure")
    return requests


def breakdown(delta: ServerCounters, served_model: str, family_spec: FamilySpec) -> Dict[str, Dict[str, float]]:
    """Per `served_model` request: each model's calls and milliseconds (queue, compute = input + infer +
    output, total as Triton times the request), and `own`: the served model's compute time less the
    calls on its critical path (the cache; on a miss the image encoder and BEiT-3 run concurrently,
    so the longer of the two; the mask decoder): its python work (decode, views, tokenize, masks) and
    the BLS round trips."""
    requests = delta.requests(served_model)
    result = {}
    for model in (served_model, IMAGE_CACHE_NAME, *(g.name for g in family_spec.graphs)):
        c = delta.models.get(model, {})
        compute = sum(c.get(f"{phase}_ns", 0.0) for phase in ("compute_input", "compute_infer", "compute_output"))
        result[model] = {"calls": c.get("requests", 0.0) / requests,
                         "queue_ms": c.get("queue_ns", 0.0) / 1e6 / requests,
                         "compute_ms": compute / 1e6 / requests,
                         "total_ms": c.get("success_ns", 0.0) / 1e6 / requests,
                         "avg_batch": c["inferences"] / c["executions"] if c.get("executions") else 0.0}
    encoder, beit3, decoder = (result[g.name]["total_ms"] for g in family_spec.graphs)
    image_side = max(encoder, beit3) if result[family_spec.image_encoder.name]["calls"] else beit3
    on_path = result[IMAGE_CACHE_NAME]["total_ms"] + image_side + decoder
    result["own"] = {"calls": 1.0, "queue_ms": 0.0, "compute_ms": result[served_model]["compute_ms"] - on_path,
                     "total_ms": result[served_model]["compute_ms"] - on_path, "avg_batch": 0.0}
    return result
