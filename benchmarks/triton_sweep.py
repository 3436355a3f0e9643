"""(c): the real tritonserver on the generated repository, measured by perf_analyzer."""
from __future__ import annotations

import json
import tempfile
import urllib.request
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

from evfsam.specs import EVF_SAM, GRAPHS
from serving.server import TritonServer

from . import machine, pa_inputs
from . import perf_analyzer as pa
from .budgets import Budget
from .inprocess import OrtPipeline
from .samples import Sample


def write_input_data(ort: OrtPipeline, samples: Sequence[Sample], engine_samples: int, out_dir: Path) -> Dict[str, Path]:
    """One --input-data JSON per served model: file bytes + prompts for evf_sam, real preprocessed
    tensors (and real encoder outputs for the decoder) for each engine model."""
    paths = {EVF_SAM.name: pa_inputs.write_json(pa_inputs.ensemble_input_data(samples), out_dir / f"{EVF_SAM.name}.json")}
    feeds = ort.graph_feeds(samples[:engine_samples])
    for spec in GRAPHS:
        data = pa_inputs.engine_input_data(spec, feeds[spec.name])
        paths[spec.name] = pa_inputs.write_json(data, out_dir / f"{spec.name}.json")
    return paths


def server_version(server: TritonServer) -> str:
    with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=5) as response:
        return json.load(response).get("version", "unknown")


def sweep(server: TritonServer, model: str, input_data: Path, latency_s: float, budget: Budget, out_dir: Path) -> List[Dict]:
    """A short untimed warm-up, then one perf_analyzer run per concurrency level."""
    with tempfile.TemporaryDirectory() as scratch:
        pa.run_point(model, server.grpc_url, input_data, 1, max(2, budget.warmup), Path(scratch))
    points = []
    for concurrency in budget.concurrency:
        count = budget.requests(concurrency, latency_s)
        share = machine.CpuShare()
        point = pa.run_point(model, server.grpc_url, input_data, concurrency, count, out_dir).to_dict()
        point["other_jobs_cpu_share"] = share.others()
        print(f"  {model} c={concurrency}: {point['throughput']:.2f} infer/s, p50 {point['p50_ms']:.0f} ms "
              f"({count} requests; other jobs used {100 * (point['other_jobs_cpu_share'] or 0):.0f}% of the CPUs)",
              flush=True)
        points.append(point)
    return points


def measure(repository: Path, inputs: Mapping[str, Path], latencies_s: Mapping[str, float], budget: Budget,
            out_dir: Path, log_file: Path, ready_timeout: float = 1800.0) -> Dict:
    """Start tritonserver (free ports), sweep evf_sam and then each engine model on its own."""
    with TritonServer.on_free_ports(repository, log_file=log_file, ready_timeout=ready_timeout) as server:
        result = {"tritonserver_version": server_version(server), "models": {}}
        for model, path in inputs.items():
            result["models"][model] = sweep(server, model, path, latencies_s[model], budget, out_dir)
    return result
