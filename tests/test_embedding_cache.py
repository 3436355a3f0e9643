"""The image-embedding cache on its own: LRU under a byte budget, compute-once under concurrency."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from evfsam.embedding_cache import CachedImage, EmbeddingCache, image_key


def entry(value: float, size: int = 1000) -> CachedImage:
    return CachedImage(np.full((1, size), value, np.float32), np.zeros((1, 0), np.float32), (10, 20), (5, 10))


def test_lru_eviction_under_byte_budget():
    cache = EmbeddingCache(budget_bytes=3 * 4000)
    for name in "abc":
        cache.get_or_compute(name, lambda n=name: entry(ord(n)))
    assert cache.get("a") is not None  # a becomes most recent
    cache.get_or_compute("d", lambda: entry(4))  # evicts b, the least recently used
    assert "b" not in cache and all(k in cache for k in "acd")
    assert cache.evictions == 1 and cache.bytes == 3 * 4000 and len(cache) == 3


def test_hits_misses_and_values():
    cache = EmbeddingCache(budget_bytes=10**6)
    first, hit = cache.get_or_compute("k", lambda: entry(1.0))
    again, hit_again = cache.get_or_compute("k", lambda: pytest.fail("must not recompute"))
    assert (hit, hit_again) == (False, True) and again is first
    assert cache.get("missing") is None
    assert (cache.hits, cache.misses) == (1, 2)


def test_entry_larger_than_budget_is_served_not_kept():
    cache = EmbeddingCache(budget_bytes=100)
    value, hit = cache.get_or_compute("big", lambda: entry(1.0))
    assert not hit and value.embeddings.shape == (1, 1000) and "big" not in cache and cache.bytes == 0


def test_concurrent_requests_for_one_new_image_compute_once():
    cache = EmbeddingCache(budget_bytes=10**6)
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.2)
        return entry(7.0)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("same", compute))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sum(1 for _, hit in results if not hit) == 1
    assert all(np.array_equal(r.embeddings, results[0][0].embeddings) for r, _ in results)


def test_failed_compute_lets_a_waiter_retry():
    cache = EmbeddingCache(budget_bytes=10**6)
    attempts = []

    def flaky():
        attempts.append(1)
        time.sleep(0.1)
        if len(attempts) == 1:
            raise RuntimeError("engine down")
        return entry(3.0)

    outcomes = []

    def call():
        try:
            outcomes.append(cache.get_or_compute("x", flaky)[0])
        except RuntimeError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(o, RuntimeError) for o in outcomes) == 1
    assert len(attempts) == 2 and "x" in cache


def test_key_is_sha256_of_bytes():
    assert image_key(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
