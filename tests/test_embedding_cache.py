"""The image-feature cache on its own: LRU under a byte budget, claims, one computation per image."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from evfsam.embedding_cache import CLAIMED, HIT, UNKNOWN, CachedImage, FeatureCache, image_key


def entry(value: float, size: int = 1000) -> CachedImage:
    return CachedImage({"image_embeddings": np.full((1, size), value, np.float32)}, np.zeros((1, 0), np.float32),
                       (10, 20), (5, 10))


def run(coroutine):
    return asyncio.run(coroutine)


async def fill(cache: FeatureCache, key: str, value: float) -> None:
    status, _ = await cache.get(key, claim=True)
    assert status == CLAIMED
    cache.put(key, entry(value))


def test_lru_eviction_under_byte_budget():
    async def scenario():
        cache = FeatureCache(budget_bytes=3 * 4000)
        for name in "abc":
            await fill(cache, name, ord(name))
        assert (await cache.get("a", claim=False))[0] == HIT  # a becomes most recent
        await fill(cache, "d", 4)  # evicts b, the least recently used
        assert "b" not in cache and all(k in cache for k in "acd")
        assert cache.evictions == 1 and cache.bytes == 3 * 4000 and len(cache) == 3

    run(scenario())


def test_hits_misses_unknown_and_values():
    async def scenario():
        cache = FeatureCache(budget_bytes=10**6)
        assert await cache.get("k", claim=False) == (UNKNOWN, None)  # a key alone never claims
        await fill(cache, "k", 1.0)
        status, found = await cache.get("k", claim=True)
        assert status == HIT and found.features["image_embeddings"][0, 0] == 1.0
        assert (cache.hits, cache.misses) == (1, 1)

    run(scenario())


def test_entry_larger_than_budget_reaches_waiters_but_is_not_kept():
    async def scenario():
        cache = FeatureCache(budget_bytes=100)
        assert (await cache.get("big", claim=True))[0] == CLAIMED
        waiter = asyncio.ensure_future(cache.get("big", claim=True))
        await asyncio.sleep(0)
        cache.put("big", entry(1.0))
        status, found = await waiter
        assert status == HIT and found.features["image_embeddings"].shape == (1, 1000)
        assert "big" not in cache and cache.bytes == 0

    run(scenario())


def test_concurrent_requests_for_one_new_image_compute_once():
    async def scenario():
        cache = FeatureCache(budget_bytes=10**6)
        computed = []

        async def request():
            status, found = await cache.get("img", claim=True)
            if status == CLAIMED:
                computed.append(1)
                await asyncio.sleep(0.05)
                cache.put("img", entry(7.0))
                return entry(7.0)
            return found

        results = await asyncio.gather(*(request() for _ in range(6)))
        assert len(computed) == 1 and all(r.features["image_embeddings"][0, 0] == 7.0 for r in results)
        assert (cache.misses, cache.hits) == (1, 5)

    run(scenario())


def test_a_released_claim_passes_to_the_next_waiter():
    """The owner fails (a bad image, a cancelled client): one waiter takes over, the others still wait."""
    async def scenario():
        cache = FeatureCache(budget_bytes=10**6)
        assert (await cache.get("img", claim=True))[0] == CLAIMED
        waiters = [asyncio.ensure_future(cache.get("img", claim=True)) for _ in range(3)]
        await asyncio.sleep(0)
        cache.release("img")
        done, pending = await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.05)  # the others had their chance to wake, too
        assert [w.result()[0] for w in waiters if w.done()] == [CLAIMED]  # exactly one new owner
        cache.put("img", entry(2.0))
        results = await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
        assert sorted(status for status, _ in results) == [CLAIMED, HIT, HIT]

    run(scenario())


def test_a_claim_whose_owner_never_returns_expires():
    async def scenario():
        cache = FeatureCache(budget_bytes=10**6, claim_timeout_s=0.05)
        assert (await cache.get("img", claim=True))[0] == CLAIMED  # and the owner disappears
        status, _ = await asyncio.wait_for(cache.get("img", claim=True), 2.0)
        assert status == CLAIMED and cache.claims_in_flight == 1

    run(scenario())


def test_image_key_is_sha256_hex():
    assert image_key(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_negative_budget_is_refused():
    with pytest.raises(ValueError, match=">= 0 bytes"):
        FeatureCache(-1)
