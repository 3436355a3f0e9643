"""What the server says about itself: readiness (polled in the background), per-model statistics,
failure counts by reason and the served models' own counters."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

from evfsam.specs import PIPELINE_FINISHED_METRIC, PIPELINE_STARTED_METRIC
from serving import metrics

FAILURE_METRIC = "nv_inference_request_failure"
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


def http_status(url: str, timeout: float = 2.0) -> Optional[int]:
    """The HTTP status of a GET, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def server_ready(http_url: str) -> bool:
    return http_status(f"http://{http_url}/v2/health/ready") == 200


def model_ready(http_url: str, model: str) -> bool:
    return http_status(f"http://{http_url}/v2/models/{model}/ready") == 200


@dataclass
class ModelCounts:
    """One model's cumulative statistics (Triton's statistics extension)."""

    inference_count: int = 0  # requests executed (batch rows)
    execution_count: int = 0  # executions (batches)
    success: int = 0
    fail: int = 0
    batch_sizes: Dict[int, int] = field(default_factory=dict)  # batch size -> executions

    def minus(self, earlier: "ModelCounts") -> "ModelCounts":
        sizes = {size: count - earlier.batch_sizes.get(size, 0) for size, count in self.batch_sizes.items()}
        return ModelCounts(self.inference_count - earlier.inference_count, self.execution_count - earlier.execution_count,
                           self.success - earlier.success, self.fail - earlier.fail,
                           {size: count for size, count in sizes.items() if count})

    def to_dict(self) -> Dict[str, object]:
        return {"inference_count": self.inference_count, "execution_count": self.execution_count,
                "success": self.success, "fail": self.fail,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


def model_counts(http_url: str, model: str) -> ModelCounts:
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    inference = stats.get("inference_stats", {})
    return ModelCounts(
        inference_count=int(stats.get("inference_count", 0)),
        execution_count=int(stats.get("execution_count", 0)),
        success=int(inference.get("success", {}).get("count", 0)),
        fail=int(inference.get("fail", {}).get("count", 0)),
        batch_sizes={int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])},
    )


def all_counts(http_url: str, models: Iterable[str]) -> Dict[str, ModelCounts]:
    return {model: model_counts(http_url, model) for model in models}


def counter_snapshot(metrics_url: str, models: Iterable[str]) -> Dict[str, Dict[str, float]]:
    """Per model: failures by reason (Triton) and, for the served models, requests started / finished."""
    samples = metrics.scrape(metrics_url)
    snapshot = {}
    for model in models:
        row = {reason: metrics.total(samples, FAILURE_METRIC, model=model, reason=reason) for reason in FAILURE_REASONS}
        row["started"] = metrics.total(samples, PIPELINE_STARTED_METRIC, model=model)
        row["finished"] = metrics.total(samples, PIPELINE_FINISHED_METRIC, model=model)
        snapshot[model] = row
    return snapshot


def counter_delta(after: Dict[str, Dict[str, float]], before: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, int]]:
    return {model: {key: int(value - before[model][key]) for key, value in row.items()} for model, row in after.items()}


class ReadinessPoller:
    """Polls /v2/health/ready in a thread; counts answers that were not 200 and when they happened."""

    def __init__(self, http_url: str, interval_s: float = 0.25):
        self.url = f"http://{http_url}/v2/health/ready"
        self.interval_s = interval_s
        self.polls = 0
        self.not_ready: List[Dict[str, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = 0.0

    def __enter__(self) -> "ReadinessPoller":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            status = http_status(self.url)
            self.polls += 1
            if status != 200:
                self.not_ready.append({"t_s": round(time.monotonic() - self._started, 2), "status": status})
            self._stop.wait(self.interval_s)

    def summary(self) -> Dict[str, object]:
        return {"polls": self.polls, "not_ready": len(self.not_ready), "first_not_ready": self.not_ready[:5]}
