"""KV sender (prefill pods): streams a request's KV pages to its decode pod during the forward.

The engine calls ``on_layers_computed`` after every layer. At each layer-group boundary the
sender gathers, for every exporting request in the step, the pages of the blocks that this step
completed in those layers (one contiguous gather per chunk, on the device), stages them to the
host and queues them on one of several parallel gRPC streams to the decode pod, so the transfer
overlaps the remaining layers' compute. A block is sent once all its tokens are computed (the
last, partial block at the end of the prompt); blocks the decode pod already caches are skipped.

Each request's streams belong to its ``KVTransfer`` (transfer.py): ``finish`` closes the
secondary streams, waits for their acknowledgements, then sends the end message (with the first
sampled token) on the primary stream: when it is acknowledged, the decode pod holds the whole
prompt's KV.

Memory transports (``MemoryTransfer``, memory_push.py) write into the decode pod's pool
instead; the sender's one ``LeaseRenewer`` thread keeps their write leases alive (``RenewKV``).

Tracing: a traced request's transfer is a ``kv_transfer`` span, from the first chunk queued to
the decode pod's acknowledgement, whose context rides on every PushKV stream's metadata.
"""

import concurrent.futures
import logging
import math
import threading

import grpc
import numpy as np
import torch
from opentelemetry.context import Context

from tandem.api import cluster_auth
from tandem.api.channel_options import CLIENT_OPTIONS
from tandem.api.errors import InvalidRequest, KVTransferError
from tandem.engine.kv_cache import KVCacheSpec
from tandem.engine.parallel.kv_pages import layer_group
from tandem.engine.scheduler import ScheduledSequence
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2
from tandem.transfer import codec
from tandem.transfer.memory_push import LeaseRenewer, MemoryTransfer
from tandem.transfer.push_streams import KVTarget, KVTransfer, TransferResult
from tandem.transfer.staging import PinnedBufferPool
from tandem.transfer.transport import PoolWriter, TransportUnavailable, open_writer
from tandem.transfer.wire import (
    DEFAULT_MAX_CHUNK_BYTES,
    PageLayout,
    blocks_per_chunk,
    chunk_header,
    page_buffer,
)

PUSH_KV_METHOD = "/tandem.decode.v1.DecodeService/PushKV"
COMPLETE_KV_METHOD = "/tandem.decode.v1.DecodeService/CompleteKV"
RENEW_KV_METHOD = "/tandem.decode.v1.DecodeService/RenewKV"

logger = logging.getLogger(__name__)

# Each channel gets its own connection, so parallel streams use parallel TCP flows.
CHANNEL_OPTIONS = CLIENT_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]


class ChannelPool:
    """``num_streams`` gRPC channels per decode address, created on first use and kept."""

    def __init__(self, num_streams: int) -> None:
        self.num_streams = num_streams
        self._channels: dict[str, list[grpc.Channel]] = {}
        self._calls: dict[str, list[grpc.StreamUnaryMultiCallable]] = {}
        self._complete: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        self._renew: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        self._lock = threading.Lock()

    def push_kv(self, address: str) -> list[grpc.StreamUnaryMultiCallable]:
        """PushKV callables (one per channel) that send pre-encoded chunks (``codec``)."""
        with self._lock:
            calls = self._calls.get(address)
            if calls is None:
                channels = [
                    cluster_auth.channel(address, CHANNEL_OPTIONS) for _ in range(self.num_streams)
                ]
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

    def _control(self, address: str) -> grpc.Channel:
        """The channel of a decode pod's control calls (CompleteKV, RenewKV); holding the lock."""
        channels = self._channels.setdefault(address + "#control", [])
        if not channels:
            channels.append(cluster_auth.channel(address, CLIENT_OPTIONS))
        return channels[0]

    def renew_kv(self, address: str) -> grpc.UnaryUnaryMultiCallable:
        """``RenewKV`` of a decode pod (a memory transfer's write lease)."""
        with self._lock:
            call = self._renew.get(address)
            if call is None:
                call = self._control(address).unary_unary(
                    RENEW_KV_METHOD,
                    request_serializer=decode_pb2.RenewKVRequest.SerializeToString,
                    response_deserializer=decode_pb2.RenewKVResponse.FromString,
                )
                self._renew[address] = call
        return call

    def complete_kv(self, address: str) -> grpc.UnaryUnaryMultiCallable:
        """``CompleteKV`` of a decode pod (memory transports' one notice per transfer)."""
        with self._lock:
            call = self._complete.get(address)
            if call is None:
                call = self._control(address).unary_unary(
                    COMPLETE_KV_METHOD,
                    request_serializer=lambda end: decode_pb2.CompleteKVRequest(
                        end=end
                    ).SerializeToString(),
                    response_deserializer=decode_pb2.CompleteKVResponse.FromString,
                )
                self._complete[address] = call
        return call

    def close(self) -> None:
        with self._lock:
            self._complete.clear()
            self._renew.clear()
            for channels in self._channels.values():
                for c in channels:
                    c.close()
            self._channels.clear()
            self._calls.clear()


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
        memory_transports: bool = True,
    ) -> None:
        """
        Args:
            spec: the pages as transfers carry them: every kv head of the model.
            memory_transports: whether transfers may copy straight from this engine's pool
                (``attach_pool``). False for a tensor-parallel engine: its pool holds one
                rank's heads, so its pages go over gRPC, gathered onto rank 0 each step.
        """
        self.layout = PageLayout(
            spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim, spec.dtype
        )
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
            logger.info(
                "KV layer groups of %d layers (%d do not fit %d-byte chunks)",
                self.layers_per_group,
                layers_per_group,
                max_chunk_bytes,
            )
        self.max_chunk_bytes = max_chunk_bytes
        self.push_timeout_s = push_timeout_s
        self.channels = ChannelPool(num_streams)
        self.device = device
        self.memory_transports = memory_transports
        self._transfers: dict[str, KVTransfer] = {}
        self._finishing: dict[str, KVTransfer] = {}
        self._finisher = concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix="kv-finish"
        )
        # Chunk-sized host buffers, reused: pinned on CUDA (asynchronous copies), plain on CPU
        # (the gather writes straight into them instead of into a fresh allocation per chunk).
        self.staging = PinnedBufferPool(
            max_chunk_bytes, staging_buffers, pin_memory=device.type == "cuda"
        )
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool: torch.Tensor | None = None
        """This engine's KV pool (``attach_pool``): what memory transports copy from."""
        self._writers: dict[tuple[str, str], PoolWriter] = {}
        self.renewer = LeaseRenewer(self.channels.renew_kv)
        """Keeps live memory transfers' write leases (``RenewKV``)."""

    def attach_pool(self, pool: torch.Tensor) -> None:
        self.pool = pool

    def start(
        self,
        request_id: str,
        target: KVTarget,
        num_prompt_tokens: int,
        trace_context: Context | None = None,
    ) -> KVTransfer:
        """Register a request's transfer before the engine schedules it.

        ``trace_context``: the request's trace (its ``kv_transfer`` span goes there), if traced.

        Raises:
            InvalidRequest: a transfer for ``request_id`` is already in progress.
            TransportUnavailable: a memory transport, on an engine that cannot use one.
        """
        if request_id in self._transfers or request_id in self._finishing:
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        if target.transport != "grpc" and not self.memory_transports:
            raise TransportUnavailable(
                f"{target.transport}: this tensor-parallel engine sends KV over grpc only"
            )
        num_blocks = -(-num_prompt_tokens // self.layout.block_size)
        if target.transport == "grpc":
            transfer = KVTransfer(
                target,
                num_blocks,
                self.channels.push_kv(target.address),
                self.fingerprint,
                self.push_timeout_s,
                trace_context,
            )
        else:
            transfer = MemoryTransfer(
                target,
                num_blocks,
                self._writer(target),
                self.channels.complete_kv(target.address),
                self.push_timeout_s,
                trace_context,
            )
            self.renewer.add(transfer)
        transfer.sent_blocks = min(target.skip_blocks, num_blocks)
        self._transfers[request_id] = transfer
        return transfer

    def _writer(self, target: KVTarget) -> PoolWriter:
        """The mapping of ``target``'s decode pod pool, made once per pod incarnation; a new
        incarnation at the same address drops the old mappings (that pod restarted).

        Raises:
            TransportUnavailable: it cannot be mapped from here.
        """
        key = (target.address, target.incarnation)
        writer = self._writers.get(key)
        if writer is not None and not writer.broken:
            return writer
        for old in [k for k in self._writers if k[0] == target.address]:
            self._drop_writer(old)
        if target.descriptor is None:
            raise TransportUnavailable(f"no {target.transport} descriptor for {target.address}")
        writer = open_writer(target.descriptor, self.pool)
        self._writers[key] = writer
        return writer

    def notify_abort(self, target: KVTarget) -> None:
        """Tell a decode pod that a claimed memory transfer will not write (off this thread)."""
        end = common_pb2.KVTransferEnd(
            request_id=target.request_id,
            model_fingerprint=target.model_fingerprint,
            transfer_token=target.transfer_token,
            transport=target.transport,
            aborted=True,
        )
        call = self.channels.complete_kv(target.address)

        def send() -> None:
            try:
                call(end, timeout=5.0)
            except grpc.RpcError:
                pass  # the lease's end frees the blocks

        self._finisher.submit(send)

    def _drop_writer(self, key) -> None:
        writer = self._writers.pop(key, None)
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - a dead pod's mapping: nothing more to do
                logger.warning("closing the KV pool mapping of %s failed", key[0], exc_info=True)

    def finish(
        self, request_id: str, end: common_pb2.KVTransferEnd
    ) -> "concurrent.futures.Future[TransferResult]":
        """Send the end message once everything queued is acknowledged (runs off the engine
        thread)."""
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
                if isinstance(transfer, MemoryTransfer) and table is self._transfers:
                    # Off the engine thread: wait for copies in flight, then free the blocks.
                    self._finisher.submit(transfer.abort_notice)

    def close(self) -> None:
        memory = [
            t
            for t in list(self._transfers.values()) + list(self._finishing.values())
            if isinstance(t, MemoryTransfer)
        ]
        for rid in list(self._transfers) + list(self._finishing):
            self.abort(rid)
        self._finisher.shutdown(wait=False, cancel_futures=True)
        for transfer in memory:  # here, not queued: the pool's shutdown cancels queued work
            transfer.abort_notice()
        self.renewer.close()
        for key in list(self._writers):
            self._drop_writer(key)
        self.channels.close()

    # ---- the layer hook ---------------------------------------------------------------------

    def on_layers_computed(
        self,
        scheduled: list[ScheduledSequence],
        num_layers_done: int,
        kv_cache: torch.Tensor,
        first_layer: int = 0,
    ) -> None:
        """Send what the layer group just finished holds of each exporting request.

        ``kv_cache``: the engine's pool, or (a tensor-parallel engine) the group's pages with
        every kv head, gathered onto rank 0: its first layer is ``first_layer`` and its blocks
        are numbered as the ``scheduled`` block tables say (``export_block_ids``' order).
        """
        if not self._transfers:
            return
        total = self.layout.num_layers
        layers = layer_group(num_layers_done, total, self.layers_per_group)
        if layers is None:
            return
        pages = kv_cache[layers.start - first_layer : layers.stop - first_layer]
        exports = list(self._exports(scheduled))
        for s, transfer, b0, done in exports:
            if isinstance(transfer, MemoryTransfer):
                transfer.write(kv_cache, s.block_ids, (layers.start, layers.stop), b0, done)
            else:
                self._send(transfer, s.block_ids, (layers.start, layers.stop), b0, done, pages)
        if num_layers_done == total:  # every layer of these blocks is queued
            for _, transfer, _, done in exports:
                transfer.sent_blocks = done

    def export_block_ids(self, scheduled: list[ScheduledSequence]) -> np.ndarray:
        """The pool blocks whose pages this step sends (sorted, distinct): what a
        tensor-parallel engine gathers onto rank 0 before calling ``on_layers_computed``."""
        ids = [np.asarray(s.block_ids[b0:done]) for s, _, b0, done in self._exports(scheduled)]
        if not ids:
            return np.empty(0, dtype=np.int64)
        return np.unique(np.concatenate(ids).astype(np.int64))

    def _exports(self, scheduled: list[ScheduledSequence]):
        """(scheduled sequence, its transfer, first block, end block) of every request whose
        pages this step completes: blocks ``[sent_blocks, done)``."""
        for s in scheduled:
            transfer = self._transfers.get(s.seq.request_id)
            if transfer is None or transfer.failed:
                continue  # not exported, or its decode pod stopped listening: stop spending on it
            # Blocks whose every token is computed after this step (all of them at the end).
            done = (
                transfer.num_prompt_blocks
                if s.samples
                else (s.start + s.num_new_tokens) // self.layout.block_size
            )
            if done > transfer.sent_blocks:
                yield s, transfer, transfer.sent_blocks, done

    def _send(
        self, transfer: KVTransfer, block_ids, layers: tuple[int, int], b0: int, b1: int, group
    ) -> None:
        """Queue blocks ``[b0, b1)`` of ``group`` (the layer group's pages) as chunks."""
        step = blocks_per_chunk(self.layout, layers[1] - layers[0], self.max_chunk_bytes)
        wanted = np.asarray(block_ids[b0:b1])
        if len(wanted) and wanted.min() < 0:
            # A tensor-parallel engine gathered other blocks than these (export_block_ids): the
            # pages are not here, and -1 would read another block's.
            raise KVTransferError(
                f"KV blocks [{b0}, {b1}) of {transfer.target.request_id!r} were not gathered"
            )
        ids = torch.tensor(wanted, dtype=torch.long, device=group.device)
        rid, fp, token = (
            transfer.target.request_id,
            self.fingerprint,
            transfer.target.transfer_token,
        )
        for start in range(b0, b1, step):
            end = min(b1, start + step)
            wait, release, nbytes = self._stage(group, ids[start - b0 : end - b0])

            def encode(seq_no: int, wait=wait, blocks=(start, end)) -> bytes:
                host = wait()
                return codec.encode_chunk(
                    chunk_header(rid, fp, seq_no, layers, blocks, host, token), page_buffer(host)
                )

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
