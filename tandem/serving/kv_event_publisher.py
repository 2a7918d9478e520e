"""KV event publisher (prefill pods): ships prefix-cache events to kvstore, heartbeats, resyncs.

The engine thread only appends events to a list (``enqueue``); an asyncio task batches them to
``KVStoreService.PublishEvents`` every ``flush_interval_s`` and heartbeats every few seconds.
The index is kept right without perfect delivery: when a heartbeat reports that kvstore does not
know this pod incarnation (first contact, kvstore lost its Redis data) or a publish failed
(events lost), the next batch is a resync -- ``CacheCleared`` followed by every block the engine
holds, taken on the engine thread so that no event is counted twice or missed. Because a resync
replaces whatever was queued, nothing is queued while one is due (kvstore unreachable, events
lost, this incarnation unknown or superseded): the snapshot covers those events. Otherwise the
queue is bounded by block hashes, not events (one ``BlocksStored`` may carry thousands): past
``max_pending_hashes`` (kvstore slower than the engine) it is dropped and a resync is due. When
kvstore says a newer incarnation of this pod id holds the lease, this process stops publishing
and only keeps heartbeating at its usual pace, in case that lease lapses.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc

from tandem.api import cluster_auth
from tandem.api.channel_options import CLIENT_OPTIONS
from tandem.api.hashing import HASH_ALGORITHM
from tandem.api.ids import BlockHash
from tandem.api.kv_events import BlocksRemoved, BlocksStored, CacheCleared, KVEvent
from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc

logger = logging.getLogger(__name__)
RESYNC_BATCH = 50_000
"""Block hashes per message of a resync (16 bytes each: well under gRPC's message limit)."""
MAX_PENDING_HASHES = 200_000
"""Block hashes queued for kvstore before the queue is dropped for a resync (about 12 MB; tens of
seconds of a busy engine's events: a kvstore slower than that costs one snapshot, not memory)."""


def to_proto(event: KVEvent) -> kvstore_pb2.KVCacheEvent:
    if isinstance(event, BlocksStored):
        return kvstore_pb2.KVCacheEvent(
            stored=kvstore_pb2.BlocksStored(block_hashes=list(event.block_hashes))
        )
    if isinstance(event, BlocksRemoved):
        return kvstore_pb2.KVCacheEvent(
            removed=kvstore_pb2.BlocksRemoved(block_hashes=list(event.block_hashes))
        )
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
        max_pending_hashes: int = MAX_PENDING_HASHES,
    ) -> None:
        self.address = address
        self.pod_id, self.pod_address, self.incarnation = pod_id, pod_address, incarnation
        self.fingerprint, self.block_size = fingerprint, block_size
        self._snapshot = snapshot
        self.flush_interval_s = flush_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.timeout_s = timeout_s
        self.max_pending_hashes = max_pending_hashes
        self._lock = threading.Lock()
        self._pending: list[KVEvent] = []
        self._pending_hashes = 0
        self._discarding = True
        """Under ``_lock``: a resync is due and its snapshot will cover every event until it is
        taken, so ``enqueue`` drops them. Cleared when a resync starts (just before its
        snapshot)."""
        self._seq = 0
        self._needs_resync = True
        self.connected = False
        """Whether the last exchange with kvstore succeeded."""
        self.superseded = False
        """Whether kvstore last said a newer incarnation of this pod id holds the lease."""
        self.refused: str | None = None
        """Why kvstore refused this pod's events as invalid (its block size or hash algorithm
        differs from kvstore's): publishing stops for good, as resending could never help."""
        self.resyncs = 0
        self.overflows = 0

    # ---- engine thread ----------------------------------------------------------------------

    def enqueue(self, events: Iterable[KVEvent]) -> None:
        """Queue events for the next batch (cheap: the engine loop calls it after every step)."""
        events = list(events)
        if not events:
            return
        size = sum(_num_hashes(e) for e in events)
        with self._lock:
            if self._discarding:
                return  # the coming resync's snapshot covers these
            if self._pending_hashes + size <= self.max_pending_hashes:
                self._pending.extend(events)
                self._pending_hashes += size
                return
            self._discard_locked()
            self.overflows += 1
        logger.warning(
            "more than %d block hashes queued for kvstore %s: dropped; the index will be resynced",
            self.max_pending_hashes,
            self.address,
        )

    @property
    def num_pending(self) -> int:
        """Events queued for the next batch."""
        return len(self._pending)

    @property
    def num_pending_hashes(self) -> int:
        """Block hashes queued for the next batch (what ``max_pending_hashes`` bounds)."""
        return self._pending_hashes

    def drop_pending(self) -> None:
        """Forget queued events (on the engine thread, just before a snapshot replaces them)."""
        with self._lock:
            self._pending.clear()
            self._pending_hashes = 0

    def _discard_locked(self) -> None:
        self._pending.clear()
        self._pending_hashes = 0
        self._discarding = True

    # ---- asyncio task -----------------------------------------------------------------------

    async def run(self) -> None:
        channel = cluster_auth.aio_channel(self.address, CLIENT_OPTIONS)
        stub = kvstore_pb2_grpc.KVStoreServiceStub(channel)
        next_heartbeat = 0.0
        try:
            while True:
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + await self._heartbeat(stub)
                if self.connected and self.refused is None:
                    await self._flush(stub)
                await asyncio.sleep(self.flush_interval_s)
        finally:
            await channel.close()

    async def _heartbeat(self, stub) -> float:
        """One heartbeat; returns the delay to the next."""
        try:
            resp = await stub.Heartbeat(
                kvstore_pb2.HeartbeatRequest(
                    pod_id=self.pod_id,
                    incarnation=self.incarnation,
                    model_fingerprint=self.fingerprint,
                    address=self.pod_address,
                ),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as e:
            self._lost(f"heartbeat failed: {e.code().name}")
            return 1.0
        if resp.lease_seconds <= 0:  # see kvstore's Heartbeat: a newer incarnation holds the pod id
            self._supersede()
            return self.heartbeat_interval_s
        if self.superseded:
            logger.info(
                "kvstore accepts incarnation %s of pod %s again", self.incarnation, self.pod_id
            )
            self.superseded = False
        if not resp.known:
            self._resync_due()
        if not self.connected:
            logger.info("connected to kvstore at %s", self.address)
        self.connected = True
        return min(self.heartbeat_interval_s, resp.lease_seconds / 3)

    def _supersede(self) -> None:
        """Stop publishing (kvstore ignores this process's events) until a heartbeat is accepted."""
        if not self.superseded:
            logger.warning(
                "a newer incarnation of pod %s holds its kvstore lease: incarnation %s stops "
                "publishing KV events",
                self.pod_id,
                self.incarnation,
            )
        self.superseded = True
        self.connected = False
        self._resync_due()

    def _lost(self, why: str) -> None:
        if self.connected:
            logger.warning("kvstore %s: %s; the index will be resynced", self.address, why)
        self.connected = False
        self._resync_due()

    def _resync_due(self) -> None:
        """The next flush is a resync: drop the queue and stop queueing until its snapshot."""
        self._needs_resync = True
        with self._lock:
            self._discard_locked()

    async def _flush(self, stub) -> None:
        with self._lock:  # events from here on are queued: the snapshot drops those it covers
            resync = self._needs_resync or self._discarding
            self._discarding = False
        if resync:
            hashes = await self._snapshot()
            batches = [[CacheCleared()]] + [
                [BlocksStored(tuple(hashes[i : i + RESYNC_BATCH]))]
                for i in range(0, len(hashes), RESYNC_BATCH)
            ]
            self.resyncs += 1
        else:
            with self._lock:
                events, self._pending, self._pending_hashes = self._pending, [], 0
            batches = [events] if events else []
        for events in batches:
            if not await self._publish(stub, events):
                return
        self._needs_resync = False

    async def _publish(self, stub, events: list[KVEvent]) -> bool:
        self._seq += 1
        request = kvstore_pb2.PublishEventsRequest(
            pod_id=self.pod_id,
            incarnation=self.incarnation,
            sequence_number=self._seq,
            model_fingerprint=self.fingerprint,
            block_size=self.block_size,
            hash_algorithm=HASH_ALGORITHM,
            events=[to_proto(e) for e in events],
            sent_at=time.time(),
        )
        try:
            resp = await stub.PublishEvents(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                self.refused = e.details() or "invalid events"
                logger.error(
                    "kvstore %s refuses this pod's KV events (%s): KV events stop; prefix-aware "
                    "routing will not see this pod's cache until "
                    "its configuration matches kvstore's",
                    self.address,
                    self.refused,
                )
                self._resync_due()  # nothing is queued from now on
                return False
            self._lost(f"publishing events failed: {e.code().name}")
            return False
        if not resp.accepted:
            # Not the registered incarnation: the next heartbeat says whether this process was
            # superseded (stop) or forgotten (resync). Flushes wait for it, so this never spins.
            self._lost("events refused")
            return False
        return True


def _num_hashes(event: KVEvent) -> int:
    """Queue weight of an event: its block hashes (at least one, so empty events are bounded
    too)."""
    return max(1, len(getattr(event, "block_hashes", ())))
