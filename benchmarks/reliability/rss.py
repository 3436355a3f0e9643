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
    """Samples the resident memory of the server process and of each of its stubs (by model instance)
    every `interval_s` in a thread: VmRSS, and its private part (RssAnon).  A process missing from a
    sample (died) is recorded as None.

    VmRSS overstates what the python backend's shared memory costs: each stub's /dev/shm region is
    mapped again, whole, each time it grows, earlier mappings kept, and a page counts once per mapping
    that touched it (processes.shm_region_mappings).  So the server's RSS is also split by kind, beside
    the RAM its stubs' regions really hold (counted once, as the container's memory cgroup does)."""

    def __init__(self, server_pid: int, interval_s: float = 5.0):
        self.server_pid = server_pid
        self.interval_s = interval_s
        self.times: List[float] = []
        self.series: Dict[str, List[Optional[float]]] = {}
        self.private: Dict[str, List[Optional[float]]] = {}
        self.pids: Dict[str, int] = {}
        self.server_kinds: Dict[str, List[Optional[float]]] = {kind: [] for kind in SERVER_KINDS}
        self.server_region_mappings: List[Optional[int]] = []
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
        kinds = {label: processes.rss_kinds_bytes(pid) for label, pid in found.items()}
        index = len(self.times)
        self.times.append(round(time.monotonic() - self._started, 1))
        for label, value in kinds.items():
            self.pids.setdefault(label, found[label])
            self.series.setdefault(label, [None] * index)
            self.private.setdefault(label, [None] * index)
        for label in self.series:
            value = kinds.get(label)
            self.series[label].append(None if value is None else _mib(sum(value.values())))
            self.private[label].append(None if value is None else _mib(value["anon"]))
        server = dict(kinds.get(SERVER_LABEL) or {})
        server["shm_regions"] = processes.shm_regions_bytes(self.server_pid)
        for kind, column in self.server_kinds.items():
            column.append(_mib(server.get(kind)))
        self.server_region_mappings.append(processes.shm_region_mappings(self.server_pid))

    def to_dict(self) -> Dict[str, object]:
        return {"interval_s": self.interval_s, "t_s": self.times, "rss_mib": self.series,
                "private_mib": self.private, "pids": self.pids,
                "server_kinds_mib": self.server_kinds, "server_region_mappings": self.server_region_mappings}


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
