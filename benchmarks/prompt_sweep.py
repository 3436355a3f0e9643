"""Encode once, prompt many, served: `evf_sam_prompts` prompts/s at N prompts per image, by perf_analyzer.

Three ways a client asks for N masks of one image, one request each:
- `uncached`: the image bytes, to a server whose embedding cache is off (cache_bytes 0), so every
  request runs the SAM image encoder once (and BEiT-3 + the decoder on a batch of N);
- `cached_bytes`: the image bytes of an image sent before: its sha256 finds the cached embedding;
- `cached_key`: only the image_key an earlier response returned.

The baseline, N single-prompt requests to the `evf_sam` ensemble, is its own sweep at concurrency 1.
Prompts/s = N / mean request latency (concurrency 1; see `prompts_per_second`).

Every point is checked against the server's own counters over exactly the measured requests: an
`uncached` point must show one cache miss and one encoder execution per request, a cached point no
miss and no encoder execution.  A point that was not what it claims raises `SweepIntegrityError`.
The same counters give the time per request each engine model took (queue + compute).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

from evfsam.specs import BEIT3_FUSION_ENCODER, CACHE_METRICS, EVF_SAM_PROMPTS, PROMPT_MASK_DECODER, SAM_IMAGE_ENCODER
from serving import metrics
from serving.server import TritonServer

from . import machine, pa_inputs
from . import perf_analyzer as pa
from .budgets import Budget
from .samples import Sample

UNCACHED, CACHED_BYTES, CACHED_KEY = "uncached", "cached_bytes", "cached_key"
MODES = (UNCACHED, CACHED_BYTES, CACHED_KEY)
ENGINES = (SAM_IMAGE_ENCODER.name, BEIT3_FUSION_ENCODER.name, PROMPT_MASK_DECODER.name)
TRITON_COUNTERS = {
    "requests": "nv_inference_request_success",
    "executions": "nv_inference_exec_count",
    "request_us": "nv_inference_request_duration_us",
    "compute_infer_us": "nv_inference_compute_infer_duration_us",
}


class SweepIntegrityError(RuntimeError):
    """The server's counters show that a point did not measure what its mode claims."""


@dataclass(frozen=True)
class ServerCounters:
    """Cumulative counters of one scrape: the cache's, and Triton's per model."""

    cache: Dict[str, float]
    models: Dict[str, Dict[str, float]]

    @classmethod
    def read(cls, metrics_url: str) -> "ServerCounters":
        samples = metrics.scrape(metrics_url)
        cache = {key: metrics.total(samples, name) for key, name in CACHE_METRICS.items()}
        models = {model: {key: metrics.total(samples, name, model=model) for key, name in TRITON_COUNTERS.items()}
                  for model in (EVF_SAM_PROMPTS.name, *ENGINES)}
        return cls(cache, models)

    def minus(self, earlier: "ServerCounters") -> "ServerCounters":
        return ServerCounters({k: v - earlier.cache[k] for k, v in self.cache.items()},
                              {m: {k: v - earlier.models[m][k] for k, v in c.items()} for m, c in self.models.items()})


def check_point(mode: str, count: int, delta: ServerCounters) -> int:
    """The number of requests the server answered during the point; raises if the cache or the
    encoder did something else than `mode` means."""
    requests = int(delta.models[EVF_SAM_PROMPTS.name]["requests"])
    encoder_runs = int(delta.models[SAM_IMAGE_ENCODER.name]["requests"])
    hits, misses = int(delta.cache["hits"]), int(delta.cache["misses"])
    expected = (requests, 0, requests) if mode == UNCACHED else (0, requests, 0)  # misses, hits, encoder runs
    if requests == 0 or (misses, hits, encoder_runs) != expected:
        raise SweepIntegrityError(
            f"{mode} N={count}: the server answered {requests} requests with {misses} cache misses, {hits} hits and "
            f"{encoder_runs} image-encoder runs; expected {expected[0]} misses, {expected[1]} hits, "
            f"{expected[2]} encoder runs")
    return requests


def engine_breakdown(delta: ServerCounters, requests: int) -> Dict[str, Dict[str, float]]:
    """Per evf_sam_prompts request: each engine model's calls and milliseconds (queue + compute), and
    what evf_sam_prompts spent itself (decode, hash, tokenize, masks, BLS round trips)."""
    result = {}
    for model in ENGINES:
        counters = delta.models[model]
        result[model] = {"calls": counters["requests"] / requests, "ms": counters["request_us"] / 1000 / requests}
    own = delta.models[EVF_SAM_PROMPTS.name]["compute_infer_us"] / 1000 / requests
    result[EVF_SAM_PROMPTS.name] = {"calls": 1.0, "ms": own - sum(r["ms"] for r in result.values())}
    return result


def prompts_per_second(point: Mapping, count: int) -> float:
    """From the mean client latency: at concurrency 1 requests go back to back, and perf_analyzer
    2.51's own throughput divides by a window rounded up to whole seconds (13 requests of 252 ms are
    reported as 13 / 4 s = 3.25/s, 24% low), too coarse for short points."""
    return 1000.0 * count / point["mean_ms"]


def measure_point(server: TritonServer, mode: str, count: int, samples: Sequence[Sample], budget: Budget,
                  inputs_dir: Path, out_dir: Path) -> Dict:
    """Warm-up (one request per image, twice in the cached modes: fills the cache, then sizes the
    request count), then the measured perf_analyzer run at concurrency 1 between two scrapes of the
    counters."""
    data = pa_inputs.prompts_input_data(samples, count, by_key=mode == CACHED_KEY)
    path = pa_inputs.write_json(data, inputs_dir / f"{EVF_SAM_PROMPTS.name}_{mode}_n{count}.json")
    with tempfile.TemporaryDirectory() as scratch:
        # cached modes: a second pass, all hits, sizes the request count (the first may have missed)
        for _ in range(1 if mode == UNCACHED else 2):
            warm = pa.run_point(EVF_SAM_PROMPTS.name, server.grpc_url, path, 1, len(data["data"]), Path(scratch))
    requests = budget.requests(1, warm.mean_ms / 1000, budget.served_prompt_seconds)
    point_dir = out_dir / f"{mode}_n{count}"
    before, share = ServerCounters.read(server.metrics_url), machine.CpuShare()
    point = pa.run_point(EVF_SAM_PROMPTS.name, server.grpc_url, path, 1, requests, point_dir).to_dict()
    delta = ServerCounters.read(server.metrics_url).minus(before)
    served = check_point(mode, count, delta)
    point.update(mode=mode, prompts=count, images=len(data["data"]), prompts_per_s=prompts_per_second(point, count),
                 other_jobs_cpu_share=share.others(), server_requests=served,
                 cache={k: int(v) for k, v in delta.cache.items()}, engines=engine_breakdown(delta, served))
    print(f"  {EVF_SAM_PROMPTS.name} {mode} N={count}: {point['prompts_per_s']:.2f} prompts/s, p50 "
          f"{point['p50_ms']:.0f} ms ({requests} requests; other jobs used "
          f"{100 * (point['other_jobs_cpu_share'] or 0):.0f}% of the CPUs)", flush=True)
    return point


def sweep_server(repository: Path, modes: Sequence[str], samples: Sequence[Sample], budget: Budget,
                 inputs_dir: Path, out_dir: Path, log_file: Path, ready_timeout: float) -> List[Dict]:
    with TritonServer.on_free_ports(repository, log_file=log_file, ready_timeout=ready_timeout) as server:
        return [measure_point(server, mode, count, samples, budget, inputs_dir, out_dir)
                for count in budget.served_prompt_counts for mode in modes]


def measure(onnx_dir: Path, build_dir: Path, samples: Sequence[Sample], budget: Budget, out_dir: Path,
            cache_bytes: int, ready_timeout: float = 1800.0) -> Dict:
    """Two servers on the same graphs: one with the embedding cache off, one with `cache_bytes`."""
    from serving.repository import RepositoryOptions, write_repository

    servers = {UNCACHED: (0, (UNCACHED,)), "cached": (cache_bytes, (CACHED_BYTES, CACHED_KEY))}
    points: List[Dict] = []
    for name, (budget_bytes, modes) in servers.items():
        repository = write_repository(build_dir / f"model_repository_{name}", onnx_dir,
                                      RepositoryOptions(cache_bytes=budget_bytes))
        points += sweep_server(repository, modes, samples, budget, build_dir / "perf_inputs", out_dir,
                               build_dir / f"tritonserver_{name}.log", ready_timeout)
    return {"cache_bytes": cache_bytes, "prompt_counts": list(budget.served_prompt_counts),
            "points": by_mode(points)}


def by_mode(points: Sequence[Mapping]) -> Dict[str, Dict[str, Dict]]:
    """{mode: {N: point}} (N as a string: JSON keys)."""
    result: Dict[str, Dict[str, Dict]] = {}
    for point in points:
        result.setdefault(point["mode"], {})[str(point["prompts"])] = dict(point)
    return result
