"""Both Index implementations pass the same tests (Redis: a real server process)."""

import asyncio
import itertools

import pytest
import xxhash

from services.kvstore.memory_index import MemoryIndex
from services.kvstore.redis_index import RedisIndex
from tandem.ids import PodId

NS = "model-a"
A, B = PodId("pod-a"), PodId("pod-b")
_prefixes = itertools.count()


def h(i: int) -> bytes:
    return xxhash.xxh3_128_digest(str(i).encode())


@pytest.fixture(params=["memory", "redis"])
def make_index(request, redis_server):
    """Factory: capacity -> a fresh, empty index of the parametrized kind."""
    clients = []

    def make(capacity: int = 100):
        if request.param == "memory":
            return MemoryIndex(capacity)
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_server.url)
        clients.append(client)
        return RedisIndex(client, capacity=capacity, prefix=f"test{next(_prefixes)}")

    make.clients = clients
    return make


def run(coro, make_index=None):
    async def wrapper():
        try:
            return await coro
        finally:  # close Redis connections on the loop that opened them
            for client in getattr(make_index, "clients", ()):
                await client.aclose()

    return asyncio.run(wrapper())


def test_longest_prefix_per_pod(make_index):
    async def go():
        index = make_index()
        await index.heartbeat(A, "a1", 60, 0)
        await index.heartbeat(B, "b1", 60, 0)
        await index.add(NS, A, "a1", [h(1), h(2), h(3)], 1)
        await index.add(NS, B, "b1", [h(1), h(2), h(3), h(4), h(5)], 1)
        assert await index.lookup(NS, [h(i) for i in range(1, 7)], 2) == {A: 3, B: 5}
        assert await index.lookup(NS, [h(9), h(1)], 2) == {}
        assert await index.lookup(NS, [h(1)], 2) == {A: 1, B: 1}
        assert await index.lookup("other-model", [h(1), h(2)], 2) == {}
    run(go(), make_index)


def test_lookup_stops_at_the_first_gap(make_index):
    async def go():
        index = make_index()
        await index.heartbeat(A, "a1", 60, 0)
        await index.add(NS, A, "a1", [h(1), h(2), h(4)], 1)
        assert await index.lookup(NS, [h(1), h(2), h(3), h(4)], 2) == {A: 2}
    run(go(), make_index)


def test_exact_lru_eviction_order(make_index):
    async def go():
        index = make_index(capacity=4)
        await index.heartbeat(A, "a1", 60, 0)
        await index.add(NS, A, "a1", [h(1), h(2)], 1)  # recency: h2 < h1
        await index.add(NS, A, "a1", [h(3), h(4)], 1)  # h2 < h1 < h4 < h3
        assert await index.lookup(NS, [h(1)], 2) == {A: 1}  # h2 < h4 < h3 < h1
        await index.add(NS, A, "a1", [h(5)], 3)  # evicts h2
        assert (await index.stats(3)).num_entries == 4 and (await index.stats(3)).evictions == 1
        await index.add(NS, A, "a1", [h(6), h(7)], 4)  # evicts h4, h3
        stats = await index.stats(4)
        assert (stats.num_entries, stats.evictions) == (4, 3)
        present = {i for i in range(1, 8) if await index.lookup(NS, [h(i)], 5)}
        assert present == {1, 5, 6, 7}
    run(go(), make_index)


def test_a_chains_head_outlives_its_tail(make_index):
    async def go():
        index = make_index(capacity=3)
        await index.heartbeat(A, "a1", 60, 0)
        await index.add(NS, A, "a1", [h(1), h(2), h(3)], 1)
        await index.add(NS, A, "a1", [h(9)], 2)  # evicts the deepest block, h3
        assert await index.lookup(NS, [h(1), h(2), h(3)], 3) == {A: 2}
    run(go(), make_index)


def test_lease_expiry(make_index):
    async def go():
        index = make_index()
        await index.heartbeat(A, "a1", 10, 0)
        await index.add(NS, A, "a1", [h(1)], 1)
        assert await index.lookup(NS, [h(1)], 5) == {A: 1}
        assert await index.lookup(NS, [h(1)], 11) == {}  # silent pod: stops counting at once
        assert (await index.stats(11)).live_pods == 0
        assert (await index.heartbeat(A, "a1", 10, 12)).known
        assert await index.lookup(NS, [h(1)], 13) == {A: 1}
    run(go(), make_index)


def test_restart_fences_the_old_incarnation(make_index):
    async def go():
        index = make_index()
        assert not (await index.heartbeat(A, "a1", 60, 0)).known
        await index.add(NS, A, "a1", [h(1), h(2)], 1)
        assert not (await index.heartbeat(A, "a2", 60, 2)).known  # the pod restarted
        assert await index.lookup(NS, [h(1), h(2)], 3) == {}
        assert not await index.add(NS, A, "a1", [h(3)], 3)  # late events of the old process
        assert not await index.remove(NS, A, "a1", [h(1)])
        assert not await index.clear_pod(A, "a1")
        assert await index.add(NS, A, "a2", [h(1)], 4)
        assert await index.lookup(NS, [h(1), h(2)], 5) == {A: 1}
    run(go(), make_index)


def test_clear_and_remove(make_index):
    async def go():
        index = make_index()
        await index.heartbeat(A, "a1", 60, 0)
        await index.heartbeat(B, "b1", 60, 0)
        await index.add(NS, A, "a1", [h(1), h(2), h(3)], 1)
        await index.add(NS, B, "b1", [h(1), h(2)], 1)
        assert await index.remove(NS, A, "a1", [h(2)])
        assert await index.lookup(NS, [h(1), h(2), h(3)], 2) == {A: 1, B: 2}
        assert await index.clear_pod(A, "a1")
        assert await index.lookup(NS, [h(1), h(2), h(3)], 2) == {B: 2}
        await index.add(NS, A, "a1", [h(1)], 3)  # after a clear, new entries count again
        assert await index.lookup(NS, [h(1)], 3) == {A: 1, B: 1}
    run(go(), make_index)


def test_sweep_removes_only_dead_entries(make_index):
    async def go():
        index = make_index()
        await index.heartbeat(A, "a1", 60, 0)
        await index.heartbeat(B, "b1", 60, 0)
        await index.add(NS, A, "a1", [h(1), h(2)], 1)
        await index.add(NS, B, "b1", [h(2), h(3)], 1)
        await index.heartbeat(A, "a2", 60, 2)  # a's entries are dead now
        assert await index.sweep(3, 100) == 1  # h1 had only a; h2 keeps b
        assert (await index.stats(3)).num_entries == 2
        assert await index.lookup(NS, [h(2), h(3)], 3) == {B: 2}
    run(go(), make_index)


def test_stats_count_lookups_and_hit_blocks(make_index):
    async def go():
        index = make_index()
        await index.heartbeat(A, "a1", 60, 0)
        await index.add(NS, A, "a1", [h(1), h(2)], 1)
        await index.lookup(NS, [h(1), h(2), h(3)], 2)
        await index.lookup(NS, [h(7)], 2)
        stats = await index.stats(2)
        assert (stats.lookups, stats.hit_blocks, stats.live_pods, stats.capacity) == (2, 2, 1, 100)
    run(go(), make_index)
