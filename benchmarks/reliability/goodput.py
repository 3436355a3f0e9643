"""Goodput under client deadlines (issue 11's scenario): raw `tritonclient` gRPC clients calling
`evf_sam` with a deadline (`client_timeout`) drawn uniformly from 0.05-1.5 s, retrying at once.

Every request carries a new image (the same picture under a new cache key, `inputs.unique_jpeg`), so
each one that gets past the cache runs the SAM image encoder exactly once: encoder executions beyond
the successful responses are work done for clients that had already gone.  The reference is the
single-stream capacity, successful requests/s of one client in a loop without deadlines, measured in
the same run on the same server.  The goal: deadline clients get at least half of it as successes.

The server runs under `python -m serving.server`, so a tritonserver crash (gRPC cancellation can
crash 2.51) is seen as a new tritonserver process and the launcher's "restarting" line.
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from evfsam.specs import BEIT3_FUSION_ENCODER, EVF_SAM, PROMPT_MASK_DECODER, SAM_IMAGE_ENCODER

from . import probes
from .inputs import PROMPT, SAMPLE_IMAGE, evf_sam_inputs, unique_jpeg
from .launcher import Launcher

ENGINES = (SAM_IMAGE_ENCODER.name, BEIT3_FUSION_ENCODER.name, PROMPT_MASK_DECODER.name)
SUCCESS, DEADLINE, REJECTED = "success", "deadline_exceeded", "rejected"
GOAL_FRACTION = 0.5
QUEUE_REFUSALS = ("Exceeds maximum queue size", "Request timeout expired")  # Triton's, for a full queue / a long wait
# Repository options measured: the generated defaults (the image encoder admits as many images as it
# runs at once; the other requests wait where a gone client's request is dropped); the same without that
# bound (every request goes straight on to the encoder's queue: how it was before); and a profile for
# clients with short deadlines: one request in the pipeline at a time and a queue that sheds what waited
# longer than 200 ms (its client is likely gone by the time it would run).
PROFILES = {"default": {}, "unbounded_encodes": {"encodes_in_flight": 0},
            "deadline_profile": {"front_instances": 1, "served_queue_timeout_us": 200_000}}


@dataclass(frozen=True)
class GoodputPlan:
    duration_s: float = 60.0
    clients: int = 8
    min_deadline_s: float = 0.05
    max_deadline_s: float = 1.5
    single_stream_s: float = 30.0
    seed: int = 11


class Serials:
    """Distinct request numbers across threads (one new image per request)."""

    def __init__(self, start: int):
        self._next, self._lock = start, threading.Lock()

    def take(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


def outcome(exc: InferenceServerException) -> str:
    status = str(exc.status())
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return DEADLINE
    if status == "StatusCode.UNAVAILABLE" and any(text in (exc.message() or "") for text in QUEUE_REFUSALS):
        return REJECTED
    return f"{status}: {(exc.message() or '')[:80]}"


def single_stream(url: str, image: bytes, serials: Serials, seconds: float) -> Dict[str, object]:
    client = grpcclient.InferenceServerClient(url)
    latencies, errors = [], Counter()
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        sent = time.monotonic()
        try:
            client.infer(EVF_SAM.name, evf_sam_inputs(grpcclient, unique_jpeg(image, serials.take()), PROMPT.encode()))
            latencies.append(time.monotonic() - sent)
        except InferenceServerException as exc:
            errors[outcome(exc)] += 1
    elapsed = time.monotonic() - started
    client.close()
    return {"seconds": round(elapsed, 1), "successes": len(latencies), "errors": dict(errors),
            "per_s": round(len(latencies) / elapsed, 3), "p50_ms": _percentile(latencies, 50)}


def deadline_client(url: str, image: bytes, serials: Serials, plan: GoodputPlan, index: int, deadline: float,
                    tally: Counter, latencies: List[float], lock: threading.Lock) -> None:
    rng = random.Random(plan.seed * 1000 + index)
    client = grpcclient.InferenceServerClient(url)
    while time.monotonic() < deadline:
        timeout = rng.uniform(plan.min_deadline_s, plan.max_deadline_s)
        inputs = evf_sam_inputs(grpcclient, unique_jpeg(image, serials.take()), PROMPT.encode())
        sent = time.monotonic()
        try:
            client.infer(EVF_SAM.name, inputs, client_timeout=timeout)
            result, took = SUCCESS, time.monotonic() - sent
        except InferenceServerException as exc:
            result, took = outcome(exc), None
        with lock:
            tally[result] += 1
            if took is not None:
                latencies.append(took)
    client.close()


def run(launcher: Launcher, plan: GoodputPlan) -> Dict[str, object]:
    image = SAMPLE_IMAGE.read_bytes()
    serials = Serials(random.Random(plan.seed).randrange(10**9))
    pid_before = launcher.server_pid()
    reference = single_stream(launcher.grpc_url, image, serials, plan.single_stream_s)
    models = (EVF_SAM.name, *ENGINES)
    counters_before = probes.counter_snapshot(launcher.metrics_url, models)
    stats_before = probes.all_counts(launcher.http_url, models)
    tally, latencies, lock = Counter(), [], threading.Lock()
    started = time.monotonic()
    with probes.ReadinessPoller(launcher.http_url) as readiness:
        threads = [threading.Thread(target=deadline_client, args=(launcher.grpc_url, image, serials, plan, i,
                                                                  started + plan.duration_s, tally, latencies, lock))
                   for i in range(plan.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        time.sleep(3)  # let the server finish what the clients abandoned before reading its counters
    server_alive = probes.server_ready(launcher.http_url)
    counters = probes.counter_delta(probes.counter_snapshot(launcher.metrics_url, models), counters_before)
    stats = {m: c.minus(stats_before[m]) for m, c in probes.all_counts(launcher.http_url, models).items()}
    successes = tally[SUCCESS]
    goodput = successes / elapsed
    executed = counters[EVF_SAM.name]["started"]
    return {
        "plan": plan.__dict__,
        "single_stream": reference,
        "seconds": round(elapsed, 1),
        "requests": sum(tally.values()),
        "outcomes": dict(tally),
        "successes_per_s": round(goodput, 3),
        "fraction_of_single_stream": round(goodput / reference["per_s"], 3) if reference["per_s"] else None,
        "goal_met": bool(reference["per_s"]) and goodput >= GOAL_FRACTION * reference["per_s"],
        "success_latency_ms": {"p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99)},
        "server": {
            "executed_by_evf_sam": executed,
            "dropped_in_queue_canceled": counters[EVF_SAM.name]["CANCELED"],
            "rejected_queue_full": counters[EVF_SAM.name]["REJECTED"],
            "executed_for_gone_clients": max(0, executed - successes),
            "encoder_runs": stats[SAM_IMAGE_ENCODER.name].inference_count,
            "encoder_runs_for_gone_clients": max(0, stats[SAM_IMAGE_ENCODER.name].inference_count - successes),
            "engine_counts": {m: stats[m].to_dict() for m in ENGINES},
            "failure_counters": counters,
        },
        "readiness": readiness.summary(),
        "server_ready_after": server_alive,
        "tritonserver_restarted": launcher.server_pid() != pid_before,
        "launcher_restarts": len(launcher.log_lines("restarting tritonserver")),
    }


def _percentile(values: List[float], q: float):
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None
