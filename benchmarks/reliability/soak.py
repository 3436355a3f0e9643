"""Soak: perf_analyzer keeps `evf_sam` and `evf_sam_prompts` saturated for a long time, several images in
turn so that the feature cache keeps evicting, while the resident memory of tritonserver and of every
python-backend stub is sampled.  Reports memory growth after the warm-up and every failed request
(perf_analyzer's and Triton's own failure counters).

perf_analyzer runs in rounds of a fixed request count (a fixed count keeps each run bounded on a busy
machine, where its time-window stabilisation can fail); the count is sized from the previous round to
take about `round_s`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from evfsam.specs import CACHE_METRICS, EVF_SAM, EVF_SAM_PROMPTS
from serving import metrics
from serving.server import TritonServer

from .. import pa_inputs
from .. import perf_analyzer as pa
from ..samples import PROMPTS, Sample
from . import probes
from .rss import RssSampler, growth

SERVED = (EVF_SAM.name, EVF_SAM_PROMPTS.name)
PROMPTS_PER_REQUEST = 4


@dataclass(frozen=True)
class SoakPlan:
    duration_s: float
    concurrency: int = 4  # per served model: both together keep every front instance and engine busy
    round_s: float = 60.0
    warmup_s: float = 120.0
    sample_interval_s: float = 5.0


def write_inputs(images: Sequence[bytes], out_dir: Path) -> Dict[str, Path]:
    """perf_analyzer --input-data: every image with a prompt (evf_sam), every image with 4 prompts
    (evf_sam_prompts); image bytes only, so every request is valid whatever the cache holds."""
    samples = [Sample(f"image{i}", image, PROMPTS[i % len(PROMPTS)]) for i, image in enumerate(images)]
    return {EVF_SAM.name: pa_inputs.write_json(pa_inputs.single_prompt_input_data(samples), out_dir / "evf_sam.json"),
            EVF_SAM_PROMPTS.name: pa_inputs.write_json(pa_inputs.prompts_input_data(samples, PROMPTS_PER_REQUEST),
                                                       out_dir / "evf_sam_prompts.json")}


class RoundLoop:
    """perf_analyzer rounds on one model until the deadline."""

    def __init__(self, server: TritonServer, model: str, input_data: Path, plan: SoakPlan, out_dir: Path):
        self.server, self.model, self.input_data, self.plan, self.out_dir = server, model, input_data, plan, out_dir
        self.rounds: List[Dict[str, object]] = []
        self.errors: List[str] = []

    def run(self, deadline: float) -> None:
        count = 2 * self.plan.concurrency
        while time.monotonic() + 0.5 * self.plan.round_s < deadline or not self.rounds:
            started = time.monotonic()
            try:
                point = pa.run_point(self.model, self.server.grpc_url, self.input_data, self.plan.concurrency, count,
                                     self.out_dir / self.model / f"round{len(self.rounds):03d}",
                                     timeout=10 * self.plan.round_s + 600)
            except (pa.PerfAnalyzerError, OSError) as exc:
                self.errors.append(str(exc)[-1000:])
                self.rounds.append({"t_s": started, "error": True})
                time.sleep(1)
                continue
            elapsed = time.monotonic() - started
            self.rounds.append({"t_s": started, "seconds": round(elapsed, 1), "requests": count,
                                "throughput": point.throughput, "p50_ms": point.p50_ms, "p99_ms": point.p99_ms})
            count = max(2 * self.plan.concurrency, int(point.throughput * self.plan.round_s))


def cache_counters(metrics_url: str) -> Dict[str, float]:
    samples = metrics.scrape(metrics_url)
    return {key: metrics.total(samples, name) for key, name in CACHE_METRICS.items()}


def run(server: TritonServer, images: Sequence[bytes], plan: SoakPlan, work_dir: Path) -> Dict[str, object]:
    inputs = write_inputs(images, work_dir / "inputs")
    loops = {model: RoundLoop(server, model, inputs[model], plan, work_dir / "perf_analyzer") for model in SERVED}
    counters_before = probes.counter_snapshot(server.metrics_url, SERVED)
    stats_before = probes.all_counts(server.http_url, SERVED)
    cache_before = cache_counters(server.metrics_url)
    started = time.monotonic()
    deadline = started + plan.duration_s
    with RssSampler(server.process.pid, plan.sample_interval_s) as sampler, \
            probes.ReadinessPoller(server.http_url, interval_s=1.0) as readiness:
        threads = [threading.Thread(target=loop.run, args=(deadline,)) for loop in loops.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seconds = time.monotonic() - started
    counters = probes.counter_delta(probes.counter_snapshot(server.metrics_url, SERVED), counters_before)
    stats = {m: c.minus(stats_before[m]).to_dict() for m, c in probes.all_counts(server.http_url, SERVED).items()}
    cache_after = cache_counters(server.metrics_url)
    rss = sampler.to_dict()
    return {
        "plan": plan.__dict__, "seconds": round(seconds, 1), "images": len(images),
        "models": {model: _model_summary(loop, started, stats[model], counters[model]) for model, loop in loops.items()},
        "cache": {key: int(cache_after[key] - cache_before[key]) for key in cache_after},
        "readiness": readiness.summary(),
        "rss": rss,
        "rss_growth": growth(rss["t_s"], rss["rss_mib"], plan.warmup_s),
        "private_growth": growth(rss["t_s"], rss["private_mib"], plan.warmup_s),
        "server_kinds_growth": {kind: value for kind, value in
                                growth(rss["t_s"], rss["server_kinds_mib"], plan.warmup_s).items() if kind != "total"},
        "stub_restarts_or_deaths": [label for label, column in rss["rss_mib"].items() if None in column],
    }


def _model_summary(loop: RoundLoop, started: float, stats: Dict, counters: Dict) -> Dict[str, object]:
    done = [r for r in loop.rounds if not r.get("error")]
    for r in loop.rounds:
        r["t_s"] = round(r["t_s"] - started, 1)
    failures = sum(counters[reason] for reason in probes.FAILURE_REASONS)
    return {"rounds": loop.rounds, "perf_analyzer_errors": loop.errors,
            "requests_measured": sum(r["requests"] for r in done),
            "throughput_mean": round(sum(r["throughput"] for r in done) / len(done), 3) if done else None,
            "p99_ms_max": max((r["p99_ms"] for r in done), default=None),
            "server_stats": stats, "server_failures": failures, "failure_counters": counters}
