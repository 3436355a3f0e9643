"""An LRU cache of per-image state (SAM embeddings + BEiT-3 view + sizes) bounded by bytes.

Keys are sha256 digests of the encoded image bytes, so a wrong hit would need a SHA-256 collision.
Thread-safe; concurrent requests for the same missing key compute it once: the first caller computes,
the others wait for it and then read the stored entry (or compute themselves if it failed).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np


def image_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class CachedImage:
    embeddings: np.ndarray  # [1, 256, 64, 64] float32
    images_evf: np.ndarray  # [1, 3, 224, 224] float32
    original_size: Tuple[int, int]
    resized_size: Tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.embeddings.nbytes + self.images_evf.nbytes)


class EmbeddingCache:
    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError("cache budget must be >= 0 bytes")
        self.budget_bytes = budget_bytes
        self._entries: "OrderedDict[str, CachedImage]" = OrderedDict()
        self._in_flight: Dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.bytes = 0

    def get(self, key: str) -> Optional[CachedImage]:
        """The entry for `key` (a hit) or None (a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            self._count(entry is not None)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def get_or_compute(self, key: str, compute: Callable[[], CachedImage]) -> Tuple[CachedImage, bool]:
        """(entry, was_hit); `compute` runs at most once at a time per key."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._count(hit=True)
                    return entry, True
                waiter = self._in_flight.get(key)
                if waiter is None:
                    self._in_flight[key] = threading.Event()
                    self._count(hit=False)
                    break
            waiter.wait()
        try:
            entry = compute()
            self._store(key, entry)
            return entry, False
        finally:
            with self._lock:
                self._in_flight.pop(key).set()

    def _store(self, key: str, entry: CachedImage) -> None:
        with self._lock:
            if entry.nbytes > self.budget_bytes:
                return  # larger than the whole budget: serve it, keep nothing
            while self.bytes + entry.nbytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.bytes += entry.nbytes

    def _count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries
