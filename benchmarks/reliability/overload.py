"""Overload: ten times `evf_sam`'s queue bound in flight at once over gRPC.  What does not fit the queue
(max_queue_size, plus one request per front instance executing) must be rejected at once (UNAVAILABLE,
"Exceeds maximum queue size"), the rest answered, and the server ready and serving right after.

The accepted requests all carry one image the cache already holds, so the burst drains in seconds.
The burst's rejection latencies are what its (single, busy) client process saw, its own work of sending
hundreds of requests included; once the first rejection is back, `PROBES` more requests are sent one at
a time while the queue is still full: their latency is the server's answer time for a refused request.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from evfsam.specs import EVF_SAM

from . import probes
from .inputs import PROMPT, SAMPLE_IMAGE, evf_sam_inputs, unique_jpeg

OVERLOAD_FACTOR = 10
PROBES = 20
ACCEPTED, REJECTED = "answered", "rejected"
QUEUE_FULL_MESSAGE = "Exceeds maximum queue size"


def queue_bound(repository: Path, model: str = EVF_SAM.name) -> Tuple[int, int]:
    """(max_queue_size, instance count) from the model's generated config."""
    text = (repository / model / "config.pbtxt").read_text()
    queue = int(text.split("max_queue_size:")[1].split()[0])
    instances = int(text.split("instance_group")[1].split("count:")[1].split()[0])
    return queue, instances


async def _burst(url: str, image: bytes, count: int) -> Tuple[List[Tuple[str, float, str]], List[Tuple[str, float, str]]]:
    """(the burst's outcomes, the probes' outcomes): (kind, seconds, gRPC status) each."""
    client = grpcclient_aio.InferenceServerClient(url)
    inputs = evf_sam_inputs(grpcclient, image, PROMPT.encode())

    async def one() -> Tuple[str, float, str]:
        sent = time.perf_counter()
        try:
            await client.infer(EVF_SAM.name, inputs)
            return ACCEPTED, time.perf_counter() - sent, ""
        except InferenceServerException as exc:
            message = exc.message() or ""
            kind = REJECTED if QUEUE_FULL_MESSAGE in message else f"{exc.status()}: {message[:80]}"
            return kind, time.perf_counter() - sent, str(exc.status())

    try:
        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        pending = set(tasks)
        while pending and not any(t.done() and t.result()[0] == REJECTED for t in tasks):
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        probes_sent = [await one() for _ in range(PROBES)]
        return list(await asyncio.gather(*tasks)), probes_sent
    finally:
        await client.close()


def run(http_url: str, grpc_url: str, repository: Path, factor: int = OVERLOAD_FACTOR) -> Dict[str, object]:
    queue, instances = queue_bound(repository)
    image = SAMPLE_IMAGE.read_bytes()
    grpcclient.InferenceServerClient(grpc_url).infer(EVF_SAM.name, evf_sam_inputs(grpcclient, image, PROMPT.encode()))
    count = factor * queue
    with probes.ReadinessPoller(http_url) as readiness:
        started = time.perf_counter()
        results, probe_results = asyncio.run(_burst(grpc_url, image, count))
        burst_s = time.perf_counter() - started
        ready_after = probes.server_ready(http_url)
        sent = time.perf_counter()
        good = grpcclient.InferenceServerClient(grpc_url).infer(
            EVF_SAM.name, evf_sam_inputs(grpcclient, unique_jpeg(image, count), PROMPT.encode()))
        good_request_s = time.perf_counter() - sent
    kinds = Counter(kind for kind, _, _ in results)
    rejected = [seconds for kind, seconds, _ in results if kind == REJECTED]
    answered = [seconds for kind, seconds, _ in results if kind == ACCEPTED]
    return {
        "in_flight": count, "max_queue_size": queue, "front_instances": instances,
        "outcomes": dict(kinds),
        "rejection_status": sorted({status for kind, _, status in results if kind == REJECTED}),
        "rejection_latency_ms": _percentiles(rejected),
        "answered_latency_ms": _percentiles(answered),
        "probes": {"outcomes": dict(Counter(kind for kind, _, _ in probe_results)),
                   "rejection_latency_ms": _percentiles([s for kind, s, _ in probe_results if kind == REJECTED])},
        "burst_seconds": round(burst_s, 2),
        "ready_after": ready_after,
        "good_request_after": {"mask_shape": list(good.as_numpy("mask").shape), "seconds": round(good_request_s, 3)},
        "readiness": readiness.summary(),
    }


def _percentiles(seconds: List[float]) -> Dict[str, float]:
    if not seconds:
        return {}
    p50, p99 = np.percentile(seconds, [50, 99])
    return {"p50": round(p50 * 1000, 1), "p99": round(p99 * 1000, 1), "max": round(max(seconds) * 1000, 1)}
