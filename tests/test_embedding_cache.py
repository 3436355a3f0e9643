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


def test_claims_beyond_the_encoder_slots_wait_first_come_first_served():
    """max_claims=1: one image is computed at a time; the next claims are granted in arrival order, each
    only when the previous owner has put or released its image; requests for a cached image never wait."""
    async def scenario():
        cache = FeatureCache(budget_bytes=10**6, max_claims=1)
        await fill(cache, "cached", 1.0)
        assert (await cache.get("a", claim=True))[0] == CLAIMED
        b = asyncio.ensure_future(cache.get("b", claim=True))
        c = asyncio.ensure_future(cache.get("c", claim=True))
        await asyncio.sleep(0.01)
        assert not b.done() and not c.done() and cache.waiting_for_slot == 2
        assert (await asyncio.wait_for(cache.get("cached", claim=True), 0.5))[0] == HIT
        late = asyncio.ensure_future(cache.get("d", claim=True))  # arrives after b and c: never barges in
        cache.put("a", entry(2.0))
        assert (await asyncio.wait_for(b, 0.5))[0] == CLAIMED
        await asyncio.sleep(0.01)
        assert not c.done() and not late.done() and cache.claims_in_flight == 1
        cache.release("b")
        assert (await asyncio.wait_for(c, 0.5))[0] == CLAIMED and not late.done()
        cache.put("c", entry(3.0))
        assert (await asyncio.wait_for(late, 0.5))[0] == CLAIMED

    run(scenario())


def test_a_withdrawn_slot_waiter_hands_its_turn_on():
    """A waiting claim whose caller is torn down (its client went) is forgotten; the next one is served."""
    async def scenario():
        cache = FeatureCache(budget_bytes=10**6, max_claims=1)
        assert (await cache.get("a", claim=True))[0] == CLAIMED
        gone = asyncio.ensure_future(cache.get("gone", claim=True))
        after = asyncio.ensure_future(cache.get("after", claim=True))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        assert cache.waiting_for_slot == 1
        cache.put("a", entry(1.0))
        assert (await asyncio.wait_for(after, 0.5))[0] == CLAIMED and cache.claims_in_flight == 1

    run(scenario())


def test_a_slot_waiter_for_an_image_being_computed_gets_the_hit():
    """Two requests for one new image while the slots are taken: the first to get a slot computes it,
    the other waits for that claim (and frees its slot for a third image) and gets the hit."""
    async def scenario():
        cache = FeatureCache(budget_bytes=10**6, max_claims=1)
        assert (await cache.get("busy", claim=True))[0] == CLAIMED
        first = asyncio.ensure_future(cache.get("img", claim=True))
        second = asyncio.ensure_future(cache.get("img", claim=True))
        third = asyncio.ensure_future(cache.get("other", claim=True))
        await asyncio.sleep(0.01)
        cache.put("busy", entry(0.0))
        assert (await asyncio.wait_for(first, 0.5))[0] == CLAIMED
        cache.put("img", entry(5.0))
        status, found = await asyncio.wait_for(second, 0.5)
        assert status == HIT and found.features["image_embeddings"][0, 0] == 5.0
        assert (await asyncio.wait_for(third, 0.5))[0] == CLAIMED and cache.claims_in_flight == 1

    run(scenario())


def test_a_dead_owner_does_not_hold_an_encoder_slot_forever():
    async def scenario():
        cache = FeatureCache(budget_bytes=10**6, claim_timeout_s=0.1, max_claims=1)
        assert (await cache.get("dead", claim=True))[0] == CLAIMED  # its owner never puts nor releases
        status, _ = await asyncio.wait_for(cache.get("next", claim=True), 2.0)
        assert status == CLAIMED and cache.claims_in_flight == 1

    run(scenario())
