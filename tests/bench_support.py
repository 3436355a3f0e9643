"""Shared by the benchmark tests: a synthetic results.json and the perf_analyzer availability mark."""
from __future__ import annotations

import subprocess

import pytest

from benchmarks import perf_analyzer as pa
from benchmarks.inprocess import STAGES
from benchmarks.measure import EAGER, ORT
from evfsam.specs import EVF_SAM, PROMPT_MASK_DECODER


def perf_analyzer_runs() -> bool:
    try:
        binary, env = pa.binary(), pa.environment()
    except pa.PerfAnalyzerError:  # not installed, or no libb64 and no compiler to build ours
        return False
    return subprocess.run([binary, "--version"], capture_output=True, env=env).returncode == 0


needs_perf_analyzer = pytest.mark.skipif(not perf_analyzer_runs(),
                                         reason="perf_analyzer does not run here")


def _stats(p50: float, throughput: float) -> dict:
    return {"count": 4, "min_ms": p50, "mean_ms": p50, "p50_ms": p50, "p90_ms": p50, "p95_ms": p50, "p99_ms": p50,
            "throughput": throughput}


def _point(concurrency: int, p50: float, throughput: float) -> dict:
    server = {s: {"avg_latency_ms": 10.0, "parts_ms": {"queue": 1.0, "compute infer": 9.0}, "avg_batch": 1.0}
              for s in STAGES}
    return {"concurrency": concurrency, "request_count": 10, "throughput": throughput, "mean_ms": p50,
            "p50_ms": p50, "p90_ms": p50, "p95_ms": p50, "p99_ms": p50, "server": server}


def synthetic_results() -> dict:
    stages = {s: 10.0 for s in STAGES}
    return {
        "meta": {"size": "tiny", "date": "2026-01-01", "command": "python -m benchmarks.run",
                 "machine": {"cpu_model": "CPU", "cpu_family_model": "1/2", "vcpus": 2, "usable_cpus": 2,
                             "threads_per_core": "1", "hypervisor": None, "isa": "avx2", "memory_gib": 8.0,
                             "gpu": None, "os": "Linux", "python": "3.11"},
                 "versions": {"torch": "2"}, "model": {"parameters": {"total": 5e6}}, "samples": [],
                 "budget": {"prompt_repeats": 2},
                 "wall_seconds": {"total": 120.0, "in-process": 60.0}, "load_average": {},
                 "not_measured": ["GPU"], "notes": [], "files": []},
        "inprocess": {"side_by_side": {EAGER: {"stats": _stats(400.0, 2.5)}, ORT: {"stats": _stats(200.0, 5.0)}},
                      "stages_ms": {EAGER: stages, ORT: stages}},
        "batch_scaling": {PROMPT_MASK_DECODER.name: {"1": _stats(10.0, 100.0), "2": _stats(15.0, 133.0)}},
        "prompt_scaling": {f"{e}/{v}": {"1": _stats(100.0, 10.0), "4": _stats(200.0, 20.0)}
                           for e in (ORT, EAGER) for v in ("encoder_once", "n_pipelines")},
        "triton": {"models": {EVF_SAM.name: [_point(1, 250.0, 4.0), _point(2, 300.0, 6.0)]}},
    }
