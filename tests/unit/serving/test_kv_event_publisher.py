"""KVEventPublisher against a kvstore in process: a bounded queue, and a superseded incarnation.

(The first-contact and lost-index resyncs are in test_service.py.)
"""

import asyncio
import contextlib
import logging
import time

import pytest
import xxhash

from services.kvstore import server as kvstore_server
from services.kvstore.settings import KVStoreSettings
from tandem.api import cluster_auth
from tandem.api.hashing import HASH_ALGORITHM
from tandem.api.kv_events import BlocksStored
from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from tandem.serving.kv_event_publisher import KVEventPublisher

FP = "fingerprint-1"


def h(i: int) -> bytes:
    return xxhash.xxh3_128_digest(str(i).encode())


def make_publisher(
    address: str, cached: list[bytes], snapshots: list[int], **kw
) -> KVEventPublisher:
    async def snapshot():
        snapshots.append(len(cached))
        publisher.drop_pending()
        return list(cached)

    publisher = KVEventPublisher(
        address,
        pod_id="p1",
        pod_address="x",
        fingerprint=FP,
        block_size=16,
        snapshot=snapshot,
        flush_interval_s=0.01,
        heartbeat_interval_s=0.1,
        **kw,
    )
    return publisher


@contextlib.asynccontextmanager
async def kvstore(**settings):
    """A kvstore in process: yields (address, stub, service); stops it and cancels ``tasks``
    after."""
    service = await kvstore_server.start(KVStoreSettings(host="127.0.0.1", port=0, **settings))
    address = f"127.0.0.1:{service.port}"
    tasks: list[asyncio.Task] = []
    try:
        async with cluster_auth.aio_channel(address, []) as channel:
            yield address, kvstore_pb2_grpc.KVStoreServiceStub(channel), service, tasks
    finally:
        for task in tasks:
            task.cancel()
        await service.stop(0)


async def until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def synced_publisher(cached: list[bytes], snapshots: list[int], **kw):
    """Yields (publisher, stub, service): publisher "p1"/"i1" past its first resync of ``cached``
    (h(1))."""
    async with kvstore(lease_s=30) as (address, stub, service, tasks):
        publisher = make_publisher(address, cached, snapshots, incarnation="i1", **kw)
        tasks.append(asyncio.create_task(publisher.run()))
        await until(lambda: _eq(matched(stub, [1]), {"p1": 1}))
        yield publisher, stub, service


async def matched(stub, ids) -> dict[str, int]:
    r = await stub.Lookup(
        kvstore_pb2.LookupRequest(model_fingerprint=FP, block_hashes=[h(i) for i in ids])
    )
    return {m.pod_id: m.num_blocks for m in r.matches}


def test_nothing_is_queued_while_kvstore_is_down(caplog):
    """Once contact is lost a resync is due: its snapshot covers every event until then."""
    cached, snapshots = [h(1)], []

    async def go():
        async with synced_publisher(cached, snapshots, timeout_s=0.2, max_pending_hashes=5000) as (
            publisher,
            _stub,
            service,
        ):
            await service.stop(0)
            await until(lambda: _true(not publisher.connected))
            for _ in range(30):
                publisher.enqueue([BlocksStored((h(0),))] * 1000)
                assert publisher.num_pending == 0
                await asyncio.sleep(0.01)
            assert publisher.overflows == 0 and "queued for kvstore" not in caplog.text

    asyncio.run(go())


def test_the_queue_is_bounded_by_block_hashes_and_an_overflow_resyncs():
    cached, snapshots = [h(1)], []

    async def go():
        async with synced_publisher(cached, snapshots, max_pending_hashes=10) as (
            publisher,
            stub,
            _service,
        ):
            publisher.enqueue(
                [BlocksStored((h(2),) * 5), BlocksStored((h(3),) * 5)]
            )  # fits exactly
            assert (publisher.num_pending, publisher.num_pending_hashes, publisher.overflows) == (
                2,
                10,
                0,
            )
            publisher.drop_pending()
            # The engine stores 11 blocks in one step, one event: more than the queue holds.
            cached.extend(h(i) for i in range(100, 111))
            publisher.enqueue([BlocksStored(tuple(h(i) for i in range(100, 111)))])
            assert publisher.overflows == 1 and publisher.num_pending == 0
            await until(lambda: _eq(matched(stub, [110]), {"p1": 1}))
            assert snapshots == [1, 12] and publisher.resyncs == 2

    asyncio.run(go())


def test_a_superseded_publisher_stops_publishing_until_the_newer_lease_lapses(caplog):
    """A live old process neither flaps the pod back nor spins: it heartbeats at its usual pace."""
    caplog.set_level(logging.DEBUG, logger="services.kvstore.server")
    cached, snapshots = [h(1), h(2)], []

    async def go():
        # A lease well above the newer process's 0.2 s heartbeats: a stalled loop on a busy
        # machine must not let the old process take the pod back mid-test.
        async with kvstore(lease_s=3.0) as (address, stub, _service, tasks):
            newer = kvstore_pb2.HeartbeatRequest(pod_id="p1", incarnation="i2")
            await stub.Heartbeat(newer)
            request = kvstore_pb2.PublishEventsRequest(
                pod_id="p1",
                incarnation="i2",
                sequence_number=1,
                model_fingerprint=FP,
                block_size=16,
                hash_algorithm=HASH_ALGORITHM,
                events=[
                    kvstore_pb2.KVCacheEvent(stored=kvstore_pb2.BlocksStored(block_hashes=[h(9)]))
                ],
            )
            assert (await stub.PublishEvents(request)).accepted

            async def keep_newer_alive():
                while True:
                    await stub.Heartbeat(newer)
                    await asyncio.sleep(0.2)

            def refused() -> int:
                return sum("refused a heartbeat" in r.getMessage() for r in caplog.records)

            alive = asyncio.create_task(keep_newer_alive())
            publisher = make_publisher(address, cached, snapshots, incarnation="i1")
            start = time.monotonic()
            tasks.extend([alive, asyncio.create_task(publisher.run())])
            await until(lambda: _true(refused() >= 3))
            assert publisher.superseded and not publisher.connected
            # It heartbeats at its usual 0.1 s pace, not at every 0.01 s flush: a slow machine only
            # lowers this.
            assert refused() <= (time.monotonic() - start) / 0.1 + 3
            assert snapshots == [] and publisher.resyncs == 0
            assert (
                await stub.Stats(kvstore_pb2.StatsRequest())
            ).rejected_batches == 0  # it sent nothing
            assert await matched(stub, [9]) == {"p1": 1} and await matched(stub, [1]) == {}
            # The newer process dies: once its lease lapses, the old one takes the pod and resyncs.
            alive.cancel()
            await until(lambda: _eq(matched(stub, [1, 2]), {"p1": 2}), timeout_s=10)
            assert not publisher.superseded and snapshots == [2]
            assert await matched(stub, [9]) == {}

    asyncio.run(go())


def test_a_publisher_superseded_while_connected_queues_nothing(caplog):
    """Its events would be refused and a resync is due anyway: nothing queued, no overflow warned
    about."""
    cached, snapshots = [h(1)], []

    async def go():
        async with synced_publisher(cached, snapshots, max_pending_hashes=1000) as (
            publisher,
            stub,
            _service,
        ):
            await stub.Heartbeat(
                kvstore_pb2.HeartbeatRequest(pod_id="p1", incarnation="i2")
            )  # a newer process
            await until(lambda: _true(publisher.superseded))
            for _ in range(10):  # the engine goes on storing blocks: 3,000 hashes in all
                publisher.enqueue([BlocksStored(tuple(h(i) for i in range(200, 500)))])
                assert publisher.num_pending == 0
                await asyncio.sleep(0.02)
            assert publisher.overflows == 0 and "queued for kvstore" not in caplog.text
            assert snapshots == [1]

    asyncio.run(go())


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_an_old_incarnation_gets_no_lease_and_silent_pods_are_forgotten(backend, redis_server):
    async def go():
        redis_url = redis_server.url if backend == "redis" else None
        async with kvstore(
            lease_s=30, redis_url=redis_url, key_prefix=f"old-inc-{time.monotonic_ns()}"
        ) as (_, stub, service, _tasks):

            def batch(inc: str, seq: int, i: int) -> kvstore_pb2.PublishEventsRequest:
                stored = kvstore_pb2.KVCacheEvent(
                    stored=kvstore_pb2.BlocksStored(block_hashes=[h(i)])
                )
                return kvstore_pb2.PublishEventsRequest(
                    pod_id="p1",
                    incarnation=inc,
                    sequence_number=seq,
                    model_fingerprint=FP,
                    block_size=16,
                    hash_algorithm=HASH_ALGORITHM,
                    events=[stored],
                )

            await stub.Heartbeat(kvstore_pb2.HeartbeatRequest(pod_id="p1", incarnation="i1"))
            assert (await stub.PublishEvents(batch("i1", 1, 1))).accepted
            await stub.Heartbeat(kvstore_pb2.HeartbeatRequest(pod_id="p1", incarnation="i2"))
            assert (await stub.PublishEvents(batch("i2", 1, 2))).accepted
            late = await stub.Heartbeat(kvstore_pb2.HeartbeatRequest(pod_id="p1", incarnation="i1"))
            assert (late.lease_seconds, late.known) == (0.0, False)
            assert not (await stub.PublishEvents(batch("i1", 2, 3))).accepted
            assert (
                await stub.Heartbeat(kvstore_pb2.HeartbeatRequest(pod_id="p1", incarnation="i2"))
            ).known
            assert await matched(stub, [2]) == {"p1": 1} and await matched(stub, [1]) == {}
            stats = await stub.Stats(kvstore_pb2.StatsRequest())
            assert (stats.rejected_batches, stats.sequence_gaps) == (1, 0)
            servicer = service.parts["servicer"]
            assert list(servicer._last_seq) == ["p1"]
            assert servicer.forget_silent_pods(time.time()) == 0
            assert servicer.forget_silent_pods(time.time() + 31) == 1 and servicer._last_seq == {}

    asyncio.run(go())


async def _eq(coro, value) -> bool:
    return await coro == value


async def _true(value: bool) -> bool:
    return value


def test_a_later_process_gets_a_later_incarnation(monkeypatch):
    """kvstore orders incarnations as strings: the pod's must sort by process start, not by pid."""
    from pathlib import Path
    from types import SimpleNamespace

    from tandem.serving.settings import PodSettings

    engine = SimpleNamespace(fingerprint=FP, block_size=16, max_model_len=64)
    settings = PodSettings(model=Path("/models/m"))
    incarnations = []
    for start_ns, pid in (
        (9_000_000_000, 99_999),
        (10_000_000_000, 7),
    ):  # the restart got a smaller pid
        monkeypatch.setattr("time.time_ns", lambda start_ns=start_ns: start_ns)
        monkeypatch.setattr("os.getpid", lambda pid=pid: pid)
        incarnations.append(settings.identity(engine, 1, "host:1")["incarnation"])
    assert incarnations[0] < incarnations[1]


def test_a_pod_whose_events_kvstore_refuses_as_invalid_stops_publishing():
    """A block size other than kvstore's can never be accepted: no resync at every heartbeat."""
    cached, snapshots = [h(1)], []

    async def go():
        async with kvstore(lease_s=3.0) as (address, stub, _service, tasks):

            async def snapshot():
                snapshots.append(len(cached))
                return list(cached)

            publisher = KVEventPublisher(
                address,
                pod_id="p1",
                pod_address="x",
                incarnation="i1",
                fingerprint=FP,
                block_size=32,
                snapshot=snapshot,
                flush_interval_s=0.01,
                heartbeat_interval_s=0.05,
            )
            tasks.append(asyncio.create_task(publisher.run()))
            await until(lambda: _true(publisher.refused is not None))
            assert "block_size" in publisher.refused
            await asyncio.sleep(0.5)  # ten heartbeats later
            assert snapshots == [1] and publisher.resyncs == 1
            assert (await stub.Stats(kvstore_pb2.StatsRequest())).rejected_batches == 1
            publisher.enqueue([BlocksStored((h(2),))])
            assert publisher.num_pending == 0

    asyncio.run(go())
