"""One request's outgoing KV transfer: its chunks queued by the engine thread, sent over
parallel PushKV streams by gRPC's threads, and the end message once every chunk is acknowledged.

``KVSender`` (sender.py) decides what to send and stages the pages; a ``KVTransfer`` owns the
streams of one request: it opens them lazily (never after a cancel), releases every staged
buffer exactly once whatever happens to a stream, and records the ``kv_transfer`` span.
"""

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from tandem import telemetry
from tandem.api.errors import KVTransferError
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2
from tandem.transfer.transport import PoolDescriptor

_CLOSE = object()

PRIMARY_STREAM = ("tandem-kv-stream", "primary")
"""Metadata of the stream that carries a transfer's end message: the decode pod fails the
request when that stream ends without it (a cancel may reach the server as an ordinary end)."""


@dataclass(slots=True, frozen=True)
class KVTarget:
    """Where one request's KV goes (from the router's PrefillRequest)."""

    address: str
    request_id: str
    skip_blocks: int
    model_fingerprint: str
    transfer_token: str = ""
    """The decode pod's lease token for the reserved blocks (sent with every chunk)."""
    transport: str = "grpc"
    descriptor: "PoolDescriptor | None" = None
    """Memory transports: the decode pod's pool (``DescribeKV``)."""
    block_ids: tuple[int, ...] = ()
    """Memory transports: the reserved blocks' ids in the decode pod's pool."""
    lease_expires_unix_ms: int = 0
    incarnation: str = ""
    """The decode pod's incarnation (its pool mappings are valid for it only)."""
    checksum: bool = False
    """Memory transports: send a checksum of the pages with the completion notice."""


@dataclass(slots=True, frozen=True)
class TransferResult:
    bytes: int
    chunks: int
    seconds: float
    transport: str = "grpc"


def end_transfer_span(
    span: "trace.Span | None", nbytes: int, chunks: int, started: float | None, error: str | None
) -> None:
    """End a ``kv_transfer`` span with what moved and how fast (any transport)."""
    if span is None:
        return
    seconds = time.perf_counter() - (started or time.perf_counter())
    span.set_attributes(
        {
            "tandem.kv.bytes": nbytes,
            "tandem.kv.chunks": chunks,
            "tandem.kv.seconds": seconds,
            "tandem.kv.gbps": nbytes / seconds / 1e9 if seconds > 0 else 0.0,
        }
    )
    if error is not None:
        span.set_status(trace.StatusCode.ERROR, error)
    span.end()


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
        """Release every chunk still queued (the call ended: nobody will send them). A close
        marker stays queued: the thread feeding the call may still be waiting for it."""
        closed = False
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Chunk):
                item.release()
            elif item is _CLOSE:
                closed = True
        if closed:
            self.queue.put(_CLOSE)


class KVTransfer:
    """One request's outgoing KV: chunks queued by the engine thread, sent by gRPC's threads."""

    def __init__(
        self,
        target: KVTarget,
        num_prompt_blocks: int,
        push_calls,
        fingerprint: str,
        timeout_s: float,
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
            self._span = telemetry.tracer().start_span(
                "kv_transfer",
                context=self._trace_context,
                attributes={
                    "tandem.kv.target": self.target.address,
                    "tandem.kv.transport": "grpc",
                    "tandem.kv.skip_blocks": self.target.skip_blocks,
                    "tandem.kv.streams": len(self._streams),
                },
            )
            self._metadata = telemetry.outgoing_metadata(
                context=trace.set_span_in_context(self._span)
            )

    def _end_span(self, error: str | None = None) -> None:
        with self._lock:
            span, self._span = self._span, None
        end_transfer_span(span, self.bytes, self.chunks, self.started, error)

    def _open(self, i: int) -> bool:
        """Open stream ``i``; False if the transfer was cancelled (then nothing opens)."""
        stream = self._streams[i]
        with self._lock:
            if self._cancelled:
                return False
            metadata = (*self._metadata, PRIMARY_STREAM) if i == 0 else self._metadata
            stream.call = self._push_calls[i].future(
                self._messages(stream.queue), timeout=self._timeout_s, metadata=metadata
            )
        stream.call.add_done_callback(lambda _: stream.drain())
        return True

    @staticmethod
    def _messages(q: "queue.SimpleQueue[object]") -> Iterator[bytes | decode_pb2.PushKVRequest]:
        while (item := q.get()) is not _CLOSE:
            yield item.encode() if isinstance(item, _Chunk) else item

    def submit(
        self, encode: Callable[[int], bytes], release: Callable[[], None], nbytes: int
    ) -> None:
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
            # it ended after the check in on_layers_computed: do not strand the chunk
            stream.drain()
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
            end.transfer_token = end.transfer_token or self.target.transfer_token
            end.transport = "grpc"
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
        """Stop every stream at once; queued chunks are released.

        The call is cancelled before its request stream is closed: closed first, the decode pod
        could see a stream's ordinary end (as of a secondary stream) rather than a cancel, and
        wait for the rest of the transfer until its KV timeout instead of failing at once.
        """
        with self._lock:
            self._cancelled = True
        if self.started is not None:
            self._end_span("cancelled")
        for stream in self._streams:
            if stream.call is not None:
                stream.call.cancel()
                stream.drain()
                stream.queue.put(_CLOSE)  # ends the thread feeding the call, if it still waits
