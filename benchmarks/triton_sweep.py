"""(c): the real tritonserver on the generated repository, measured by perf_analyzer.

`evf_sam` is swept over concurrency on a server whose image-feature cache is off, with every request
carrying its own image bytes (`samples.distinct_images`): each request then runs the whole pipeline
(decode, views, image encoder, BEiT-3, decoder, mask), as (a) and (b) do, and concurrent requests
never share an encoder run through the cache's claims.  Each point is checked against the server's
counters (one miss and one encoder run per request) and broken down per model from Triton's
statistics over exactly its requests.  Each engine model is also swept alone on real inputs.
"""
from __future__ import annotations

import json
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from evfsam.specs import EVF_SAM, FamilySpec
from serving.server import TritonServer

from . import machine, pa_inputs
from . import perf_analyzer as pa
from .budgets import Budget
from .inprocess import OrtPipeline
from .samples import Sample, distinct_images
from .server_stats import ServerCounters, breakdown, check_counts


def write_input_data(ort: OrtPipeline, samples: Sequence[Sample], engine_samples: int, copies: int,
                     out_dir: Path) -> Dict[str, Path]:
    """One --input-data JSON per served model: `copies` passes of byte-distinct images + prompts for
    evf_sam, real preprocessed tensors (and the encoders' real outputs for the decoder) for each engine."""
    data = pa_inputs.single_prompt_input_data(distinct_images(samples, copies))
    paths = {EVF_SAM.name: pa_inputs.write_json(data, out_dir / f"{EVF_SAM.name}.json")}
    feeds = ort.graph_feeds(samples[:engine_samples])
    for spec in ort.family.graphs:
        paths[spec.name] = pa_inputs.write_json(pa_inputs.engine_input_data(spec, feeds[spec.name]),
                                                out_dir / f"{spec.name}.json")
    return paths


def server_version(server: TritonServer) -> str:
    with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=5) as response:
        return json.load(response).get("version", "unknown")


Inspect = Callable[[str, ServerCounters], Dict]


def measured_point(server: TritonServer, model: str, input_data: Path, concurrency: int, requests: int,
                   out_dir: Path, inspect: Inspect) -> Dict:
    """One perf_analyzer run between two readings of the server's counters; `inspect(label, delta)`
    checks the delta and returns what to record of it."""
    before, share = ServerCounters.read(server), machine.CpuShare()
    point = pa.run_point(model, server.grpc_url, input_data, concurrency, requests, out_dir).to_dict()
    delta = ServerCounters.read(server).minus(before)
    point["other_jobs_cpu_share"] = share.others()
    point["cpu_ms_per_request"] = 1000 * share.own_seconds() / requests
    point.update(inspect(f"{model} c={concurrency}", delta))
    return point


def warm_up(server: TritonServer, model: str, input_data: Path, requests: int) -> pa.PerfPoint:
    with tempfile.TemporaryDirectory() as scratch:
        return pa.run_point(model, server.grpc_url, input_data, 1, requests, Path(scratch))


def served_inspector(family_spec: FamilySpec, expect_cached: bool) -> Inspect:
    def inspect(label: str, delta: ServerCounters) -> Dict:
        requests = check_counts(label, delta, EVF_SAM.name, family_spec.image_encoder.name, expect_cached)
        return {"server_requests": requests, "cache": {k: int(v) for k, v in delta.cache.items()},
                "models": breakdown(delta, EVF_SAM.name, family_spec)}
    return inspect


def engine_inspector(model: str) -> Inspect:
    def inspect(label: str, delta: ServerCounters) -> Dict:
        counters = delta.models[model]
        requests = counters["requests"]
        if requests == 0 or counters["failures"]:
            raise RuntimeError(f"{label}: {int(requests)} requests answered, {int(counters['failures'])} failed")
        return {"server_requests": int(requests), "queue_ms": counters["queue_ns"] / 1e6 / requests,
                "compute_ms": sum(counters[f"{p}_ns"] for p in ("compute_input", "compute_infer", "compute_output"))
                / 1e6 / requests,
                "avg_batch": counters["inferences"] / counters["executions"] if counters["executions"] else 0.0}
    return inspect


def sweep(server: TritonServer, model: str, input_data: Path, latency_s: float, levels: Sequence[int],
          budget: Budget, out_dir: Path, inspect: Inspect) -> List[Dict]:
    """A short untimed warm-up, then one perf_analyzer run per concurrency level."""
    warm_up(server, model, input_data, max(2, budget.warmup))
    points = []
    for concurrency in levels:
        count = budget.requests(concurrency, latency_s)
        point = measured_point(server, model, input_data, concurrency, count, out_dir, inspect)
        print(f"  {model} c={concurrency}: {point['throughput']:.2f} infer/s, p50 {point['p50_ms']:.0f} ms "
              f"({count} requests; other jobs used {100 * (point['other_jobs_cpu_share'] or 0):.0f}% of the CPUs)",
              flush=True)
        points.append(point)
    return points


def measure(server: TritonServer, family_spec: FamilySpec, inputs: Mapping[str, Path],
            latencies_s: Mapping[str, float], budget: Budget, out_dir: Path) -> Dict:
    """evf_sam over `budget.concurrency` (cache off: the server must have been generated with
    cache_bytes 0), then each engine model alone over `budget.engine_concurrency`."""
    result: Dict[str, object] = {"tritonserver_version": server_version(server), "models": {}}
    result["models"][EVF_SAM.name] = sweep(server, EVF_SAM.name, inputs[EVF_SAM.name], latencies_s[EVF_SAM.name],
                                           budget.concurrency, budget, out_dir,
                                           served_inspector(family_spec, expect_cached=False))
    for spec in family_spec.graphs if budget.engine_concurrency else ():
        result["models"][spec.name] = sweep(server, spec.name, inputs[spec.name], latencies_s[spec.name],
                                            budget.engine_concurrency, budget, out_dir, engine_inspector(spec.name))
    return result


def point_at(points: Sequence[Dict], concurrency: int) -> Optional[Dict]:
    return next((p for p in points if p["concurrency"] == concurrency), None)
