"""KV receiver (decode pods): writes pushed KV chunks into a request's reserved blocks.

Every chunk is validated against the reservation before it touches the pool (wire.py), and
every region may be written once: duplicates and overlaps are refused. A transfer completes only
when the sender's end message arrives, the chunk count matches, and every (layer, block) of the
expected range has arrived. ``discard`` waits for an in-flight write, so once it returns the
reserved blocks may be freed and reused safely.
"""

import threading
import time
from dataclasses import dataclass, field

import torch

from tandem.api.errors import KVTransferError
from tandem.engine.kv_cache import KVCacheSpec
from tandem.engine.uploads import upload
from tandem.proto.common.v1 import common_pb2
from tandem.transfer.wire import (
    DEFAULT_MAX_CHUNK_BYTES,
    PageLayout,
    check_fingerprint,
    validate_chunk,
)


@dataclass(slots=True)
class _Inbound:
    block_ids: torch.Tensor
    first_block: int
    received: torch.Tensor
    """[layers, blocks] bool: which pages have been written."""
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


class KVReceiver:
    def __init__(
        self,
        pool: torch.Tensor,
        spec: KVCacheSpec,
        fingerprint: str,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        engine_event: "torch.cuda.Event | None" = None,
    ) -> None:
        """
        Args:
            pool: the engine's KV pool (``PagedKVCache.tensor``): in the engine's process, or
                shared with it (shared memory on CPU, CUDA IPC on GPUs: a pod's engine core).
            engine_event: on a GPU pool shared across processes, an event the engine records on
                its stream whenever it hands out blocks (``expect`` then cannot record one on
                the engine's stream itself). ``expect`` pins its latest record, which is that
                reservation's or a later one: waiting for it is waiting long enough.
        """
        self.kv = pool
        self.layout = PageLayout(
            spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim, spec.dtype
        )
        self.fingerprint = fingerprint
        self.max_chunk_bytes = max_chunk_bytes
        self._engine_event = engine_event
        self._inbound: dict[str, _Inbound] = {}
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.kv.device) if self.kv.is_cuda else None

    def expect(self, request_id: str, block_ids: list[int], first_block: int) -> None:
        """Accept chunks for ``request_id``'s blocks ``[first_block, len(block_ids))``."""
        inbound = _Inbound(
            block_ids=upload(torch.tensor(block_ids, dtype=torch.long), self.kv.device),
            first_block=first_block,
            received=torch.zeros((self.layout.num_layers, len(block_ids)), dtype=torch.bool),
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

    def expects(self, request_id: str) -> bool:
        return request_id in self._inbound

    def _get(self, request_id: str) -> _Inbound:
        inbound = self._inbound.get(request_id)
        if inbound is None:
            raise KVTransferError(f"no KV reservation for request {request_id!r} on this pod")
        return inbound

    def write(self, chunk: common_pb2.KVChunk, data) -> int:
        """Validate one chunk (header and payload) and copy its pages into the reserved blocks.

        Returns the payload's size in bytes.
        """
        inbound = self._get(chunk.request_id)
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
            region = inbound.received[l0:l1, b0:b1]
            if bool(region.any()):
                raise KVTransferError(
                    f"KV chunk layers [{l0}, {l1}) blocks [{b0}, "
                    f"{b1}) overlaps pages already received"
                )
            if self._stream is not None:
                self._stream.wait_event(inbound.engine_done)
                with torch.cuda.stream(self._stream):
                    self.kv[l0:l1, :, inbound.block_ids[b0:b1]] = pages.to(
                        self.kv.device, non_blocking=True
                    )
            else:
                self.kv[l0:l1, :, inbound.block_ids[b0:b1]] = pages
            region.fill_(True)
            if inbound.first_write is None:
                inbound.first_write = time.perf_counter()
            inbound.chunks += 1
            nbytes = pages.numel() * pages.element_size()
            inbound.bytes += nbytes
        return nbytes

    def complete(self, end: common_pb2.KVTransferEnd) -> TransferSummary:
        """Check that the whole transfer arrived; afterwards the blocks hold the prompt's KV."""
        check_fingerprint(end.model_fingerprint, self.fingerprint)
        inbound = self._get(end.request_id)
        with inbound.lock:
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
            if self._stream is not None:
                self._stream.synchronize()
            inbound.closed = True
        with self._lock:
            self._inbound.pop(end.request_id, None)
        seconds = (
            time.perf_counter() - inbound.first_write if inbound.first_write is not None else 0.0
        )
        return TransferSummary(inbound.chunks, inbound.bytes, seconds)

    def discard(self, request_id: str) -> None:
        """Stop accepting KV for the request; returns once no write into its blocks is running."""
        with self._lock:
            inbound = self._inbound.pop(request_id, None)
        if inbound is None:
            return
        with inbound.lock:
            inbound.closed = True
            if self._stream is not None:
                self._stream.synchronize()
