"""The per-image feature cache both served models share: an LRU bounded by bytes, with claims.

Keys are sha256 digests of the encoded image bytes, so a wrong hit would need a SHA-256 collision.
The cache never computes anything itself.  A request that misses *claims* the key and computes the
features (decode, views, SAM encoder) in its own process; requests for the same key that arrive
meanwhile wait for that claim instead of computing again, and get the stored entry (a hit).  If the
owner gives up (bad image, cancelled, engine error, timeout) the claim is released and the next waiter
becomes the owner, so one failure never fails the other requests and never leaves them waiting.  A
claim older than `claim_timeout_s` is treated as given up (its owner died).

Claims are also the admission control of the image encoder: at most `max_claims` images are being
computed at once, and a request that would claim one more waits here, first come first served, until
a claim ends.  Its caller watches its own client meanwhile and withdraws when the client goes, so the
encoder's queue holds only work that can still be delivered (issue 11: abandoned work is dropped,
not computed).

Single-threaded by design: all methods run on the one asyncio event loop of the cache's Triton model.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict, deque
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
    def __init__(self, budget_bytes: int, claim_timeout_s: float = 600.0, max_claims: int = 0):
        if budget_bytes < 0:
            raise ValueError("cache budget must be >= 0 bytes")
        if max_claims < 0:
            raise ValueError("max_claims must be >= 0 (0: unbounded)")
        self.budget_bytes = budget_bytes
        self.claim_timeout_s = claim_timeout_s
        self.max_claims = max_claims
        self._entries: "OrderedDict[str, CachedImage]" = OrderedDict()
        self._claims: Dict[str, _Claim] = {}
        self._slot_waiters: "deque[asyncio.Future]" = deque()
        self._reserved = 0  # slots handed to woken waiters that have not claimed yet
        self.hits = self.misses = self.evictions = 0
        self.bytes = 0

    async def get(self, key: str, claim: bool) -> Tuple[str, Optional[CachedImage]]:
        """(HIT, entry), (CLAIMED, None): the caller must `put` or `release` the key, or (UNKNOWN,
        None) when `claim` is False and the key is neither cached nor being computed.  A claim waits
        while `max_claims` other images are being computed."""
        holds_slot = False
        while True:
            entry = self._lookup(key)
            if entry is not None:
                if holds_slot:
                    self._give_back_slot()
                self.hits += 1
                return HIT, entry
            pending = self._claims.get(key)
            if pending is not None and time.monotonic() - pending.started > self.claim_timeout_s:
                self.release(key)  # its owner never came back
                pending = None
            if pending is None:
                if not claim:
                    return UNKNOWN, None
                if not holds_slot and self._slots_full():
                    holds_slot = await self._wait_for_slot()
                    continue
                if holds_slot:
                    self._reserved -= 1
                self._claims[key] = _Claim(time.monotonic())
                self.misses += 1
                return CLAIMED, None
            if holds_slot:  # another request claimed this image meanwhile: wait for it, pass the slot on
                holds_slot = False
                self._give_back_slot()
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
        if pending is not None:
            self._wake_slot_waiter()

    def _slots_full(self) -> bool:
        if not self.max_claims:
            return False
        return bool(self._slot_waiters) or len(self._claims) + self._reserved >= self.max_claims

    async def _wait_for_slot(self) -> bool:
        """Wait (first come, first served) until a claim ends; True: a slot is reserved for the caller."""
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter), self._until_a_claim_expires())
                except asyncio.TimeoutError:
                    self._expire_abandoned_claims()
        except BaseException:
            if waiter.done():
                self._give_back_slot()  # woken, then torn down before it could claim
            else:
                waiter.cancel()
                self._slot_waiters.remove(waiter)
            raise

    def _until_a_claim_expires(self) -> float:
        if not self._claims:
            return self.claim_timeout_s
        oldest = min(c.started for c in self._claims.values())
        return max(0.01, self.claim_timeout_s - (time.monotonic() - oldest))

    def _expire_abandoned_claims(self) -> None:
        now = time.monotonic()
        for key, pending in list(self._claims.items()):
            if now - pending.started > self.claim_timeout_s:
                self.release(key)  # its owner never came back

    def _give_back_slot(self) -> None:
        self._reserved -= 1
        self._wake_slot_waiter()

    def _wake_slot_waiter(self) -> None:
        while self._slot_waiters and len(self._claims) + self._reserved < self.max_claims:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                self._reserved += 1
                waiter.set_result(True)

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

    @property
    def waiting_for_slot(self) -> int:
        return sum(not w.done() for w in self._slot_waiters)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries
