"""Latency statistics and the ratios the summary reports."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class LatencyStats:
    """Latencies in milliseconds; throughput in items per second (one stream, back to back)."""

    count: int
    min_ms: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float

    @classmethod
    def from_seconds(cls, samples: Sequence[float], items_per_call: int = 1) -> "LatencyStats":
        if len(samples) == 0:
            raise ValueError("no latency samples")
        ms = np.asarray(samples, dtype=np.float64) * 1000.0
        p50, p90, p95, p99 = np.percentile(ms, PERCENTILES)
        return cls(
            count=len(ms),
            min_ms=float(ms.min()),
            mean_ms=float(ms.mean()),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p95_ms=float(p95),
            p99_ms=float(p99),
            throughput=float(items_per_call * 1000.0 / ms.mean()),
        )

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """value / reference, or None when either is missing or the reference is zero."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def speedup(latency_ms: Optional[float], reference_ms: Optional[float]) -> Optional[float]:
    """How many times faster than the reference: reference latency / latency."""
    return ratio(reference_ms, latency_ms)
