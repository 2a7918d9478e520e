"""KV event publisher (prefill pods): ships prefix-cache events to kvstore, heartbeats, resyncs.

The engine thread only appends events to a list (``enqueue``); an asyncio task batches them to
``KVStoreService.PublishEvents`` every ``flush_interval_s`` and heartbeats every few seconds.
The index is kept right without perfect delivery: when a heartbeat reports that kvstore does not
know this pod incarnation (first contact, kvstore lost its Redis data) or a publish failed
(events lost), the next batch is a resync -- ``CacheCleared`` followed by every block the engine
holds, taken on the engine thread so that no event is counted twice or missed.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc

from tandem.kv.events import BlocksRemoved, BlocksStored, CacheCleared, KVEvent
from tandem.kv.hashing import HASH_ALGORITHM, BlockHash
from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from tandem.serving.channels import CLIENT_OPTIONS

logger = logging.getLogger(__name__)
RESYNC_BATCH = 50_000
"""Block hashes per message of a resync (16 bytes each: well under gRPC's message limit)."""


def to_proto(event: KVEvent) -> kvstore_pb2.KVCacheEvent:
    if isinstance(event, BlocksStored):
        return kvstore_pb2.KVCacheEvent(stored=kvstore_pb2.BlocksStored(block_hashes=list(event.block_hashes)))
    if isinstance(event, BlocksRemoved):
        return kvstore_pb2.KVCacheEvent(removed=kvstore_pb2.BlocksRemoved(block_hashes=list(event.block_hashes)))
    return kvstore_pb2.KVCacheEvent(cleared=kvstore_pb2.CacheCleared())


class KVEventPublisher:
    def __init__(
        self,
        address: str,
        *,
        pod_id: str,
        pod_address: str,
        incarnation: str,
        fingerprint: str,
        block_size: int,
        snapshot: Callable[[], Awaitable[list[BlockHash]]],
        flush_interval_s: float = 0.05,
        heartbeat_interval_s: float = 2.0,
        timeout_s: float = 2.0,
    ) -> None:
        self.address = address
        self.pod_id, self.pod_address, self.incarnation = pod_id, pod_address, incarnation
        self.fingerprint, self.block_size = fingerprint, block_size
        self._snapshot = snapshot
        self.flush_interval_s = flush_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.timeout_s = timeout_s
        self._pending: list[KVEvent] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._needs_resync = True
        self.connected = False
        """Whether the last exchange with kvstore succeeded."""
        self.resyncs = 0

    # ---- engine thread ----------------------------------------------------------------------

    def enqueue(self, events: Iterable[KVEvent]) -> None:
        events = list(events)
        if events:
            with self._lock:
                self._pending.extend(events)

    def drop_pending(self) -> None:
        """Forget queued events (on the engine thread, just before a snapshot replaces them)."""
        with self._lock:
            self._pending.clear()

    # ---- asyncio task -----------------------------------------------------------------------

    async def run(self) -> None:
        channel = grpc.aio.insecure_channel(self.address, options=CLIENT_OPTIONS)
        stub = kvstore_pb2_grpc.KVStoreServiceStub(channel)
        next_heartbeat = 0.0
        try:
            while True:
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + await self._heartbeat(stub)
                if self.connected:
                    await self._flush(stub)
                await asyncio.sleep(self.flush_interval_s)
        finally:
            await channel.close()

    async def _heartbeat(self, stub) -> float:
        """One heartbeat; returns the delay to the next."""
        try:
            resp = await stub.Heartbeat(
                kvstore_pb2.HeartbeatRequest(
                    pod_id=self.pod_id, incarnation=self.incarnation, model_fingerprint=self.fingerprint,
                    address=self.pod_address,
                ),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as e:
            self._lost(f"heartbeat failed: {e.code().name}")
            return 1.0
        if not resp.known:
            self._needs_resync = True
        if not self.connected:
            logger.info("connected to kvstore at %s", self.address)
        self.connected = True
        return min(self.heartbeat_interval_s, resp.lease_seconds / 3)

    def _lost(self, why: str) -> None:
        if self.connected:
            logger.warning("kvstore %s: %s; the index will be resynced", self.address, why)
        self.connected = False
        self._needs_resync = True

    async def _flush(self, stub) -> None:
        if self._needs_resync:
            hashes = await self._snapshot()
            batches = [[CacheCleared()]] + [
                [BlocksStored(tuple(hashes[i : i + RESYNC_BATCH]))] for i in range(0, len(hashes), RESYNC_BATCH)
            ]
            self.resyncs += 1
        else:
            with self._lock:
                events, self._pending = self._pending, []
            batches = [events] if events else []
        for events in batches:
            if not await self._publish(stub, events):
                return
        self._needs_resync = False

    async def _publish(self, stub, events: list[KVEvent]) -> bool:
        self._seq += 1
        request = kvstore_pb2.PublishEventsRequest(
            pod_id=self.pod_id, incarnation=self.incarnation, sequence_number=self._seq,
            model_fingerprint=self.fingerprint, block_size=self.block_size, hash_algorithm=HASH_ALGORITHM,
            events=[to_proto(e) for e in events], sent_at=time.time(),
        )
        try:
            resp = await stub.PublishEvents(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            self._lost(f"publishing events failed: {e.code().name}")
            return False
        if not resp.accepted:  # kvstore thinks we are an old incarnation: register again
            self._lost("events refused")
            return False
        return True
