"""One request's outgoing KV over a memory transport (shm, cuda-ipc, nixl).

The engine thread calls ``write`` at each layer-group boundary: the pages go straight into the
decode pod's reserved blocks through the pool mapping (``PoolWriter``), with no per-page
message. ``finish`` (a sender thread) flushes the writes and sends the one completion notice,
``DecodeService.CompleteKV``, carrying the first token. ``cancel`` stops writing at once; the
abort notice then tells the decode pod it may reuse the blocks (``abort_notice``).

The write lease (``KVTarget.lease_expires_unix_ms``: the end of the short write lease the claim
granted, on this host's clock: the time the claim was sent plus what the decode pod said was
left, so no skew between the nodes' clocks moves it later) bounds the writes: none is issued
later than ``write_margin_s`` before its end, after which the decode pod may free the blocks.
While a transfer is live (from its start to its completion or abort notice) the pod's
``LeaseRenewer`` extends it (``DecodeService.RenewKV``) every third of what is left; a refused
or failed renewal fails the transfer, which then stops writing and takes its abort path. A
prefill pod that dies stops renewing: the decode pod frees the blocks when the write lease ends.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import grpc
import torch
from opentelemetry import trace
from opentelemetry.context import Context

from tandem import telemetry
from tandem.api.errors import KVTransferError
from tandem.engine.uploads import upload
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2
from tandem.transfer.push_streams import KVTarget, TransferResult, end_transfer_span
from tandem.transfer.receiver import local_lease_end_ms, page_checksum, write_margin_s
from tandem.transfer.transport import PoolWriter, check_distinct_block_ids

logger = logging.getLogger(__name__)

MIN_RENEW_INTERVAL_S = 0.05
"""Renewals of one transfer are at least this far apart (a write lease at its cap, the
reservation's end, no longer moves)."""


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
        self.expires = target.lease_expires_unix_ms / 1000
        """When the write lease ends (Unix time, s): the claim's word, then each renewal's."""
        # The margin follows the length of the grant (the claim came just before this).
        self._margin = write_margin_s(self.expires - time.time())
        self._deadline = self.expires - self._margin
        self.ended = False
        """Its completion or abort notice went out (or it failed): no renewals any more."""
        self._next_renewal = 0.0
        self._renewal_in_flight = False
        self.bytes = 0
        self.writes = 0
        self.started: float | None = None
        self.error: str | None = None
        try:
            # Once per transfer, not per write (each write names a slice of these ids).
            check_distinct_block_ids(target.block_ids)
        except KVTransferError as exc:
            self.error = f"{target.transport} write failed: {exc}"
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

    @property
    def renewing(self) -> bool:
        """The write lease still needs renewals: the transfer is live and may write."""
        return not (self.ended or self.failed) and time.time() < self._deadline

    def renewed(self, expires_unix_ms: int) -> None:
        """The decode pod extended the write lease (the renewer's thread)."""
        self.expires = expires_unix_ms / 1000
        # A renewal grants the whole write lease: its margin, if the claim's (measured when this
        # transfer was built, maybe well after the claim) came out shorter.
        self._margin = max(self._margin, write_margin_s(self.expires - time.time()))
        self._deadline = self.expires - self._margin

    def renewal_failed(self, reason: str) -> None:
        """The write lease could not be renewed: stop writing (the abort path follows)."""
        if not self.ended and self.error is None:
            self.error = reason

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
        # Renewals go on while the notice is on its way (the writer holds the blocks until the
        # decode pod has it); ``ended`` once it was answered.
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
        finally:
            self.ended = True
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
                self.ended = True
                self._end_span(self.error or "cancelled")

    def _end_span(self, error: str | None = None) -> None:
        span, self._span = self._span, None
        end_transfer_span(span, self.bytes, self.writes, self.started, error)


class LeaseRenewer:
    """Renews the write leases of a prefill pod's live memory transfers (one thread for all of
    them, never the engine's): each every third of what its lease has left, the calls
    asynchronous so that a slow or dead decode pod delays no other pod's renewals.

    A renewal refused (the decode pod discarded the reservation, or the write lease already
    ended) or failed (the decode pod is unreachable) fails its transfer: it stops writing and
    sends its abort notice. A decode pod without ``RenewKV`` (UNIMPLEMENTED) granted the whole
    lease at the claim: nothing to renew.
    """

    def __init__(self, renew_kv: Callable[[str], grpc.UnaryUnaryMultiCallable]) -> None:
        """``renew_kv``: a decode address -> its ``DecodeService.RenewKV``."""
        self._renew_kv = renew_kv
        self._live: set[MemoryTransfer] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, transfer: MemoryTransfer) -> None:
        """Keep ``transfer``'s write lease alive until it ends or fails."""
        with self._cond:
            if self._closed:
                return
            transfer._next_renewal = _next_renewal(transfer, time.time())
            self._live.add(transfer)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kv-lease-renewer", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._live.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    self._live = {t for t in self._live if t.renewing}
                    now = time.time()
                    waiting = [t for t in self._live if not t._renewal_in_flight]
                    due = [t for t in waiting if t._next_renewal <= now]
                    if due:
                        for t in due:
                            t._renewal_in_flight = True
                        break
                    wake = min((t._next_renewal for t in waiting), default=None)
                    self._cond.wait(None if wake is None else wake - now)
            for t in due:
                self._send(t)

    def _send(self, transfer: MemoryTransfer) -> None:
        target = transfer.target
        sent = time.time()
        timeout = max(MIN_RENEW_INTERVAL_S, transfer._deadline - sent)
        try:
            future = self._renew_kv(target.address).future(
                decode_pb2.RenewKVRequest(
                    request_id=target.request_id, transfer_token=target.transfer_token
                ),
                timeout=timeout,
            )
        except Exception as exc:  # noqa: BLE001 - a closed channel: the transfer cannot go on
            self._done(transfer, error=f"RenewKV to {target.address} failed: {exc}")
            return
        future.add_done_callback(lambda f: self._answered(transfer, f, sent))

    def _answered(self, transfer: MemoryTransfer, future, sent: float) -> None:
        try:
            response = future.result()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._done(transfer, renew=False)  # a decode pod without write leases
                return
            self._done(
                transfer,
                error=(
                    f"the write lease on {transfer.target.address} could not be renewed: "
                    f"{e.code().name}: {e.details()}"
                ),
            )
            return
        except Exception as exc:  # noqa: BLE001 - cancelled (the channel closed)
            self._done(transfer, error=f"RenewKV to {transfer.target.address} failed: {exc}")
            return
        transfer.renewed(
            local_lease_end_ms(response.lease_expires_unix_ms, response.lease_remaining_ms, sent)
        )
        self._done(transfer)

    def _done(self, transfer: MemoryTransfer, *, error: str | None = None, renew=True) -> None:
        if error is not None and transfer.renewing:
            logger.warning("KV transfer of %s stops: %s", transfer.target.request_id, error)
            transfer.renewal_failed(error)
        with self._cond:
            transfer._renewal_in_flight = False
            if error is not None or not renew:
                self._live.discard(transfer)
            else:
                transfer._next_renewal = _next_renewal(transfer, time.time())
            self._cond.notify()


def _next_renewal(transfer: MemoryTransfer, now: float) -> float:
    """A third of what the write lease has left from ``now`` (about a third of
    ``kv_write_lease_s`` right after a claim or renewal)."""
    return now + max(MIN_RENEW_INTERVAL_S, (transfer.expires - now) / 3)
