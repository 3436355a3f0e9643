"""Resident memory of tritonserver and of every python-backend stub over time, and its growth."""
from __future__ import annotations

import statistics
import threading
import time
from typing import Dict, List, Optional

from serving import processes

SERVER_LABEL = "tritonserver"
# The server's RSS by kind (processes.RSS_KINDS) and the RAM its stubs' shared-memory regions hold.
SERVER_KINDS = ("anon", "file", "shmem", "shm_regions")
MIB = 1024**2


class RssSampler:
    """Samples VmRSS of the server process and of each of its stubs (by model instance) every
    `interval_s` in a thread.  A process missing from a sample (died) is recorded as None.

    The server's RSS is also split by kind (private, file, shared), beside the RAM its stubs' /dev/shm
    regions hold: tritonserver touches those regions to pass every tensor, so they count in its RSS as
    they grow to their peaks, which is not a leak of the server's own memory."""

    def __init__(self, server_pid: int, interval_s: float = 5.0):
        self.server_pid = server_pid
        self.interval_s = interval_s
        self.times: List[float] = []
        self.series: Dict[str, List[Optional[float]]] = {}
        self.pids: Dict[str, int] = {}
        self.server_kinds: Dict[str, List[Optional[float]]] = {kind: [] for kind in SERVER_KINDS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = 0.0

    def __enter__(self) -> "RssSampler":
        self._started = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        found = {SERVER_LABEL: self.server_pid, **processes.stub_processes(self.server_pid)}
        values = {label: processes.rss_bytes(pid) for label, pid in found.items()}
        index = len(self.times)
        self.times.append(round(time.monotonic() - self._started, 1))
        for label, value in values.items():
            self.pids.setdefault(label, found[label])
            self.series.setdefault(label, [None] * index)
        for label, column in self.series.items():
            value = values.get(label)
            column.append(_mib(value))
        kinds = processes.rss_kinds_bytes(self.server_pid) or {}
        kinds["shm_regions"] = processes.shm_regions_bytes(self.server_pid)
        for kind, column in self.server_kinds.items():
            column.append(_mib(kinds.get(kind)))

    def to_dict(self) -> Dict[str, object]:
        return {"interval_s": self.interval_s, "t_s": self.times, "rss_mib": self.series, "pids": self.pids,
                "server_kinds_mib": self.server_kinds}


def _mib(value: Optional[int]) -> Optional[float]:
    return None if value is None else round(value / MIB, 1)


def growth(times: List[float], series: Dict[str, List[Optional[float]]], warmup_s: float,
           window_fraction: float = 0.1) -> Dict[str, Dict[str, Optional[float]]]:
    """Per process (and in total): median RSS of the first window after the warm-up, of the last window,
    and their difference, in MiB.  A process that vanished has None for `end`."""
    after = [i for i, t in enumerate(times) if t >= warmup_s]
    if len(after) < 2:
        return {}
    width = max(1, int(len(after) * window_fraction))
    first, last = after[:width], after[-width:]
    result = {}
    for label, column in series.items():
        result[label] = _window_growth(column, first, last)
    totals = [sum(v for v in (series[label][i] for label in series) if v is not None) for i in range(len(times))]
    result["total"] = _window_growth(totals, first, last)
    return result


def _window_growth(column: List[Optional[float]], first: List[int], last: List[int]) -> Dict[str, Optional[float]]:
    start = [column[i] for i in first if column[i] is not None]
    end = [column[i] for i in last if column[i] is not None]
    start_mib = statistics.median(start) if start else None
    end_mib = statistics.median(end) if end else None
    peak = max((v for v in column if v is not None), default=None)
    delta = None if start_mib is None or end_mib is None else round(end_mib - start_mib, 1)
    return {"after_warmup_mib": start_mib, "end_mib": end_mib, "growth_mib": delta, "peak_mib": peak}
