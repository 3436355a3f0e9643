"""Shared by the benchmark tests: a synthetic results.json and the perf_analyzer availability mark."""
from __future__ import annotations

import subprocess

import pytest

from benchmarks import perf_analyzer as pa
from benchmarks.inprocess import stages
from benchmarks.measure import EAGER, ORT
from evfsam.specs import EVF_SAM, IMAGE_CACHE_NAME, ORI, PROMPT_MASK_DECODER


def perf_analyzer_runs() -> bool:
    try:
        binary, env = pa.binary(), pa.environment()
    except pa.PerfAnalyzerError:  # not installed, or no libb64 and no compiler to build ours
        return False
    return subprocess.run([binary, "--version"], capture_output=True, env=env).returncode == 0


needs_perf_analyzer = pytest.mark.skipif(not perf_analyzer_runs(),
                                         reason="perf_analyzer does not run here")
STAGES = stages(ORI)


def _stats(p50: float, throughput: float) -> dict:
    return {"count": 4, "min_ms": p50, "mean_ms": p50, "p50_ms": p50, "p90_ms": p50, "p95_ms": p50, "p99_ms": p50,
            "throughput": throughput}


def served_models(total_ms: float, encoder_calls: float = 1.0, served_model: str = EVF_SAM.name) -> dict:
    """A `server_stats.breakdown` of one request: a fifth each for the cache, the engines and own work."""
    part = {"calls": 1.0, "queue_ms": 1.0, "compute_ms": total_ms / 5 - 1, "total_ms": total_ms / 5, "avg_batch": 1.0}
    models = {m: dict(part) for m in (IMAGE_CACHE_NAME, *(g.name for g in ORI.graphs))}
    models[ORI.image_encoder.name].update(calls=encoder_calls)
    models[served_model] = {"calls": 1.0, "queue_ms": 0.0, "compute_ms": total_ms, "total_ms": total_ms, "avg_batch": 1.0}
    models["own"] = {"calls": 1.0, "queue_ms": 0.0, "compute_ms": total_ms / 5, "total_ms": total_ms / 5, "avg_batch": 0.0}
    return models


def _point(concurrency: int, p50: float, throughput: float) -> dict:
    return {"concurrency": concurrency, "request_count": 10, "throughput": throughput, "mean_ms": p50,
            "p50_ms": p50, "p90_ms": p50, "p95_ms": p50, "p99_ms": p50, "models": served_models(p50),
            "cache": {"hits": 0, "misses": 10, "evictions": 0}}


def synthetic_results() -> dict:
    stage_ms = {s: 10.0 for s in STAGES}
    return {
        "meta": {"family": "ori", "recipe": "ori", "size": "tiny", "date": "2026-01-01", "git_commit": "abc123",
                 "command": "python -m benchmarks.run",
                 "machine": {"cpu_model": "CPU", "cpu_family_model": "1/2", "vcpus": 2, "usable_cpus": 2,
                             "threads_per_core": "1", "hypervisor": None, "isa": "avx2", "memory_gib": 8.0,
                             "gpu": None, "os": "Linux", "python": "3.11"},
                 "versions": {"torch": "2"}, "model": {"parameters": {"total": 5e6}}, "samples": [],
                 "budget": {"prompt_repeats": 2},
                 "wall_seconds": {"total": 120.0, "in-process": 60.0}, "load_average": {},
                 "not_measured": ["GPU"], "notes": [], "files": []},
        "inprocess": {"stages": list(STAGES), "agreement": {"min_pixel_agreement": 1.0, "max_score_difference": 0.0},
                      "side_by_side": {EAGER: {"stats": _stats(400.0, 2.5)}, ORT: {"stats": _stats(200.0, 5.0)}},
                      "stages_ms": {EAGER: stage_ms, ORT: stage_ms}},
        "batch_scaling": {PROMPT_MASK_DECODER.name: {"1": _stats(10.0, 100.0), "2": _stats(15.0, 133.0)}},
        "prompt_scaling": {f"{e}/{v}": {"1": _stats(100.0, 10.0), "4": _stats(200.0, 20.0)}
                           for e in (ORT, EAGER) for v in ("encoder_once", "n_pipelines")},
        "triton": {"models": {EVF_SAM.name: [_point(1, 250.0, 4.0), _point(2, 300.0, 6.0)]}},
    }
