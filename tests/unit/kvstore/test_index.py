"""Both Index implementations pass the same tests (Redis: a real server process)."""

import asyncio
import itertools

import pytest
import xxhash

from services.kvstore.index import Registration
from services.kvstore.memory_index import MemoryIndex
from services.kvstore.redis_index import RedisIndex
from tandem.api.ids import PodId

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


async def footprint(index) -> tuple[list[str], int, int]:
    """Per-pod state: (pods with a record, generations with a block set, retired generations
    queued)."""
    if isinstance(index, MemoryIndex):
        return sorted(index._pods), len(index._held), len(index._dead)
    r, P = index.client, index.root
    pods = sorted(p.decode() for p in await r.hkeys(f"{P}:pods"))
    assert pods == sorted(p.decode() for p in await r.zrange(f"{P}:leases", 0, -1))
    held = [k async for k in r.scan_iter(match=f"{P}:g:*")]
    assert await r.llen(f"{P}:dead") == (await index.stats(0)).retired_generations
    return pods, len(held), await r.llen(f"{P}:dead")


async def held_members(index) -> int:
    """Members of every generation's block set, retired ones included."""
    if isinstance(index, MemoryIndex):
        return sum(len(keys) for keys in index._held.values())
    r = index.client
    return sum([await r.scard(k) async for k in r.scan_iter(match=f"{index.root}:g:*")])


L, D = PodId("pod-live"), PodId("10.0.0.7:50051")  # pod ids are addresses: ":" in them


@pytest.mark.parametrize("death", ["lease_expired", "restarted", "cleared"])
def test_sweep_drains_dead_entries_behind_older_live_ones(make_index, death):
    """The sweep finds a dead pod's entries wherever they sit in LRU order, in bounded batches."""

    async def go():
        index = make_index()
        await index.heartbeat(L, "l1", 600, 0)
        await index.heartbeat(D, "d1", 10, 0)
        await index.add(NS, L, "l1", [h(i) for i in range(10, 20)], 1)  # the least recently used
        await index.add(NS, D, "d1", [h(i) for i in range(30, 35)], 2)
        await index.add(NS, D, "d1", [h(10)], 2)  # shared with the live pod
        now = 5
        if death == "lease_expired":
            now = 50
        elif death == "restarted":
            await index.heartbeat(D, "d2", 600, 3)
        else:
            await index.clear_pod(D, "d1")
        removed = [await index.sweep(now, 2) for _ in range(4)]
        # Six dead holdings (h10 stays, held by the live pod), two examined per sweep, in any order.
        assert sum(removed) == 5 and max(removed) <= 2 and removed[3] == 0
        assert (await index.stats(now)).num_entries == 10
        assert await index.lookup(NS, [h(i) for i in range(10, 20)], now) == {L: 10}
        pods = [L] if death == "lease_expired" else [L, D]
        assert await footprint(index) == (
            sorted(pods),
            1,
            0,
        )  # only the live generation's block set
        if death == "lease_expired":  # the pod comes back: it must resend its cache
            assert not (await index.heartbeat(D, "d1", 10, now)).known

    run(go(), make_index)


def test_a_drained_generation_is_never_reused(make_index):
    """A pod that re-registers mid-drain gets a new generation: its new entries survive the
    drain."""

    async def go():
        index = make_index()
        await index.heartbeat(D, "d1", 10, 0)
        await index.add(NS, D, "d1", [h(i) for i in range(5)], 1)
        assert await index.sweep(20, 2) == 2  # lease expired: retired, two entries gone
        assert not (await index.heartbeat(D, "d1", 10, 20)).known  # same process, back: it resyncs
        assert await index.add(NS, D, "d1", [h(i) for i in range(5)], 20)
        assert [await index.sweep(21, 2) for _ in range(3)] == [
            0,
            0,
            0,
        ]  # the three the drain skips
        assert await index.lookup(NS, [h(i) for i in range(5)], 21) == {D: 5}
        assert await footprint(index) == ([D], 1, 0)

    run(go(), make_index)


def test_eviction_and_removal_keep_the_generation_block_sets_exact(make_index):
    async def go():
        index = make_index(capacity=2)
        await index.heartbeat(A, "a1", 60, 0)
        await index.add(NS, A, "a1", [h(1), h(2), h(3)], 1)  # evicts h3
        assert await index.remove(NS, A, "a1", [h(1), h(2)])
        assert await footprint(index) == ([A], 0, 0)

    run(go(), make_index)


def test_a_late_heartbeat_of_an_old_incarnation_is_refused(make_index):
    """Incarnations are ordered: the newer process keeps the pod while its lease is alive."""

    async def go():
        index = make_index()
        await index.heartbeat(A, "a1", 60, 0)
        await index.add(NS, A, "a1", [h(1)], 1)
        assert (await index.heartbeat(A, "a2", 60, 2)) == Registration(
            known=False, superseded=False
        )
        await index.add(NS, A, "a2", [h(2)], 2)
        assert (await index.heartbeat(A, "a1", 60, 3)) == Registration(known=False, superseded=True)
        assert not await index.add(NS, A, "a1", [h(3)], 4)  # the old process's events stay ignored
        assert await index.add(NS, A, "a2", [h(4)], 4)
        assert await index.lookup(NS, [h(2)], 5) == {A: 1}
        assert await index.lookup(NS, [h(1)], 5) == {}
        assert (await index.heartbeat(A, "a2", 60, 5)).known
        # Once the newer incarnation's lease lapsed (that process is gone), the older may take over.
        assert (await index.heartbeat(A, "a1", 60, 70)) == Registration(
            known=False, superseded=False
        )
        assert await index.add(NS, A, "a1", [h(5)], 71)
        assert await index.lookup(NS, [h(5)], 72) == {A: 1}

    run(go(), make_index)


@pytest.mark.parametrize("how", ["cleared", "restarted"])
def test_a_resync_moves_blocks_out_of_the_retired_generation(make_index, how):
    """A pod that resyncs often cannot outrun the drain: its retired sets lose what it stores
    again."""

    async def go():
        index = make_index()
        blocks = [h(i) for i in range(10)]
        await index.heartbeat(A, "a0", 60, 0)
        await index.add(NS, A, "a0", blocks, 1)
        inc = "a0"
        for cycle in range(
            1, 6
        ):  # the resync: CacheCleared (or a new process), then the whole cache
            if how == "cleared":
                assert await index.clear_pod(A, inc)
            else:
                inc = f"a{cycle}"
                await index.heartbeat(A, inc, 60, cycle)
            assert await index.add(NS, A, inc, blocks, cycle)
        assert await held_members(index) == 10  # one per (block, holder), not one per resync
        assert (await index.stats(6)).retired_generations == 5
        assert await index.sweep(6, 100) == 0  # nothing left to delete: every block is current
        assert await footprint(index) == ([A], 1, 0)
        assert await index.lookup(NS, blocks, 7) == {A: 10}

    run(go(), make_index)


def test_incarnations_may_hold_colons(make_index):
    """An incarnation is compared whole, never by its prefix up to a ':'."""

    async def go():
        index = make_index()
        assert not (await index.heartbeat(A, "x:5", 60, 0)).known
        assert await index.add(NS, A, "x:5", [h(1)], 1)
        assert (await index.heartbeat(A, "x", 60, 2)).superseded  # "x" sorts before "x:5"
        assert not await index.add(NS, A, "x", [h(2)], 3)
        assert not await index.remove(NS, A, "x", [h(1)])
        assert not await index.clear_pod(A, "x")
        assert (
            await index.lookup(NS, [h(1)], 4) == {A: 1} and await index.lookup(NS, [h(2)], 4) == {}
        )
        assert (await index.heartbeat(A, "x:5", 60, 5)).known
        assert not (await index.heartbeat(A, "x:5:1", 60, 6)).known  # a newer one takes over
        assert not await index.add(NS, A, "x:5", [h(3)], 7)
        assert not await index.clear_pod(A, "x:5")
        assert await index.add(NS, A, "x:5:1", [h(4)], 7)
        assert await index.lookup(NS, [h(1)], 8) == {} and await index.lookup(NS, [h(3)], 8) == {}
        assert await index.lookup(NS, [h(4)], 8) == {A: 1}

    run(go(), make_index)


def test_the_previous_releases_keys_are_ignored(redis_server):
    """The key schema is versioned: an index left by the previous release neither counts nor
    collides."""
    import redis.asyncio as aioredis

    async def go():
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            P = f"legacy{next(_prefixes)}"
            # What the previous release left: pod A, generation "a1:2" (cleared twice), holding h1.
            member = f"{NS}|{h(1).hex()}"
            await client.hset(f"{P}:pods", A, "a1:2")
            await client.zadd(f"{P}:leases", {A: 1000})
            await client.hset(f"{P}:b:{member}", A, "a1:2")
            await client.zadd(f"{P}:lru", {member: 1})
            index = RedisIndex(client, capacity=100, prefix=P)
            assert not (await index.heartbeat(A, "a1", 60, 0)).known  # the pod resends its cache
            assert await index.lookup(NS, [h(1)], 1) == {}
            for _ in range(3):  # new generations never run into the old "a1:2"
                assert await index.clear_pod(A, "a1")
                assert await index.lookup(NS, [h(1)], 1) == {}
            assert await index.add(NS, A, "a1", [h(2)], 2)
            assert (await index.stats(2)).num_entries == 1
            await index.sweep(2, 100)
            assert await index.lookup(NS, [h(2)], 3) == {A: 1}
            assert (
                await client.hget(f"{P}:b:{member}", A) == b"a1:2"
            )  # untouched: the upgrade note deletes them
        finally:
            await client.aclose()

    asyncio.run(go())


def test_sweep_retires_the_soonest_expired_pods_first(make_index):
    async def go():
        index = make_index()
        await index.heartbeat(B, "b1", 20, 0)  # registered first, expires last
        await index.heartbeat(A, "a1", 10, 0)
        await index.sweep(30, 1)
        assert (await footprint(index))[0] == [B]
        await index.sweep(30, 1)
        assert (await footprint(index))[0] == []

    run(go(), make_index)
