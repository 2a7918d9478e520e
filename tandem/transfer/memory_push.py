"""One request's outgoing KV over a memory transport (shm, cuda-ipc, nixl).

The engine thread calls ``write`` at each layer-group boundary: the pages go straight into the
decode pod's reserved blocks through the pool mapping (``PoolWriter``), with no per-page
message. ``finish`` (a sender thread) flushes the writes and sends the one completion notice,
``DecodeService.CompleteKV``, carrying the first token. ``cancel`` stops writing at once; the
abort notice then tells the decode pod it may reuse the blocks (``abort_notice``).

The lease (``KVTarget.lease_expires_unix_ms``) bounds the writes: none is issued later than
``MEMORY_WRITE_MARGIN_S`` before its end, after which the decode pod may free the blocks.
"""

import contextlib
import threading
import time

import grpc
import torch
from opentelemetry import trace
from opentelemetry.context import Context

from tandem import telemetry
from tandem.api.errors import KVTransferError
from tandem.engine.uploads import upload
from tandem.proto.common.v1 import common_pb2
from tandem.transfer.push_streams import KVTarget, TransferResult, end_transfer_span
from tandem.transfer.receiver import MEMORY_WRITE_MARGIN_S, page_checksum
from tandem.transfer.transport import PoolWriter


class MemoryTransfer:
    """Mirrors ``KVTransfer``'s surface (``sent_blocks``, ``failed``, ``finish``, ``cancel``)."""

    def __init__(
        self,
        target: KVTarget,
        num_prompt_blocks: int,
        writer: PoolWriter,
        complete_kv,
        timeout_s: float,
        trace_context: Context | None = None,
    ) -> None:
        self.target = target
        self.num_prompt_blocks = num_prompt_blocks
        self.sent_blocks = 0
        self.writer = writer
        self._complete_kv = complete_kv
        """``DecodeService.CompleteKV`` of the decode pod (a unary callable)."""
        self._timeout_s = timeout_s
        self._deadline = target.lease_expires_unix_ms / 1000 - MEMORY_WRITE_MARGIN_S
        self.bytes = 0
        self.writes = 0
        self.started: float | None = None
        self.error: str | None = None
        self._cancelled = False
        self._lock = threading.Lock()
        self._checksum = 0 if target.checksum else None
        self._span: trace.Span | None = None
        if trace_context is not None:
            self._span = telemetry.tracer().start_span(
                "kv_transfer",
                context=trace_context,
                attributes={
                    "tandem.kv.target": target.address,
                    "tandem.kv.transport": target.transport,
                    "tandem.kv.skip_blocks": target.skip_blocks,
                },
            )

    @property
    def failed(self) -> bool:
        return self._cancelled or self.error is not None

    def write(
        self, kv: torch.Tensor, src_ids: list[int], layers: tuple[int, int], b0: int, b1: int
    ):
        """Copy blocks ``[b0, b1)`` of the request (its ids ``src_ids`` in this pod's pool) of
        ``layers`` into the decode pod's reserved blocks (the engine thread)."""
        if self.failed:
            return
        if time.time() >= self._deadline:
            self.error = "the decode pod's lease on the blocks is ending"
            return
        if self.started is None:
            self.started = time.perf_counter()
        # Through pinned memory, never waiting for the device: a plain host-to-device copy would
        # wait here for the forward's queued layers, at every layer group of every prefill.
        src = upload(torch.tensor(src_ids[b0:b1], dtype=torch.long), kv.device)
        dst = torch.tensor(self.target.block_ids[b0:b1], dtype=torch.long)
        if len(dst) != b1 - b0:
            self.error = "the decode pod reserved fewer blocks than the prompt needs"
            return
        try:
            self.bytes += self.writer.write(kv, src, layers, dst)
            if self.writer.transport == "nixl":
                # NIXL reads the source pages after write() returns, and the engine may reuse
                # the request's blocks once this hook returns (it finishes, or is preempted): wait
                # for them to be read. (cuda-ipc copies on the compute stream, shm at once.)
                self.writer.flush()
        except Exception as exc:  # noqa: BLE001 - the transfer fails, the engine goes on
            self.error = f"{self.target.transport} write failed: {exc}"
            return
        self.writes += 1
        if self._checksum is not None:
            self._checksum += page_checksum(kv[layers[0] : layers[1]].index_select(2, src))

    def _end(self) -> common_pb2.KVTransferEnd:
        return common_pb2.KVTransferEnd(
            request_id=self.target.request_id,
            model_fingerprint=self.target.model_fingerprint,
            transfer_token=self.target.transfer_token,
            transport=self.target.transport,
        )

    def finish(self, end: common_pb2.KVTransferEnd) -> TransferResult:
        """Flush the writes, then send the completion notice (a sender thread)."""
        if self.started is None:
            self.started = time.perf_counter()
        try:
            if self.error is None and not self._cancelled:
                self.writer.flush()
        except Exception as exc:  # noqa: BLE001
            self.error = f"{self.target.transport} writes failed: {exc}"
        if self._cancelled or self.error is not None:
            error = self.error or "cancelled"
            self.abort_notice()
            self._end_span(error)
            raise KVTransferError(f"the KV transfer to {self.target.address} failed: {error}")
        end.transfer_token = self.target.transfer_token
        end.transport = self.target.transport
        end.total_chunks = self.writes
        if self._checksum is not None:
            end.checksum = self._checksum
        metadata = (
            telemetry.outgoing_metadata(context=trace.set_span_in_context(self._span))
            if self._span is not None
            else ()
        )
        try:
            # The decode pod's CompleteKV span continues the kv_transfer span.
            self._complete_kv(end, timeout=self._timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            error = f"KV completion to {self.target.address} failed: {e.code().name}: {e.details()}"
            self._end_span(error)
            raise KVTransferError(error) from e
        result = TransferResult(
            self.bytes, self.writes, time.perf_counter() - self.started, self.target.transport
        )
        self._end_span()
        return result

    def cancel(self) -> None:
        """Stop writing (any thread); the caller sends ``abort_notice`` off the engine thread."""
        self._cancelled = True

    def abort_notice(self) -> None:
        """After a cancel or failure: wait for writes in flight, then tell the decode pod it may
        reuse the blocks (best effort: without it the lease's end frees them). Ends the
        ``kv_transfer`` span as failed."""
        with self._lock:
            try:
                try:
                    self.writer.flush()
                except Exception:  # noqa: BLE001 - the lease covers a writer that cannot flush
                    return
                end = self._end()
                end.aborted = True
                # An error means the decode pod gave up on it already, or is gone: nothing to
                # release.
                with contextlib.suppress(grpc.RpcError):
                    self._complete_kv(end, timeout=5.0)
            finally:
                self._end_span(self.error or "cancelled")

    def _end_span(self, error: str | None = None) -> None:
        span, self._span = self._span, None
        end_transfer_span(span, self.bytes, self.writes, self.started, error)
