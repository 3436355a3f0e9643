"""The per-image feature cache both served models share: an LRU bounded by bytes, with claims.

Keys are sha256 digests of the encoded image bytes, so a wrong hit would need a SHA-256 collision.
The cache never computes anything itself.  A request that misses *claims* the key and computes the
features (decode, views, SAM encoder) in its own process; requests for the same key that arrive
meanwhile wait for that claim instead of computing again, and get the stored entry (a hit).  If the
owner gives up (bad image, cancelled, engine error, timeout) the claim is released and the next waiter
becomes the owner, so one failure never fails the other requests and never leaves them waiting.  A
claim older than `claim_timeout_s` is treated as given up (its owner died).

Single-threaded by design: all methods run on the one asyncio event loop of the cache's Triton model.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

HIT, CLAIMED, UNKNOWN = "hit", "claimed", "unknown"


def image_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class CachedImage:
    """What a prompt needs of an image: its features (by the image encoder's output names), the
    BEiT-3 view and the sizes for the mask postprocess."""

    features: Mapping[str, np.ndarray]  # e.g. {"image_embeddings": [1,256,64,64]}
    images_evf: np.ndarray  # [1, 3, 224, 224] float32
    original_size: Tuple[int, int]
    resized_size: Tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.features.values()) + self.images_evf.nbytes)


@dataclass
class _Claim:
    started: float
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FeatureCache:
    def __init__(self, budget_bytes: int, claim_timeout_s: float = 600.0):
        if budget_bytes < 0:
            raise ValueError("cache budget must be >= 0 bytes")
        self.budget_bytes = budget_bytes
        self.claim_timeout_s = claim_timeout_s
        self._entries: "OrderedDict[str, CachedImage]" = OrderedDict()
        self._claims: Dict[str, _Claim] = {}
        self.hits = self.misses = self.evictions = 0
        self.bytes = 0

    async def get(self, key: str, claim: bool) -> Tuple[str, Optional[CachedImage]]:
        """(HIT, entry), (CLAIMED, None): the caller must `put` or `release` the key, or (UNKNOWN,
        None) when `claim` is False and the key is neither cached nor being computed."""
        while True:
            entry = self._lookup(key)
            if entry is not None:
                self.hits += 1
                return HIT, entry
            pending = self._claims.get(key)
            if pending is not None and time.monotonic() - pending.started > self.claim_timeout_s:
                self.release(key)  # its owner never came back
                pending = None
            if pending is None:
                if not claim:
                    return UNKNOWN, None
                self._claims[key] = _Claim(time.monotonic())
                self.misses += 1
                return CLAIMED, None
            computed = await self._wait(pending)
            if computed is not None:  # also when the entry was too large to keep
                self.hits += 1
                return HIT, computed

    def put(self, key: str, entry: CachedImage) -> None:
        """Store the entry of a claimed key and hand it to the requests waiting for it."""
        self._store(key, entry)
        self._resolve(key, entry)

    def release(self, key: str) -> None:
        """The owner of a claim gave up: the next waiter becomes the owner."""
        self._resolve(key, None)

    async def _wait(self, pending: _Claim) -> Optional[CachedImage]:
        remaining = self.claim_timeout_s - (time.monotonic() - pending.started)
        try:
            return await asyncio.wait_for(asyncio.shield(pending.done), max(0.0, remaining))
        except asyncio.TimeoutError:
            return None

    def _resolve(self, key: str, entry: Optional[CachedImage]) -> None:
        pending = self._claims.pop(key, None)
        if pending is not None and not pending.done.done():
            pending.done.set_result(entry)

    def _lookup(self, key: str) -> Optional[CachedImage]:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def _store(self, key: str, entry: CachedImage) -> None:
        if key in self._entries:
            self.bytes -= self._entries.pop(key).nbytes
        if entry.nbytes > self.budget_bytes:
            return  # larger than the whole budget: served to its owner, kept by nobody
        while self.bytes + entry.nbytes > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
            self.evictions += 1
        self._entries[key] = entry
        self.bytes += entry.nbytes

    @property
    def claims_in_flight(self) -> int:
        return len(self._claims)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries
