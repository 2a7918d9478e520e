"""KV sender (prefill pods): streams a request's KV pages to its decode pod during the forward.

The engine calls ``on_layers_computed`` after every layer. At each layer-group boundary the
sender gathers, for every exporting request in the step, the pages of the blocks that this step
completed in those layers (one contiguous gather per chunk, on the device), stages them to the
host and queues them on one of several parallel gRPC streams to the decode pod, so the transfer
overlaps the remaining layers' compute. A block is sent once all its tokens are computed (the
last, partial block at the end of the prompt); blocks the decode pod already caches are skipped.

``finish`` closes the secondary streams, waits for their acknowledgements, then sends the end
message (with the first sampled token) on the primary stream: when it is acknowledged, the
decode pod holds the whole prompt's KV.

Tracing: a traced request's transfer is a ``kv_transfer`` span, from the first chunk queued to
the decode pod's acknowledgement, whose context rides on every PushKV stream's metadata.
"""

import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import torch

from opentelemetry import trace
from opentelemetry.context import Context

from tandem import telemetry
from tandem.engine.kv_cache import KVCacheSpec
from tandem.engine.scheduler import ScheduledSequence
from tandem.errors import InvalidRequest, KVTransferError
from tandem.kv import codec
from tandem.kv.staging import PinnedBufferPool
from tandem.kv.wire import (
    DEFAULT_MAX_CHUNK_BYTES,
    PageLayout,
    blocks_per_chunk,
    chunk_header,
    page_buffer,
)
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2
from tandem.serving.channels import CLIENT_OPTIONS

PUSH_KV_METHOD = "/tandem.decode.v1.DecodeService/PushKV"

logger = logging.getLogger(__name__)

# Each channel gets its own connection, so parallel streams use parallel TCP flows.
CHANNEL_OPTIONS = CLIENT_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
_CLOSE = object()


class ChannelPool:
    """``num_streams`` gRPC channels per decode address, created on first use and kept."""

    def __init__(self, num_streams: int) -> None:
        self.num_streams = num_streams
        self._channels: dict[str, list[grpc.Channel]] = {}
        self._calls: dict[str, list[grpc.StreamUnaryMultiCallable]] = {}
        self._lock = threading.Lock()

    def push_kv(self, address: str) -> list[grpc.StreamUnaryMultiCallable]:
        """PushKV callables (one per channel) that send pre-encoded chunks (``codec``)."""
        with self._lock:
            calls = self._calls.get(address)
            if calls is None:
                channels = [grpc.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(self.num_streams)]
                self._channels[address] = channels
                calls = [
                    c.stream_unary(
                        PUSH_KV_METHOD,
                        request_serializer=codec.encode,
                        response_deserializer=decode_pb2.PushKVResponse.FromString,
                    )
                    for c in channels
                ]
                self._calls[address] = calls
        return calls

    def close(self) -> None:
        with self._lock:
            for channels in self._channels.values():
                for c in channels:
                    c.close()
            self._channels.clear()
            self._calls.clear()


@dataclass(slots=True, frozen=True)
class KVTarget:
    """Where one request's KV goes (from the router's PrefillRequest)."""

    address: str
    request_id: str
    skip_blocks: int
    model_fingerprint: str


@dataclass(slots=True, frozen=True)
class TransferResult:
    bytes: int
    chunks: int
    seconds: float


class _Chunk:
    """A queued chunk: encoded by the stream's sending thread, or dropped if the stream ends.

    Invariant: ``release`` (which returns the staging buffer) runs exactly once, on whichever
    path takes the chunk off the queue -- encoding it, or draining a stream that ended.
    """

    __slots__ = ("_encode", "_release", "_done")

    def __init__(self, encode: Callable[[], bytes], release: Callable[[], None]) -> None:
        self._encode, self._release, self._done = encode, release, False

    def encode(self) -> bytes:
        try:
            return self._encode()
        finally:
            self.release()

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._release()


@dataclass(slots=True)
class _Stream:
    queue: "queue.SimpleQueue[object]" = field(default_factory=queue.SimpleQueue)
    call: grpc.Future | None = None

    def drain(self) -> None:
        """Release every chunk still queued (the call ended: nobody will send them)."""
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Chunk):
                item.release()


class KVTransfer:
    """One request's outgoing KV: chunks queued by the engine thread, sent by gRPC's threads."""

    def __init__(
        self, target: KVTarget, num_prompt_blocks: int, push_calls, fingerprint: str, timeout_s: float,
        trace_context: Context | None = None,
    ) -> None:
        self.target = target
        self.num_prompt_blocks = num_prompt_blocks
        self.sent_blocks = 0
        """Blocks already queued for every layer."""
        self.fingerprint = fingerprint
        self._push_calls = push_calls
        self._timeout_s = timeout_s
        self._streams = [_Stream() for _ in push_calls]
        self.chunks = 0
        self.bytes = 0
        self.started: float | None = None
        self._trace_context = trace_context
        self._span: trace.Span | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()
        # Streams open lazily (the first chunk, or the end message); ``cancel`` can come from
        # another thread at any time, and no stream may open after it.
        self._lock = threading.Lock()
        self._cancelled = False

    @property
    def failed(self) -> bool:
        """A stream ended before the transfer did: the rest would go nowhere."""
        return any(s.call is not None and s.call.done() for s in self._streams)

    def _begin(self) -> None:
        """The first chunk (or the end message) is about to go: the transfer starts now."""
        self.started = time.perf_counter()
        if self._trace_context is not None:
            self._span = telemetry.tracer().start_span("kv_transfer", context=self._trace_context, attributes={
                "tandem.kv.target": self.target.address,
                "tandem.kv.skip_blocks": self.target.skip_blocks,
                "tandem.kv.streams": len(self._streams),
            })
            self._metadata = telemetry.outgoing_metadata(context=trace.set_span_in_context(self._span))

    def _end_span(self, error: str | None = None) -> None:
        with self._lock:
            span, self._span = self._span, None
        if span is None:
            return
        seconds = time.perf_counter() - self.started
        span.set_attributes({
            "tandem.kv.bytes": self.bytes, "tandem.kv.chunks": self.chunks, "tandem.kv.seconds": seconds,
            "tandem.kv.gbps": self.bytes / seconds / 1e9 if seconds > 0 else 0.0,
        })
        if error is not None:
            span.set_status(trace.StatusCode.ERROR, error)
        span.end()

    def _open(self, i: int) -> bool:
        """Open stream ``i``; False if the transfer was cancelled (then nothing opens)."""
        stream = self._streams[i]
        with self._lock:
            if self._cancelled:
                return False
            stream.call = self._push_calls[i].future(
                self._messages(stream.queue), timeout=self._timeout_s, metadata=self._metadata
            )
        stream.call.add_done_callback(lambda _: stream.drain())
        return True

    @staticmethod
    def _messages(q: "queue.SimpleQueue[object]") -> Iterator[bytes | decode_pb2.PushKVRequest]:
        while (item := q.get()) is not _CLOSE:
            yield item.encode() if isinstance(item, _Chunk) else item

    def submit(self, encode: Callable[[int], bytes], release: Callable[[], None], nbytes: int) -> None:
        """Queue a chunk; ``encode(sequence_number)`` runs on a sending thread, then ``release``."""
        if self.started is None:
            self._begin()
        i = self.chunks % len(self._streams)
        stream = self._streams[i]
        if stream.call is None and not self._open(i):
            release()  # cancelled: the chunk goes nowhere, its buffer goes back
            return
        seq_no = self.chunks // len(self._streams)
        stream.queue.put(_Chunk(lambda: encode(seq_no), release))
        if stream.call.done():
            stream.drain()  # it ended after the check in on_layers_computed: do not strand the chunk
        self.chunks += 1
        self.bytes += nbytes

    def finish(self, end: common_pb2.KVTransferEnd) -> TransferResult:
        """Close every stream (end message last, on the primary); blocks until acknowledged."""
        if self.started is None:
            self._begin()  # nothing to send but the end message (the decode pod caches it all)
        try:
            for stream in self._streams[1:]:
                if stream.call is not None:
                    stream.queue.put(_CLOSE)
                    stream.call.result()
            primary = self._streams[0]
            if primary.call is None and not self._open(0):
                raise grpc.FutureCancelledError()
            end.total_chunks = self.chunks
            primary.queue.put(decode_pb2.PushKVRequest(end=end))
            primary.queue.put(_CLOSE)
            primary.call.result()
        except grpc.FutureCancelledError as e:
            self._end_span("cancelled")
            self.cancel()
            raise KVTransferError(f"the KV transfer to {self.target.address} was cancelled") from e
        except grpc.RpcError as e:
            error = f"KV push to {self.target.address} failed: {e.code().name}: {e.details()}"
            self._end_span(error)
            self.cancel()
            raise KVTransferError(error) from e
        result = TransferResult(self.bytes, self.chunks, time.perf_counter() - self.started)
        self._end_span()
        return result

    def cancel(self) -> None:
        """Stop every stream; queued chunks are released by the calls' done callbacks."""
        with self._lock:
            self._cancelled = True
        if self.started is not None:
            self._end_span("cancelled")
        for stream in self._streams:
            if stream.call is not None:
                stream.queue.put(_CLOSE)
                stream.call.cancel()
                stream.drain()


class KVSender:
    """The prefill engine's ``KVLayerHook``: decides what to send after each layer group."""

    def __init__(
        self,
        spec: KVCacheSpec,
        fingerprint: str,
        *,
        layers_per_group: int = 4,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        num_streams: int = 2,
        push_timeout_s: float = 300.0,
        staging_buffers: int = 64,
        device: torch.device,
    ) -> None:
        self.layout = PageLayout(spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim, spec.dtype)
        per_block_layer = self.layout.bytes_per_block_layer
        if per_block_layer > max_chunk_bytes:
            raise ValueError(
                f"one KV block of one layer is {per_block_layer} bytes, more than the "
                f"{max_chunk_bytes}-byte chunk limit; raise the chunk size"
            )
        self.fingerprint = fingerprint
        # A chunk must hold at least one block of every layer of a group: shrink the group if not.
        fitting = max_chunk_bytes // per_block_layer
        self.layers_per_group = max(1, min(layers_per_group, spec.num_layers, fitting))
        if self.layers_per_group < layers_per_group:
            logger.info("KV layer groups of %d layers (%d do not fit %d-byte chunks)",
                        self.layers_per_group, layers_per_group, max_chunk_bytes)
        self.max_chunk_bytes = max_chunk_bytes
        self.push_timeout_s = push_timeout_s
        self.channels = ChannelPool(num_streams)
        self.device = device
        self._transfers: dict[str, KVTransfer] = {}
        self._finishing: dict[str, KVTransfer] = {}
        self._finisher = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="kv-finish")
        # Chunk-sized host buffers, reused: pinned on CUDA (asynchronous copies), plain on CPU
        # (the gather writes straight into them instead of into a fresh allocation per chunk).
        self.staging = PinnedBufferPool(max_chunk_bytes, staging_buffers, pin_memory=device.type == "cuda")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(
        self, request_id: str, target: KVTarget, num_prompt_tokens: int, trace_context: Context | None = None
    ) -> KVTransfer:
        """Register a request's transfer before the engine schedules it.

        ``trace_context``: the request's trace (its ``kv_transfer`` span goes there), if traced.

        Raises:
            InvalidRequest: a transfer for ``request_id`` is already in progress.
        """
        if request_id in self._transfers or request_id in self._finishing:
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        num_blocks = -(-num_prompt_tokens // self.layout.block_size)
        transfer = KVTransfer(
            target, num_blocks, self.channels.push_kv(target.address), self.fingerprint, self.push_timeout_s,
            trace_context,
        )
        transfer.sent_blocks = min(target.skip_blocks, num_blocks)
        self._transfers[request_id] = transfer
        return transfer

    def finish(
        self, request_id: str, end: common_pb2.KVTransferEnd
    ) -> "concurrent.futures.Future[TransferResult]":
        """Send the end message once everything queued is acknowledged (runs off the engine thread)."""
        transfer = self._transfers.pop(request_id)
        self._finishing[request_id] = transfer

        def run() -> TransferResult:
            try:
                return transfer.finish(end)
            finally:
                self._finishing.pop(request_id, None)

        return self._finisher.submit(run)

    def abort(self, request_id: str) -> None:
        """Cancel a request's transfer, finishing or not; its staged chunks are released."""
        for table in (self._transfers, self._finishing):
            transfer = table.pop(request_id, None)
            if transfer is not None:
                transfer.cancel()

    def close(self) -> None:
        for rid in list(self._transfers) + list(self._finishing):
            self.abort(rid)
        self._finisher.shutdown(wait=False, cancel_futures=True)
        self.channels.close()

    # ---- the layer hook ---------------------------------------------------------------------

    def on_layers_computed(
        self, scheduled: list[ScheduledSequence], num_layers_done: int, kv_cache: torch.Tensor
    ) -> None:
        if not self._transfers:
            return
        total = self.layout.num_layers
        if num_layers_done % self.layers_per_group and num_layers_done != total:
            return
        l0 = ((num_layers_done - 1) // self.layers_per_group) * self.layers_per_group
        for s in scheduled:
            transfer = self._transfers.get(s.seq.request_id)
            if transfer is None or transfer.failed:
                continue  # not exported, or its decode pod stopped listening: stop spending on it
            # Blocks whose every token is computed after this step (all of them at the end).
            done = transfer.num_prompt_blocks if s.samples else (s.start + s.num_new_tokens) // self.layout.block_size
            if done > transfer.sent_blocks:
                self._send(transfer, s.block_ids, (l0, num_layers_done), transfer.sent_blocks, done, kv_cache)
            if num_layers_done == total:
                transfer.sent_blocks = max(transfer.sent_blocks, done)

    def _send(self, transfer: KVTransfer, block_ids, layers: tuple[int, int], b0: int, b1: int, kv) -> None:
        step = blocks_per_chunk(self.layout, layers[1] - layers[0], self.max_chunk_bytes)
        ids = torch.tensor(block_ids[b0:b1], dtype=torch.long, device=kv.device)
        rid, fp = transfer.target.request_id, self.fingerprint
        group = kv[layers[0] : layers[1]]
        for start in range(b0, b1, step):
            end = min(b1, start + step)
            wait, release, nbytes = self._stage(group, ids[start - b0 : end - b0])

            def encode(seq_no: int, wait=wait, blocks=(start, end)) -> bytes:
                host = wait()
                return codec.encode_chunk(chunk_header(rid, fp, seq_no, layers, blocks, host), page_buffer(host))

            transfer.submit(encode, release, nbytes)

    def _stage(self, group: torch.Tensor, ids: torch.Tensor):
        """Gather pages ``group[:, :, ids]`` towards the host.

        Returns (wait for the host pages, release their buffer, bytes). Never blocks: with every
        buffer in flight, it copies into fresh memory instead of stalling the engine thread.
        """
        shape = (group.shape[0], 2, len(ids), *group.shape[3:])
        nbytes = math.prod(shape) * group.element_size()
        buf = self.staging.acquire()
        if buf is None:
            host = group.index_select(2, ids).cpu()
            return (lambda: host), (lambda: None), nbytes
        host = buf[:nbytes].view(group.dtype).view(shape)
        release = lambda: self.staging.release(buf)  # noqa: E731
        if self._copy_stream is None:
            torch.index_select(group, 2, ids, out=host)  # CPU: one gather, straight into the buffer
            return (lambda: host), release, nbytes
        pages = group.index_select(2, ids)  # on the device, in the compute stream
        self._copy_stream.wait_stream(torch.cuda.current_stream(group.device))
        with torch.cuda.stream(self._copy_stream):
            pages.record_stream(self._copy_stream)
            host.copy_(pages, non_blocking=True)
            event = torch.cuda.Event()
            event.record()

        def wait() -> torch.Tensor:
            event.synchronize()
            return host

        return wait, release, nbytes
