"""The kvstore service in process: validation of event batches, fencing, lookups, publisher
resync."""

import asyncio

import grpc
import pytest
import xxhash

from services.kvstore import server as kvstore_server
from services.kvstore.settings import KVStoreSettings
from tandem.api import cluster_auth
from tandem.api.hashing import HASH_ALGORITHM
from tandem.api.kv_events import BlocksRemoved, BlocksStored
from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from tandem.serving.kv_event_publisher import KVEventPublisher

FP = "fingerprint-1"


def h(i: int) -> bytes:
    return xxhash.xxh3_128_digest(str(i).encode())


def batch(seq: int, events, *, pod="p1", inc="i1", **over) -> kvstore_pb2.PublishEventsRequest:
    fields = dict(
        pod_id=pod,
        incarnation=inc,
        sequence_number=seq,
        model_fingerprint=FP,
        block_size=16,
        hash_algorithm=HASH_ALGORITHM,
        events=events,
    )
    fields.update(over)
    return kvstore_pb2.PublishEventsRequest(**fields)


def stored(*ids):
    return kvstore_pb2.KVCacheEvent(
        stored=kvstore_pb2.BlocksStored(block_hashes=[h(i) for i in ids])
    )


async def with_kvstore(test, redis_url=None):
    service = await kvstore_server.start(
        KVStoreSettings(host="127.0.0.1", port=0, redis_url=redis_url, lease_s=30)
    )
    try:
        async with cluster_auth.aio_channel(f"127.0.0.1:{service.port}", []) as channel:
            return await test(kvstore_pb2_grpc.KVStoreServiceStub(channel), service)
    finally:
        await service.stop(0)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_events_lookups_fencing_and_validation(backend, redis_server):
    async def test(stub, service):
        hb = await stub.Heartbeat(kvstore_pb2.HeartbeatRequest(pod_id="p1", incarnation="i1"))
        assert not hb.known and hb.lease_seconds == 30
        assert (
            await stub.Heartbeat(kvstore_pb2.HeartbeatRequest(pod_id="p1", incarnation="i1"))
        ).known
        assert (await stub.PublishEvents(batch(1, [stored(1, 2, 3)]))).accepted
        lookup = await stub.Lookup(
            kvstore_pb2.LookupRequest(model_fingerprint=FP, block_hashes=[h(1), h(2), h(9)])
        )
        assert [(m.pod_id, m.num_blocks) for m in lookup.matches] == [("p1", 2)]
        # A gap in sequence numbers is applied, counted and logged.
        removed = kvstore_pb2.KVCacheEvent(removed=kvstore_pb2.BlocksRemoved(block_hashes=[h(2)]))
        assert (await stub.PublishEvents(batch(5, [removed]))).accepted
        lookup = await stub.Lookup(
            kvstore_pb2.LookupRequest(model_fingerprint=FP, block_hashes=[h(1), h(2)])
        )
        assert [m.num_blocks for m in lookup.matches] == [1]
        # Mismatched batches are refused with the field named.
        for over, param in (
            ({"hash_algorithm": "sha256"}, "hash_algorithm"),
            ({"block_size": 32}, "block_size"),
            ({"pod_id": ""}, "pod_id"),
            ({"model_fingerprint": ""}, "model_fingerprint"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                await stub.PublishEvents(batch(6, [stored(7)], **over))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and param in e.value.details()
        # The pod restarts: its old incarnation's entries and late events stop counting.
        assert not (
            await stub.Heartbeat(kvstore_pb2.HeartbeatRequest(pod_id="p1", incarnation="i2"))
        ).known
        assert not (await stub.PublishEvents(batch(6, [stored(1)]))).accepted
        lookup = await stub.Lookup(
            kvstore_pb2.LookupRequest(model_fingerprint=FP, block_hashes=[h(1)])
        )
        assert list(lookup.matches) == []
        with pytest.raises(grpc.RpcError) as e:
            await stub.Lookup(
                kvstore_pb2.LookupRequest(model_fingerprint=FP, block_hashes=[b"short"])
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stats = await stub.Stats(kvstore_pb2.StatsRequest())
        assert (stats.sequence_gaps, stats.rejected_batches, stats.live_pods) == (1, 5, 1)
        assert (
            stats.lookups == 3 and stats.hit_blocks == 3
        )  # the malformed lookup never reached the index

    asyncio.run(with_kvstore(test, redis_server.url if backend == "redis" else None))


def test_redis_down_means_unavailable_quickly(redis_server):
    """kvstore never hangs on a dead Redis: callers fall back within their timeouts."""
    from services.local_cluster import free_port

    async def test(stub, service):
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(grpc.RpcError) as e:
            await stub.Lookup(
                kvstore_pb2.LookupRequest(model_fingerprint=FP, block_hashes=[h(1)]), timeout=5
            )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in e.value.details()
        assert loop.time() - start < 1.0

    asyncio.run(with_kvstore(test, f"redis://127.0.0.1:{free_port()}/0"))


def test_publisher_resyncs_when_the_index_forgets_it():
    """First contact and an index that lost its data both trigger a full resync."""
    cached = [h(1), h(2)]
    snapshots = []

    async def snapshot():
        snapshots.append(len(cached))
        publisher.drop_pending()
        return list(cached)

    async def go():
        nonlocal publisher
        service = await kvstore_server.start(KVStoreSettings(host="127.0.0.1", port=0, lease_s=30))
        address = f"127.0.0.1:{service.port}"
        publisher = KVEventPublisher(
            address,
            pod_id="p1",
            pod_address="x",
            incarnation="i1",
            fingerprint=FP,
            block_size=16,
            snapshot=snapshot,
            flush_interval_s=0.01,
            heartbeat_interval_s=0.05,
        )
        task = asyncio.create_task(publisher.run())
        async with cluster_auth.aio_channel(address, []) as channel:
            stub = kvstore_pb2_grpc.KVStoreServiceStub(channel)

            async def matched(ids) -> int:
                r = await stub.Lookup(
                    kvstore_pb2.LookupRequest(
                        model_fingerprint=FP, block_hashes=[h(i) for i in ids]
                    )
                )
                return r.matches[0].num_blocks if r.matches else 0

            async def until(cond):
                for _ in range(200):
                    if await cond():
                        return
                    await asyncio.sleep(0.02)
                raise AssertionError("timed out")

            await until(lambda: _eq(matched([1, 2]), 2))
            assert snapshots == [2]
            publisher.enqueue([BlocksStored((h(3),)), BlocksRemoved((h(1),))])
            await until(lambda: _eq(matched([1]), 0))
            assert await matched([3]) == 1
            # The index loses everything (a Redis restart, say): the next heartbeat resyncs.
            service.parts["index"].__init__(service.parts["index"].capacity)
            cached.append(h(3))
            await until(lambda: _eq(matched([1, 2, 3]), 3))
            assert snapshots == [2, 3] and publisher.resyncs == 2
        task.cancel()
        await service.stop(0)

    async def _eq(coro, value):
        return await coro == value

    publisher = None
    asyncio.run(go())


def test_the_sweeper_outlives_any_index_error_and_forgets_silent_pods(caplog):
    """A Redis error other than a lost connection (BUSY, OOM, a script error) skips one sweep
    only."""
    import time

    from redis.exceptions import ResponseError

    from services.kvstore.memory_index import MemoryIndex

    class FlakyIndex(MemoryIndex):
        sweeps = 0

        async def sweep(self, now, max_entries):
            self.sweeps += 1
            if self.sweeps == 1:
                raise ResponseError("BUSY Redis is busy running a script")
            return await super().sweep(now, max_entries)

    async def go():
        index = FlakyIndex(100)
        settings = KVStoreSettings(sweep_interval_s=0.01, lease_s=30)
        metrics = kvstore_server.KVStoreMetrics()
        servicer = kvstore_server.KVStoreServicer(index, settings, metrics)
        servicer._last_seq["p1"] = kvstore_server._Sequence(
            "i1", 1, seen_at=time.time() - 60
        )  # silent a minute
        now = time.time()
        await index.heartbeat("p2", "a1", 600, now)
        await index.add("ns", "p2", "a1", [h(1), h(2)], now)
        await index.heartbeat("p2", "a2", 600, now)  # restarted: a1's two entries are dead
        task = asyncio.create_task(kvstore_server._sweeper(servicer, settings, metrics))
        try:
            for _ in range(500):
                if index.sweeps >= 3:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
        assert index.sweeps >= 3 and "sweep failed" in caplog.text
        assert (await index.stats(now)).num_entries == 0 and servicer._last_seq == {}
        assert metrics.registry.get_sample_value("tandem_kvstore_retired_generations") == 0

    asyncio.run(go())
