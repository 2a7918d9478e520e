"""KV receiver (decode pods): the leases on reserved blocks, and the gRPC transport's writes.

Every reservation is a **lease** (``expect``): an unguessable transfer token, an epoch and an
end time. Only a writer presenting the token of the live lease may claim, write or complete it;
everything else is refused with ``KVTransferForbidden`` before a byte is written, and harms
nothing: a wrong or missing token, a request with no reservation, a token of an earlier lease
(the token names its epoch: a stale one is refused as such), a lease that ended, or one that was
discarded (cancelled, failed, released unclaimed).

A writer **claims** the lease before it writes (``claim``: any transport, gRPC included, or the
first chunk); ``release_unclaimed`` lets the decode pod give up a reservation nobody claimed
within its claim deadline, atomically with respect to a claim arriving at that moment.

- gRPC transport: every chunk is validated against the reservation before it touches the pool
  (wire.py), and every region may be written once: duplicates and overlaps are refused. A
  transfer completes only when the end message arrives, the chunk count matches, and every
  (layer, block) of the expected range has arrived.
- memory transports (shm, cuda-ipc, nixl) write into the pool from the prefill pod without any
  code running here. The writer first ``claim``s the lease (from then on this pod assumes it may
  be writing), then sends one ``complete_memory`` notice: done, or aborted.

A memory writer's claim grants it a short **write lease** (``write_lease_s``, the decode pod's
``kv_write_lease_s``): it may write until ``min(claim + write_lease_s, the lease's end)`` and
extends that while it works (``renew``, never past the lease's end). A writer that stops
renewing -- its process died, it lost the network -- loses the reservation when its write lease
ends: from then on everything it sends is refused, the request's wait for its KV fails
(``write_lease_end``) and, once discarded, the blocks are ``drained``. Without it a dead writer
would hold the blocks for the whole lease (the decode pod cannot tell a dead writer from a slow
one). Renewal is refused once the write lease ended (it never comes back) and once the lease was
discarded: the writer stops at once.

``discard`` stops a reservation. For the gRPC transport, once it returns no write is running and
the blocks may be reused; a claimed memory lease is returned to the caller, which frees the
blocks only once it is ``drained``: the writer's notice arrived (it flushed and stopped) or the
lease or the write lease ended, whichever comes first -- an aborted transfer can never write
into blocks already given to another request (a writer stops ``write_margin_s`` before the end
of its write lease).
"""

import hmac
import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field

import torch

from tandem.api.errors import KVTransferError, KVTransferForbidden
from tandem.engine.kv_cache import KVCacheSpec
from tandem.engine.parallel.kv_pages import rank_heads
from tandem.engine.uploads import upload
from tandem.proto.common.v1 import common_pb2
from tandem.transfer.wire import (
    DEFAULT_MAX_CHUNK_BYTES,
    PageLayout,
    check_fingerprint,
    validate_chunk,
)


@dataclass(slots=True, frozen=True)
class Lease:
    """What a reservation's writer must present, and until when it may write."""

    token: str
    epoch: int
    expires_unix_ms: int


@dataclass(slots=True, frozen=True)
class Claim:
    """What a memory writer may write: these blocks from ``first_block`` on, until the lease's
    end (the decode pod's word, not the request's)."""

    lease: Lease
    block_ids: list[int]
    first_block: int


@dataclass(slots=True)
class _Inbound:
    block_ids: torch.Tensor
    rank_block_ids: list[torch.Tensor]
    """``block_ids`` on each rank's pool's device (rank 0's is ``block_ids``), uploaded once."""
    first_block: int
    received: torch.Tensor
    """[layers, blocks] bool: which pages have been written."""
    lease: Lease
    expires_at: float
    """``time.monotonic()`` at the lease's end."""
    write_expires_at: float | None = None
    """A memory writer's claim: ``time.monotonic()`` at its write lease's end (``renew``)."""
    write_expires_unix_ms: int = 0
    transport: str | None = None
    """Set by the first writer: "grpc" by a chunk, a memory transport by ``claim``."""
    stopped: threading.Event = field(default_factory=threading.Event)
    """A claimed memory writer confirmed it stopped (its completion or abort notice)."""
    chunks: int = 0
    bytes: int = 0
    first_write: float | None = None
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    engine_done: "torch.cuda.Event | None" = None
    """Recorded on the device's current (default) stream, where the engine runs its steps, when
    the blocks were handed over: the pages are written after it, so a step still in flight
    (async scheduling) that wrote into these blocks while they belonged to a finished request
    cannot land on top of the pushed KV."""


@dataclass(slots=True, frozen=True)
class TransferSummary:
    chunks: int
    bytes: int
    seconds: float
    """From the first chunk written to the end message."""
    transport: str = "grpc"


MEMORY_WRITE_MARGIN_S = 5.0
"""A memory writer stops this long before its lease ends (clocks of one host, or NTP-close), or
a quarter of a shorter write lease (``write_margin_s``)."""

DEFAULT_WRITE_LEASE_S = 10.0
"""How long a memory writer's claim or renewal lets it write (``kv_write_lease_s``)."""


def write_margin_s(granted_s: float) -> float:
    """How long before the end of a write lease granted for ``granted_s`` seconds its writer
    stops issuing writes: ``MEMORY_WRITE_MARGIN_S``, or a quarter of a shorter grant (a copy
    issued before the margin must have landed by the end; the writer renews every third)."""
    return max(0.0, min(MEMORY_WRITE_MARGIN_S, granted_s / 4))


def lease_remaining_ms(expires_unix_ms: int) -> int:
    """What a lease ending at ``expires_unix_ms`` (this pod's clock) has left now, in ms: what
    ``ClaimKV`` / ``RenewKV`` answer beside the end itself (``local_lease_end_ms``). At least
    1: 0 on the wire means a decode pod that predates the field."""
    return max(1, int(expires_unix_ms - time.time() * 1000))


def local_lease_end_ms(expires_unix_ms: int, remaining_ms: int, sent_unix_s: float) -> int:
    """A lease's end on the writer's clock: the time it sent the call plus what the decode pod
    said was left when it answered. That is never later than the real end (the answer came
    after the call was sent), whatever the skew between the two nodes' clocks. A decode pod that
    sends no ``remaining_ms`` (0: it predates the field) leaves the end in its own clock."""
    if remaining_ms <= 0:
        return expires_unix_ms
    return int(sent_unix_s * 1000) + remaining_ms


class KVReceiver:
    def __init__(
        self,
        pool: torch.Tensor,
        spec: KVCacheSpec,
        fingerprint: str,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        engine_event: "torch.cuda.Event | None" = None,
        write_lease_s: float | None = DEFAULT_WRITE_LEASE_S,
        rank_pools: "list[torch.Tensor] | tuple[torch.Tensor, ...]" = (),
    ) -> None:
        """
        Args:
            pool: the engine's KV pool (``PagedKVCache.tensor``): in the engine's process, or
                shared with it (shared memory on CPU, CUDA IPC on GPUs: a pod's engine core).
            spec: the pages as they arrive: every kv head of the model.
            rank_pools: a tensor-parallel engine's other ranks' pools (ranks 1..N-1; ``pool`` is
                rank 0's), each holding its kv heads (``kv_pages.rank_heads``): every pushed
                page is split between them. Such an engine takes pages over gRPC only (a memory
                writer would need every rank's pool and a per-rank head layout).
            engine_event: on a GPU pool shared across processes, an event the engine records on
                its stream whenever it hands out blocks (``expect`` then cannot record one on
                the engine's stream itself). ``expect`` pins its latest record, which is that
                reservation's or a later one: waiting for it is waiting long enough.
            write_lease_s: how long a memory writer's claim or renewal lets it write (None: until
                the lease's end, no renewals).
        """
        self.kv = pool
        self.layout = PageLayout(
            spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim, spec.dtype
        )
        pools = [pool, *rank_pools]
        heads = rank_heads(spec.num_kv_heads, len(pools))
        for rank, (p, h) in enumerate(zip(pools, heads, strict=True)):
            if p.shape[-2] != len(h) or p.device.type != pool.device.type:
                raise ValueError(
                    f"rank {rank}'s KV pool holds {p.shape[-2]} kv heads on {p.device}; "
                    f"{len(h)} of {spec.num_kv_heads} on a {pool.device.type} device expected"
                )
        self._rank_pools = list(zip(pools, heads, strict=True))
        """(pool, the model kv heads it holds) per rank: a page's heads go to their ranks."""
        self.fingerprint = fingerprint
        self.max_chunk_bytes = max_chunk_bytes
        self.write_lease_s = write_lease_s
        self._engine_event = engine_event
        self._inbound: dict[str, _Inbound] = {}
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.kv.device) if self.kv.is_cuda else None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        """GPUs: the copy stream of each device a rank's pool is on (rank 0's: ``_stream``)."""
        if self._stream is not None:
            self._streams[self.kv.device] = self._stream
            for p in rank_pools:
                if p.device not in self._streams:
                    self._streams[p.device] = torch.cuda.Stream(p.device)
        self._epochs = itertools.count(1)
        self._draining: dict[str, _Inbound] = {}
        """Discarded leases whose memory writer has not confirmed it stopped: its notice still
        finds them (and releases ``discard``)."""

    def expect(
        self, request_id: str, block_ids: list[int], first_block: int, lease_s: float = 90.0
    ) -> Lease:
        """Lease ``request_id``'s blocks ``[first_block, len(block_ids))`` to one transfer for
        ``lease_s`` seconds; returns what its writer must present."""
        epoch = next(self._epochs)
        lease = Lease(
            token=f"{epoch}.{secrets.token_urlsafe(24)}",
            epoch=epoch,
            expires_unix_ms=int((time.time() + lease_s) * 1000),
        )
        host = torch.tensor(block_ids, dtype=torch.long)
        ids = [upload(host, pool.device) for pool, _ in self._rank_pools]
        for device, stream in self._streams.items():
            stream.wait_stream(
                torch.cuda.current_stream(device)
            )  # the writes come after the uploads
        inbound = _Inbound(
            block_ids=ids[0],
            rank_block_ids=ids,
            first_block=first_block,
            received=torch.zeros((self.layout.num_layers, len(block_ids)), dtype=torch.bool),
            lease=lease,
            expires_at=time.monotonic() + lease_s,
        )
        if self._engine_event is not None:
            # Pin the shared event's latest record (the one made for this reservation, or a
            # later one) in an event of our own: writes then wait for that point only, not for
            # whatever the core records for later reservations.
            self._stream.wait_event(self._engine_event)
            inbound.engine_done = torch.cuda.Event()
            inbound.engine_done.record(self._stream)
        elif self._stream is not None:
            inbound.engine_done = torch.cuda.Event()
            inbound.engine_done.record(torch.cuda.current_stream(self.kv.device))
        with self._lock:
            if request_id in self._inbound:
                raise KVTransferError(f"request {request_id!r} already expects KV")
            self._inbound[request_id] = inbound
        return lease

    def expects(self, request_id: str) -> bool:
        return request_id in self._inbound

    def _get(self, request_id: str, token: str) -> _Inbound:
        """The live lease ``token`` opens (compared in constant time).

        Raises:
            KVTransferForbidden: no such lease: wrong or missing token, no reservation, a token
                of an earlier lease of this request id, or the lease ended.
        """
        inbound = self._inbound.get(request_id)
        if (
            inbound is None
            or _epoch_of(token) != inbound.lease.epoch  # a stale token: an earlier lease's
            or not _same_token(inbound.lease.token, token)
        ):
            # One answer for all: a forger learns nothing about which requests exist.
            raise KVTransferForbidden(
                f"no KV reservation for request {request_id!r} with this transfer token"
            )
        if _ended(inbound, time.monotonic()):
            raise KVTransferForbidden(f"the KV lease of {request_id!r} has ended")
        return inbound

    def authorize(self, request_id: str, token: str) -> None:
        """Check a writer's token against the live lease without writing (a stream's first
        message: until it passed, nothing the stream says may fail the reservation).

        Raises:
            KVTransferForbidden: as ``_get``.
        """
        self._get(request_id, token)

    def claimed(self, request_id: str) -> bool:
        """A writer claimed the reservation (``claim`` or a first chunk)."""
        inbound = self._inbound.get(request_id)
        return inbound is not None and inbound.transport is not None

    def release_unclaimed(self, request_id: str) -> bool:
        """Give up the reservation if no writer has claimed it; afterwards every claim, write
        and notice for it is refused and its blocks may be freed at once (nothing wrote).

        Returns False (and changes nothing) if a writer claimed it, or it is gone already.
        """
        with self._lock:
            inbound = self._inbound.get(request_id)
            if inbound is None:
                return False
            with inbound.lock:
                if inbound.transport is not None or inbound.closed:
                    return False
                inbound.closed = True
            del self._inbound[request_id]
        return True

    def _take_transport(self, inbound: _Inbound, transport: str) -> None:
        if inbound.transport is None:
            inbound.transport = transport
        elif inbound.transport != transport:
            raise KVTransferError(f"the transfer already uses {inbound.transport}, not {transport}")

    # ---- memory transports ------------------------------------------------------------------

    def claim(self, request_id: str, token: str, transport: str, *, renews: bool = True) -> "Claim":
        """A memory-transport writer takes the lease before its first write.

        Blocks until the pages may be written: on a GPU, until the engine's last step that may
        have used these blocks (async scheduling) is done -- the writer's copies are not ordered
        after it otherwise.

        A gRPC writer claims too (early, before its prompt waits in the prefill queue): the
        claim only tells this pod that a writer holds the reservation (``release_unclaimed``);
        its chunks are checked one by one as they arrive.

        ``renews``: the writer renews its write lease (``renew``); one that does not (a prefill
        pod from before write leases) is held to the reservation's whole lease instead.
        """
        inbound = self._get(request_id, token)
        if transport != "grpc" and len(self._rank_pools) > 1:
            raise KVTransferError(
                f"{transport}: this tensor-parallel decode pod takes pushed KV over grpc only"
            )
        with inbound.lock:
            if inbound.closed:
                raise KVTransferForbidden(f"the KV reservation of {request_id!r} was cancelled")
            margin = 0.0 if transport == "grpc" else MEMORY_WRITE_MARGIN_S
            now = time.monotonic()
            if now >= inbound.expires_at - margin:
                raise KVTransferForbidden(f"the KV lease of {request_id!r} has ended")
            first = inbound.transport is None
            self._take_transport(inbound, transport)
            if transport != "grpc" and first and renews and self.write_lease_s is not None:
                self._extend(inbound, now)
            lease = inbound.lease
            if inbound.write_expires_at is not None:
                lease = Lease(lease.token, lease.epoch, inbound.write_expires_unix_ms)
        if inbound.engine_done is not None and transport != "grpc":
            inbound.engine_done.synchronize()
        return Claim(lease, inbound.block_ids.tolist(), inbound.first_block)

    def _extend(self, inbound: _Inbound, now: float) -> None:
        """Move the write lease's end to ``now + write_lease_s``, never past the lease's end
        (holding ``inbound.lock``)."""
        left = max(0.0, min(self.write_lease_s, inbound.expires_at - now))
        inbound.write_expires_at = now + left
        inbound.write_expires_unix_ms = min(
            int((time.time() + left) * 1000), inbound.lease.expires_unix_ms
        )

    def renew(self, request_id: str, token: str) -> int:
        """A memory writer extends its write lease; returns its new end (Unix time, ms).

        Raises:
            KVTransferForbidden: wrong or stale token, no reservation, not claimed by a memory
                transport, discarded (the writer must stop), or the lease or write lease ended
                (an ended write lease never comes back).
        """
        draining = self._draining.get(request_id)
        if draining is not None and _same_token(draining.lease.token, token):
            raise KVTransferForbidden(f"the KV transfer of {request_id!r} was cancelled")
        inbound = self._get(request_id, token)
        with inbound.lock:
            if inbound.closed:
                raise KVTransferForbidden(f"the KV transfer of {request_id!r} was cancelled")
            if inbound.write_expires_at is None:
                raise KVTransferForbidden(
                    f"the KV reservation of {request_id!r} holds no memory write lease"
                )
            now = time.monotonic()
            if _ended(inbound, now):  # checked again under the lock: a renewal never revives
                raise KVTransferForbidden(f"the KV write lease of {request_id!r} has ended")
            self._extend(inbound, now)
            return inbound.write_expires_unix_ms

    def write_lease_end(self, request_id: str) -> float | None:
        """When (``time.monotonic()``) the live reservation's memory write lease ends as things
        stand (renewals move it); None when it has none (not claimed by a memory transport,
        completed or discarded)."""
        inbound = self._inbound.get(request_id)
        return None if inbound is None else inbound.write_expires_at

    def complete_memory(
        self, end: common_pb2.KVTransferEnd, checksum: "torch.Tensor | None" = None
    ) -> TransferSummary:
        """A memory writer's one notice: the pages are in place (or, ``end.aborted``, it stopped
        early). Afterwards the blocks hold the prompt's KV, or may be freed.

        Raises:
            KVTransferForbidden: wrong token, not claimed, or the lease already ended.
            KVTransferError: an abort notice (the request fails), or a checksum mismatch.
        """
        draining = self._draining.get(end.request_id)
        if draining is not None and _same_token(draining.lease.token, end.transfer_token or ""):
            draining.stopped.set()  # the writer stopped: the blocks may go back
            raise KVTransferForbidden(f"the KV transfer of {end.request_id!r} was cancelled")
        # The token first: a forger's notice must not fail the request with another error.
        inbound = self._get(end.request_id, end.transfer_token)
        check_fingerprint(end.model_fingerprint, self.fingerprint)
        with inbound.lock:
            if inbound.transport is None or inbound.transport == "grpc":
                raise KVTransferForbidden(
                    f"the KV transfer of {end.request_id!r} was not claimed by a memory transport"
                )
            inbound.stopped.set()  # whatever else happens, the writer no longer writes
            if inbound.closed:
                raise KVTransferForbidden(f"the KV transfer of {end.request_id!r} was cancelled")
            inbound.closed = True
        with self._lock:
            self._inbound.pop(end.request_id, None)
        if end.aborted:
            raise KVTransferError(f"the prefill pod aborted the KV transfer of {end.request_id!r}")
        if end.HasField("checksum"):
            got = self.checksum(inbound)
            if got != end.checksum:
                raise KVTransferError(
                    f"KV checksum mismatch for {end.request_id!r}: the pages landed differ "
                    f"from the ones sent"
                )
        blocks = len(inbound.block_ids) - inbound.first_block
        nbytes = blocks * self.layout.num_layers * self.layout.bytes_per_block_layer
        return TransferSummary(1, nbytes, 0.0, inbound.transport)

    def checksum(self, inbound: _Inbound) -> int:
        """The pages of the transferred blocks summed as 16-bit integers (``page_checksum``)."""
        ids = inbound.block_ids[inbound.first_block :]
        return page_checksum(self.kv.index_select(2, ids))

    # ---- the gRPC transport -----------------------------------------------------------------

    def write(self, chunk: common_pb2.KVChunk, data) -> int:
        """Validate one chunk (header and payload) and copy its pages into the reserved blocks.

        Returns the payload's size in bytes.
        """
        inbound = self._get(chunk.request_id, chunk.transfer_token)
        pages = validate_chunk(
            chunk,
            data,
            self.layout,
            self.fingerprint,
            first_block=inbound.first_block,
            num_blocks=len(inbound.block_ids),
            max_chunk_bytes=self.max_chunk_bytes,
        )
        l0, l1, b0, b1 = chunk.layer_start, chunk.layer_end, chunk.block_start, chunk.block_end
        with inbound.lock:
            if inbound.closed:
                raise KVTransferError(f"the KV transfer of {chunk.request_id!r} was cancelled")
            self._take_transport(inbound, "grpc")
            region = inbound.received[l0:l1, b0:b1]
            if bool(region.any()):
                raise KVTransferError(
                    f"KV chunk layers [{l0}, {l1}) blocks [{b0}, "
                    f"{b1}) overlaps pages already received"
                )
            for (pool, heads), ids in zip(self._rank_pools, inbound.rank_block_ids, strict=True):
                part = pages[..., heads.start : heads.stop, :]
                if self._stream is None:
                    pool[l0:l1, :, ids[b0:b1]] = part
                    continue
                # Each rank's pool on its own device: that device's stream, after the engine's
                # last use of the blocks (rank 0's event covers every rank: each layer's KV write
                # precedes that layer's all-reduce).
                stream = self._streams[pool.device]
                stream.wait_event(inbound.engine_done)
                with torch.cuda.stream(stream):
                    pool[l0:l1, :, ids[b0:b1]] = part.to(pool.device, non_blocking=True)
            region.fill_(True)
            if inbound.first_write is None:
                inbound.first_write = time.perf_counter()
            inbound.chunks += 1
            nbytes = pages.numel() * pages.element_size()
            inbound.bytes += nbytes
        return nbytes

    def complete(self, end: common_pb2.KVTransferEnd) -> TransferSummary:
        """Check that the whole transfer arrived; afterwards the blocks hold the prompt's KV."""
        inbound = self._get(end.request_id, end.transfer_token)  # the token first, as above
        check_fingerprint(end.model_fingerprint, self.fingerprint)
        with inbound.lock:
            if inbound.transport not in (None, "grpc"):
                raise KVTransferError(
                    f"the KV transfer of {end.request_id!r} is {inbound.transport}"
                )
            if inbound.closed:
                raise KVTransferError(f"the KV transfer of {end.request_id!r} was cancelled")
            if inbound.chunks != end.total_chunks:
                raise KVTransferError(
                    f"KV transfer of {end.request_id!r} ended after "
                    f"{inbound.chunks} of {end.total_chunks} chunks"
                )
            missing = ~inbound.received[:, inbound.first_block :]
            if bool(missing.any()):
                layers, blocks = torch.nonzero(missing, as_tuple=True)
                raise KVTransferError(
                    f"KV transfer of {end.request_id!r} is missing {int(missing.sum())} pages "
                    f"(first: layer {int(layers[0])}, block {int(blocks[0]) + inbound.first_block})"
                )
            self._synchronize()
            inbound.closed = True
        with self._lock:
            self._inbound.pop(end.request_id, None)
        seconds = (
            time.perf_counter() - inbound.first_write if inbound.first_write is not None else 0.0
        )
        return TransferSummary(inbound.chunks, inbound.bytes, seconds)

    def discard(self, request_id: str) -> "_Inbound | None":
        """Stop accepting KV for the request. Returns at once (after any gRPC write in flight).

        Returns None when nothing may write into its blocks any more; for a claimed memory lease
        the lease itself, which keeps listening for its writer's notice: free the blocks once
        ``drained`` says so, then call ``end_drain``.
        """
        with self._lock:
            inbound = self._inbound.pop(request_id, None)
            if inbound is None:
                return None
            # Findable by a writer's notice from this moment on (no gap between the two maps).
            self._draining[request_id] = inbound
        with inbound.lock:
            inbound.closed = True
            self._synchronize()
            memory = inbound.transport not in (None, "grpc")
        if not memory:
            self.end_drain(request_id)
            return None
        return inbound

    def _synchronize(self) -> None:
        """Wait for every page copy queued so far, on every rank's device."""
        for stream in self._streams.values():
            stream.synchronize()

    @staticmethod
    def drained(inbound: _Inbound) -> bool:
        """The writer confirmed it stopped, or the lease or its write lease ended."""
        return inbound.stopped.is_set() or _ended(inbound, time.monotonic())

    def end_drain(self, request_id: str) -> None:
        with self._lock:
            self._draining.pop(request_id, None)


def _ended(inbound: _Inbound, now: float) -> bool:
    """The lease, or the memory writer's write lease, has ended."""
    return now >= inbound.expires_at or (
        inbound.write_expires_at is not None and now >= inbound.write_expires_at
    )


def _same_token(expected: str, given: str | None) -> bool:
    """A presented transfer token against the lease's, in constant time. As bytes: comparing
    ``str`` raises TypeError on a non-ASCII token, which a forged notice could send."""
    return hmac.compare_digest(expected.encode(), (given or "").encode("utf-8", "replace"))


def _epoch_of(token: str | None) -> int:
    """The lease epoch a transfer token names (``expect`` makes "<epoch>.<secret>"); 0 when it
    names none (then it opens no lease at all)."""
    head, sep, _ = (token or "").partition(".")
    return int(head) if sep and head.isdecimal() and len(head) < 20 else 0


def page_checksum(pages: torch.Tensor) -> int:
    """The sum of ``pages``' bytes read as 16-bit integers: equal on both sides of a transfer
    exactly when the pages arrived (up to collisions no accident produces)."""
    flat = pages.contiguous().view(-1).view(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return int(flat.view(torch.int16).sum(dtype=torch.int64))
