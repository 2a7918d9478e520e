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
"""

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import torch

from tandem.engine.kv_cache import KVCacheSpec
from tandem.engine.scheduler import ScheduledSequence
from tandem.errors import KVTransferError
from tandem.kv import codec
from tandem.kv.staging import PinnedBufferPool
from tandem.kv.wire import (
    DEFAULT_MAX_CHUNK_BYTES,
    GRPC_MAX_MESSAGE_BYTES,
    PageLayout,
    blocks_per_chunk,
    chunk_header,
    page_buffer,
)
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2

PUSH_KV_METHOD = "/tandem.decode.v1.DecodeService/PushKV"

logger = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    # Each channel gets its own connection, so parallel streams use parallel TCP flows.
    ("grpc.use_local_subchannel_pool", 1),
]
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


@dataclass(slots=True)
class _Stream:
    queue: "queue.SimpleQueue[object]" = field(default_factory=queue.SimpleQueue)
    call: grpc.Future | None = None


class KVTransfer:
    """One request's outgoing KV: chunks queued by the engine thread, sent by gRPC's threads."""

    def __init__(self, target: KVTarget, num_prompt_blocks: int, push_calls, fingerprint: str) -> None:
        self.target = target
        self.num_prompt_blocks = num_prompt_blocks
        self.sent_blocks = 0
        """Blocks already queued for every layer."""
        self.fingerprint = fingerprint
        self._push_calls = push_calls
        self._streams = [_Stream() for _ in push_calls]
        self.chunks = 0
        self.bytes = 0
        self.started: float | None = None
        self._open(0)  # the primary stream always exists: it carries the end message

    def _open(self, i: int) -> None:
        stream = self._streams[i]
        stream.call = self._push_calls[i].future(self._messages(stream.queue))

    @staticmethod
    def _messages(q: "queue.SimpleQueue[object]") -> Iterator[bytes | decode_pb2.PushKVRequest]:
        while (item := q.get()) is not _CLOSE:
            yield item() if callable(item) else item

    def submit(self, build: Callable[[int], bytes], nbytes: int) -> None:
        """Queue a chunk; ``build(sequence_number)`` encodes it on a sending thread."""
        if self.started is None:
            self.started = time.perf_counter()
        i = self.chunks % len(self._streams)
        stream = self._streams[i]
        if stream.call is None:
            self._open(i)
        seq_no = self.chunks // len(self._streams)
        stream.queue.put(lambda: build(seq_no))
        self.chunks += 1
        self.bytes += nbytes

    def finish(self, end: common_pb2.KVTransferEnd) -> TransferResult:
        """Close every stream (end message last, on the primary); blocks until acknowledged."""
        try:
            for stream in self._streams[1:]:
                if stream.call is not None:
                    stream.queue.put(_CLOSE)
                    stream.call.result()
            primary = self._streams[0]
            end.total_chunks = self.chunks
            primary.queue.put(decode_pb2.PushKVRequest(end=end))
            primary.queue.put(_CLOSE)
            primary.call.result()
        except grpc.RpcError as e:
            self.cancel()
            raise KVTransferError(f"KV push to {self.target.address} failed: {e.code().name}: {e.details()}") from e
        started = self.started if self.started is not None else time.perf_counter()
        return TransferResult(self.bytes, self.chunks, time.perf_counter() - started)

    def cancel(self) -> None:
        for stream in self._streams:
            if stream.call is not None:
                stream.queue.put(_CLOSE)
                stream.call.cancel()


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
        device: torch.device,
    ) -> None:
        self.layout = PageLayout(spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim, spec.dtype)
        self.fingerprint = fingerprint
        self.layers_per_group = max(1, min(layers_per_group, spec.num_layers))
        self.max_chunk_bytes = max_chunk_bytes
        self.channels = ChannelPool(num_streams)
        self.device = device
        self._transfers: dict[str, KVTransfer] = {}
        self._finisher = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-finish")
        self._staging = PinnedBufferPool(max_chunk_bytes) if device.type == "cuda" else None
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, request_id: str, target: KVTarget, num_prompt_tokens: int) -> KVTransfer:
        """Register a request's transfer before the engine schedules it."""
        num_blocks = -(-num_prompt_tokens // self.layout.block_size)
        transfer = KVTransfer(target, num_blocks, self.channels.push_kv(target.address), self.fingerprint)
        transfer.sent_blocks = min(target.skip_blocks, num_blocks)
        self._transfers[request_id] = transfer
        return transfer

    def finish(
        self, request_id: str, end: common_pb2.KVTransferEnd
    ) -> "concurrent.futures.Future[TransferResult]":
        """Send the end message once everything queued is acknowledged (runs off the engine thread)."""
        transfer = self._transfers.pop(request_id)
        return self._finisher.submit(transfer.finish, end)

    def abort(self, request_id: str) -> None:
        transfer = self._transfers.pop(request_id, None)
        if transfer is not None:
            transfer.cancel()

    def close(self) -> None:
        for rid in list(self._transfers):
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
            if transfer is None:
                continue
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
        for start in range(b0, b1, step):
            end = min(b1, start + step)
            pages = kv[layers[0] : layers[1], :, ids[start - b0 : end - b0]]  # one gather, contiguous
            wait, release = self._stage(pages)

            def build(seq_no: int, wait=wait, release=release, blocks=(start, end)) -> bytes:
                try:
                    host = wait()
                    header = chunk_header(rid, fp, seq_no, layers, blocks, host)
                    return codec.encode_chunk(header, page_buffer(host))
                finally:
                    release()

            transfer.submit(build, pages.numel() * pages.element_size())

    def _stage(self, pages: torch.Tensor) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
        """Start moving pages to the host. Returns (wait for the host pages, release them)."""
        if self._staging is None:
            return (lambda: pages), (lambda: None)  # CPU: the gather already made a private copy
        nbytes = pages.numel() * pages.element_size()
        buf = self._staging.acquire()
        self._copy_stream.wait_stream(torch.cuda.current_stream(pages.device))
        with torch.cuda.stream(self._copy_stream):
            pages.record_stream(self._copy_stream)
            host = buf[:nbytes].view(pages.dtype).view(pages.shape)
            host.copy_(pages, non_blocking=True)
            event = torch.cuda.Event()
            event.record()

        def wait() -> torch.Tensor:
            event.synchronize()
            return host

        return wait, lambda: self._staging.release(buf)
