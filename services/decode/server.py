"""The decode service: ``DecodeService`` over an engine in the decode role.

``Generate`` admits a request (reserving its prompt's KV blocks, or refusing with
RESOURCE_EXHAUSTED), answers ``Admitted``, then streams tokens. In remote mode the prompt's KV
arrives through ``PushKV`` from a prefill pod; when the transfer's end message arrives (with the
first token), the sequence joins the decode batch. In local mode the engine prefills itself.

Who may write what: only the writer presenting the reservation's live lease (its transfer token)
may claim, write or complete it; the token is checked before any byte lands, and a stream or
notice that fails the check harms no reservation (``tandem.transfer.receiver``). A reservation
no writer claims within ``kv_claim_timeout_s`` is released and its stream fails; a memory
writer's claim lasts ``kv_write_lease_s`` unless it renews it (``RenewKV``): a writer that
stopped renewing (it died) fails the request and gives the blocks back then.

The engine runs in the pod's engine core process; this process holds the gRPC server, the KV
receiver (which writes pushed pages straight into the core's KV pool, shared with it) and the
detokenization. Every exit path of a request -- finished, cancelled by the router, failed
transfer, KV timeout -- discards its pending KV writes before the core frees its blocks.
"""

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import glob
import logging
import os
import pickle
import time
import uuid

import grpc
import torch
import torch.multiprocessing  # noqa: F401 - CUDA IPC reductions: opens ranks' shared pools
from opentelemetry import trace

from services.decode.settings import DecodeSettings
from tandem import telemetry
from tandem.api import proto_convert
from tandem.api.errors import (
    CapacityExceeded,
    InvalidRequest,
    KVTransferError,
    KVTransferForbidden,
    TandemError,
)
from tandem.api.grpc_status import abort_with
from tandem.engine.kv_cache import rank_pool_path
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc
from tandem.serving.engine_client import EngineCoreClient, coalesce
from tandem.serving.engine_core import CoreSpec
from tandem.serving.grpc_server import RunningService
from tandem.serving.pod import PodRuntime, pod_stats, serve_pod
from tandem.serving.pod_metrics import PodMetrics
from tandem.transfer import codec, shm_transport
from tandem.transfer.push_streams import PRIMARY_STREAM
from tandem.transfer.receiver import KVReceiver, lease_remaining_ms
from tandem.transfer.transport import (
    AUTO_TRANSPORTS,
    MEMORY_TRANSPORTS,
    TRANSPORTS,
    PoolDescriptor,
    TransportUnavailable,
    descriptor_decoder,
    descriptor_encoder,
    export_pool,
    shm_dir,
)

logger = logging.getLogger(__name__)


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(
        self,
        settings: DecodeSettings,
        core: EngineCoreClient,
        receiver: KVReceiver,
        kv_writers: concurrent.futures.ThreadPoolExecutor,
        identity: dict,
        metrics: PodMetrics,
        pools: list[PoolDescriptor] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.core = core
        self.receiver = receiver
        self.identity = identity
        self.block_size = core.info.block_size
        self.fingerprint = core.info.fingerprint
        self._kv_writers = kv_writers
        self.pools = pools or []
        """The memory transports this pod offers (``DescribeKV``)."""

    # ---- Generate ---------------------------------------------------------------------------

    async def Generate(
        self, request: decode_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ):
        rid = request.request_id
        stream = None
        finished = False
        # Never the current span: this generator yields, and a context attached here would leak.
        rpc_span = telemetry.start_server_span(context, "/tandem.decode.v1.DecodeService/Generate")
        span = telemetry.tracer().start_span("decode", context=trace.set_span_in_context(rpc_span))
        error: TandemError | None = None
        trace_ = _DecodeTrace(span, time.monotonic()) if span.is_recording() else None
        try:
            if not rid:
                raise InvalidRequest("request_id is required", param="request_id")
            ids = proto_convert.prompt_ids(request.prompt_token_ids)
            params = proto_convert.sampling_params_from_proto(request.sampling_params)
            stream = self.core.open_stream(rid)  # refuses a duplicate id before anything is held
            admitted = await self._admit(request, ids, params)
            if trace_ is not None:
                trace_.admitted(request, len(ids), admitted)
            yield decode_pb2.GenerateResponse(admitted=admitted)
            remote = request.prefill_mode == decode_pb2.PREFILL_MODE_REMOTE
            completion_tokens = 0
            last_token_at = None
            kv_pending = remote  # until the first item (a best_of request's may carry none)
            while True:
                if kv_pending:
                    item = await self._wait_for_kv(rid, stream)
                    kv_pending = False
                else:
                    item = await stream.get()
                item = coalesce(item, stream)  # a consumer that fell behind gets one message
                if isinstance(item, BaseException):
                    raise item
                # n > 1: one chunk per completion, each under its index (parallel sampling).
                new_tokens = sum(len(c.token_ids) for c in item.outputs)
                completion_tokens += new_tokens
                now = time.monotonic()
                if new_tokens and last_token_at is not None:
                    self.metrics.itl.observe((now - last_token_at) / new_tokens)
                if new_tokens:
                    last_token_at = now
                responses = [
                    decode_pb2.GenerateResponse(chunk=proto_convert.token_chunk(item, c))
                    for c in item.outputs
                ]
                response = responses[-1]
                if trace_ is not None:
                    trace_.output(now, new_tokens, item)
                if item.finished:
                    finished = True
                    # A migrated request's output before it came here counts (its usage is
                    # the uninterrupted request's).
                    resumed = proto_convert.num_output_tokens(request)
                    response.usage.CopyFrom(proto_convert.usage(item, completion_tokens + resumed))
                    self.metrics.observe_finished(item.metrics)
                for response in responses:
                    yield response
                if finished:
                    return
        except TandemError as exc:
            error = exc
            span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            await abort_with(context, exc)
        finally:
            if stream is not None:
                self.core.end_stream(rid, finished=finished)
            span.end()
            telemetry.end_server_span(rpc_span, error)

    async def _wait_for_kv(self, rid: str, stream):
        """A REMOTE request's first item: its first token once the KV arrived, or an error.

        Raises:
            KVTransferError: no writer claimed the reservation within kv_claim_timeout_s (it is
                released), the memory writer that claimed it stopped renewing its write lease
                (kv_write_lease_s: it died), or the KV did not arrive within kv_timeout_s.
        """
        started = time.monotonic()
        timeout_s = self.settings.kv_timeout_s
        claim_s = min(self.settings.kv_claim_timeout_s, timeout_s)
        deadline = started + timeout_s
        claim_checked = False
        while True:
            now = time.monotonic()
            until = deadline if claim_checked else min(deadline, started + claim_s)
            # A memory writer's write lease ends first unless it renews (RenewKV moves it on).
            write_end = self.receiver.write_lease_end(rid)
            if write_end is not None:
                until = min(until, write_end)
            elif not self.receiver.claimed(rid):
                # A claim may come any moment: look again soon enough to notice its write lease
                # ending within a quarter of it (a gRPC claim has none: no more looks then).
                until = min(until, now + self.settings.kv_write_lease_s / 4)
            try:
                return await asyncio.wait_for(stream.get(), max(0.0, until - now))
            except TimeoutError:
                pass
            now = time.monotonic()
            if not claim_checked and now >= started + claim_s:
                claim_checked = True
                await self._release_unclaimed(rid, claim_s)
            if now >= deadline:
                raise KVTransferError(f"KV pages did not arrive within {timeout_s:g} s")
            write_end = self.receiver.write_lease_end(rid)
            if write_end is not None and now >= write_end:
                self.metrics.transfer("write_lease_expired")
                logger.warning(
                    "request %s: the prefill pod writing its KV stopped renewing its write lease "
                    "(kv_write_lease_s %g s); the request fails and its blocks are freed",
                    rid,
                    self.settings.kv_write_lease_s,
                )
                raise KVTransferError(
                    "the prefill pod writing the KV stopped renewing its write lease within "
                    f"{self.settings.kv_write_lease_s:g} s (kv_write_lease_s): it died or lost "
                    "the network; the blocks were freed"
                )

    async def _release_unclaimed(self, rid: str, claim_s: float) -> None:
        """Release the reservation if no writer claimed it yet (atomic with a claim arriving
        right now: either it is refused, or this gives up nothing).

        Raises:
            KVTransferError: it was released.
        """
        released = await asyncio.get_running_loop().run_in_executor(
            self._kv_writers, self.receiver.release_unclaimed, rid
        )
        if released:
            self.metrics.transfer("unclaimed")
            logger.warning(
                "request %s: no prefill pod claimed its KV reservation within %g s; released",
                rid,
                claim_s,
            )
            raise KVTransferError(
                f"no prefill pod claimed the KV reservation within {claim_s:g} s "
                "(kv_claim_timeout_s); its blocks were released"
            )

    async def _admit(self, request, ids, params) -> decode_pb2.Admitted:
        rid = request.request_id
        cache_salt = request.cache_salt or None
        # A migrated request: its output so far, and how much of its text the client has.
        resume = {
            "num_output_tokens": proto_convert.num_output_tokens(request),
            "num_text_chars": proto_convert.num_text_chars(request),
        }
        if request.prefill_mode == decode_pb2.PREFILL_MODE_REMOTE:
            block_ids, cached = await self.core.reserve(
                rid, ids, params, priority=request.priority, cache_salt=cache_salt, **resume
            )
            lease = self.receiver.expect(
                rid, block_ids, cached // self.block_size, self.settings.kv_lease_s
            )
            return decode_pb2.Admitted(
                num_cached_tokens=cached,
                num_reserved_blocks=len(block_ids),
                model_fingerprint=self.fingerprint,
                transfer_token=lease.token,
                lease_epoch=lease.epoch,
                lease_expires_unix_ms=lease.expires_unix_ms,
                block_ids=block_ids,
                incarnation=self.identity["incarnation"],
            )
        if request.prefill_mode != decode_pb2.PREFILL_MODE_LOCAL:
            raise InvalidRequest("prefill_mode must be REMOTE or LOCAL", param="prefill_mode")
        if self.core.stats.num_waiting >= self.settings.max_waiting:
            raise CapacityExceeded(f"{self.core.stats.num_waiting} requests are already waiting")
        # Room is checked after validation: bad input stays a 400.
        await self.core.add(
            rid,
            ids,
            params,
            priority=request.priority,
            cache_salt=cache_salt,
            require_room=True,
            **resume,
        )
        return decode_pb2.Admitted(model_fingerprint=self.fingerprint)

    # ---- PushKV -----------------------------------------------------------------------------

    async def PushKV(self, request_iterator, context: grpc.aio.ServicerContext):
        """Messages arrive decoded by ``tandem.transfer.codec`` (payload as a view, see
        add_decode_service).

        Any problem with a stream fails the request it carries (DATA_LOSS or FAILED_PRECONDITION
        for the prefill pod, the same error on the request's Generate stream) -- once the stream
        proved it holds the reservation's lease: its first message's token is checked before
        anything else, and until it passed, nothing the stream does touches any reservation.
        """
        loop = asyncio.get_running_loop()
        rid = None  # the request this stream writes for, once its token was accepted
        chunks = nbytes = 0
        ended = broken = False

        def broke_off() -> None:
            """The prefill pod cancelled the stream (its request was cancelled, or it died)."""
            nonlocal broken
            if rid is not None and not ended and not broken:
                broken = True
                self.metrics.transfer("broken")
                self.core.fail(rid, KVTransferError("the KV stream from the prefill pod broke off"))

        # NOTE: a client's cancel may reach this handler as the ordinary end of its messages (the
        # read returns EOF, the call's status says nothing): the stream meant to carry the end
        # message ending without it is the sign.
        primary = PRIMARY_STREAM in (context.invocation_metadata() or ())
        try:
            async for msg in request_iterator:
                if msg.error is not None:
                    raise msg.error
                if ended:
                    raise KVTransferError("messages after the end of the KV transfer")
                if msg.chunk is not None:
                    chunk = msg.chunk
                    if rid is None:
                        self.receiver.authorize(chunk.request_id, chunk.transfer_token)
                        rid = chunk.request_id
                    elif chunk.request_id != rid:
                        raise KVTransferError("a PushKV stream carries one request's pages only")
                    if chunk.sequence_number != chunks:
                        raise KVTransferError(
                            f"KV chunk {chunk.sequence_number} arrived "
                            f"where chunk {chunks} was expected"
                        )
                    nbytes += await loop.run_in_executor(
                        self._kv_writers, self.receiver.write, chunk, msg.data
                    )
                    chunks += 1
                elif msg.end is not None:
                    if rid is None:
                        self.receiver.authorize(msg.end.request_id, msg.end.transfer_token)
                        rid = msg.end.request_id
                    elif msg.end.request_id != rid:
                        raise KVTransferError(
                            "the end message names another request than the stream's chunks"
                        )
                    summary = await loop.run_in_executor(
                        self._kv_writers, self.receiver.complete, msg.end
                    )
                    await self._complete(msg.end)
                    self.metrics.transfer("ok", summary.bytes, summary.seconds, "grpc")
                    ended = True
                else:
                    raise KVTransferError("empty PushKV message")
            if primary and not ended:
                broke_off()
            return decode_pb2.PushKVResponse(chunks_received=chunks, bytes_received=nbytes)
        except asyncio.CancelledError:
            broke_off()
            raise
        except Exception as exc:  # noqa: BLE001 - whatever broke the stream fails its request
            if not isinstance(exc, TandemError):
                logger.exception("unexpected error in a KV stream for %s", rid)
                exc = KVTransferError(f"KV stream failed: {type(exc).__name__}: {exc}")
            if rid is not None and not isinstance(exc, KVTransferForbidden):
                self.core.fail(rid, exc)  # a forger's stream harms no reservation
            self.metrics.transfer(
                "forbidden" if isinstance(exc, KVTransferForbidden) else "refused"
            )
            logger.warning("KV transfer for %s refused: %s", rid, exc)
            await abort_with(context, exc)

    async def _complete(self, end: common_pb2.KVTransferEnd) -> None:
        logprob = (
            proto_convert.logprob_from_proto(end.first_token_logprob)
            if end.HasField("first_token_logprob")
            else None
        )
        await self.core.complete_remote(
            end.request_id,
            end.first_token_id,
            logprob=logprob,
            num_cached_tokens=end.num_cached_tokens,
            # Memory transports' CompleteKV carries the same end message as PushKV's.
            prompt_logprobs=[proto_convert.logprob_from_proto(lp) for lp in end.prompt_logprobs],
        )

    # ---- memory transports: DescribeKV, ClaimKV, CompleteKV -----------------------------------

    async def DescribeKV(self, request, context):
        return decode_pb2.DescribeKVResponse(
            incarnation=self.identity["incarnation"],
            pools=[
                decode_pb2.KVPoolDescriptor(
                    transport=d.transport, descriptor=descriptor_encoder.encode(d)
                )
                for d in self.pools
            ],
        )

    async def ClaimKV(self, request: decode_pb2.ClaimKVRequest, context):
        """A writer takes the lease: a memory writer before its first write (this waits for the
        engine's last use of the blocks), a gRPC writer on receipt of its Prefill request (its
        chunks are checked as they come)."""
        try:
            if request.transport != "grpc" and request.transport not in {
                d.transport for d in self.pools
            }:
                raise KVTransferForbidden(f"this pod does not offer {request.transport!r}")
            claim = await asyncio.get_running_loop().run_in_executor(
                self._kv_writers,
                functools.partial(self.receiver.claim, renews=request.renews),
                request.request_id,
                request.transfer_token,
                request.transport,
            )
            return decode_pb2.ClaimKVResponse(
                lease_expires_unix_ms=claim.lease.expires_unix_ms,
                block_ids=claim.block_ids,
                first_block=claim.first_block,
                lease_remaining_ms=lease_remaining_ms(claim.lease.expires_unix_ms),
            )
        except TandemError as exc:
            await abort_with(context, exc)

    async def RenewKV(self, request: decode_pb2.RenewKVRequest, context):
        """A memory writer extends its write lease (refused once the lease was discarded or the
        write lease ended: the writer then stops)."""
        try:
            expires = self.receiver.renew(request.request_id, request.transfer_token)
        except KVTransferForbidden as exc:
            await abort_with(context, exc)
        return decode_pb2.RenewKVResponse(
            lease_expires_unix_ms=expires, lease_remaining_ms=lease_remaining_ms(expires)
        )

    async def CompleteKV(self, request: decode_pb2.CompleteKVRequest, context):
        """A memory transport's one notice: the pages are in place (the request joins the decode
        batch), or the writer aborted (the request fails; its blocks may be reused)."""
        end = request.end
        rid = end.request_id
        try:
            summary = await asyncio.get_running_loop().run_in_executor(
                self._kv_writers, self.receiver.complete_memory, end
            )
        except KVTransferForbidden as exc:
            self.metrics.transfer("forbidden")
            await abort_with(context, exc)
        except TandemError as exc:  # an abort notice or a checksum mismatch: the request fails
            self.metrics.transfer("aborted" if end.aborted else "refused")
            self.core.fail(rid, exc)
            await abort_with(context, exc)
        except Exception as exc:  # noqa: BLE001 - a defect here: fail the request now, not later
            await self._complete_failed(rid, exc, context)
        try:
            await self._complete(end)
        except TandemError as exc:
            self.core.fail(rid, exc)
            await abort_with(context, exc)
        except Exception as exc:  # noqa: BLE001
            await self._complete_failed(rid, exc, context)
        self.metrics.transfer("ok", summary.bytes, None, summary.transport)
        return decode_pb2.CompleteKVResponse(bytes_received=summary.bytes)

    async def _complete_failed(self, rid: str, exc: Exception, context) -> None:
        """CompleteKV met an error of this pod's own (not the writer's): the request fails at
        once with INTERNAL (instead of gRPC's UNKNOWN and a request left waiting for its KV
        until kv_timeout_s), counted as ``outcome="error"``. The writer stopped writing when
        it sent its notice, so the blocks are free to go."""
        logger.exception("completing the KV transfer of %s failed", rid)
        self.metrics.transfer("error")
        failure = KVTransferError(
            f"the decode pod failed to complete the KV transfer: {type(exc).__name__}"
        )
        self.core.fail(rid, failure)
        await context.abort(grpc.StatusCode.INTERNAL, str(failure))

    # ---- GetStats ---------------------------------------------------------------------------

    async def GetStats(self, request, context):
        return decode_pb2.GetStatsResponse(stats=pod_stats(self.core, self.identity))


class _DecodeTrace:
    """The ``decode`` span's attributes, gathered as a request's stream goes by."""

    def __init__(self, span, started: float) -> None:
        self.span = span
        self.started = started
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.output_tokens = 0
        self.steps = 0

    def admitted(self, request: decode_pb2.GenerateRequest, prompt_tokens: int, admitted) -> None:
        self.admitted_at = time.monotonic()
        remote = request.prefill_mode == decode_pb2.PREFILL_MODE_REMOTE
        self.span.set_attributes(
            {
                telemetry.REQUEST_ID: request.request_id,
                "tandem.decode.prefill_mode": "remote" if remote else "local",
                telemetry.GEN_AI_USAGE_INPUT_TOKENS: prompt_tokens,
                telemetry.GEN_AI_REQUEST_MAX_TOKENS: request.sampling_params.max_tokens,
                "tandem.decode.admission_seconds": self.admitted_at - self.started,
                "tandem.decode.reserved_blocks": admitted.num_reserved_blocks,
            }
        )

    def output(self, now: float, new_tokens: int, item) -> None:
        self.output_tokens += new_tokens
        self.steps += 1
        if new_tokens and self.first_token_at is None:
            self.first_token_at = now
            # Remote prefill: the wait for the KV pages (the prefill pod's queue, compute,
            # transfer).
            self.span.set_attributes(
                {
                    "tandem.decode.kv_wait_seconds": now - (self.admitted_at or now),
                    "tandem.decode.ttft_seconds": now - self.started,
                }
            )
        if item.finished:
            self.span.set_attributes(
                {
                    telemetry.GEN_AI_USAGE_OUTPUT_TOKENS: self.output_tokens,
                    "tandem.decode.steps": self.steps,
                    "tandem.decode.cached_tokens": item.num_cached_tokens,
                    telemetry.GEN_AI_RESPONSE_FINISH_REASONS: [item.outputs[0].finish_reason or ""],
                }
            )


def add_decode_service(servicer: DecodeServicer, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated code does, but PushKV with the zero-copy codec."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=decode_pb2.GenerateRequest.FromString,
            response_serializer=decode_pb2.GenerateResponse.SerializeToString,
        ),
        "PushKV": grpc.stream_unary_rpc_method_handler(
            servicer.PushKV,
            request_deserializer=codec.decode,
            response_serializer=decode_pb2.PushKVResponse.SerializeToString,
        ),
        "GetStats": grpc.unary_unary_rpc_method_handler(
            servicer.GetStats,
            request_deserializer=decode_pb2.GetStatsRequest.FromString,
            response_serializer=decode_pb2.GetStatsResponse.SerializeToString,
        ),
        "DescribeKV": grpc.unary_unary_rpc_method_handler(
            servicer.DescribeKV,
            request_deserializer=decode_pb2.DescribeKVRequest.FromString,
            response_serializer=decode_pb2.DescribeKVResponse.SerializeToString,
        ),
        "ClaimKV": grpc.unary_unary_rpc_method_handler(
            servicer.ClaimKV,
            request_deserializer=decode_pb2.ClaimKVRequest.FromString,
            response_serializer=decode_pb2.ClaimKVResponse.SerializeToString,
        ),
        "CompleteKV": grpc.unary_unary_rpc_method_handler(
            servicer.CompleteKV,
            request_deserializer=decode_pb2.CompleteKVRequest.FromString,
            response_serializer=decode_pb2.CompleteKVResponse.SerializeToString,
        ),
        "RenewKV": grpc.unary_unary_rpc_method_handler(
            servicer.RenewKV,
            request_deserializer=decode_pb2.RenewKVRequest.FromString,
            response_serializer=decode_pb2.RenewKVResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tandem.decode.v1.DecodeService", handlers),)
    )


async def start(settings: DecodeSettings) -> RunningService:
    """Start the engine core (loads the model, captures graphs) and serve; returns once the
    gRPC server is up."""
    kv_writers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-write")
    receiver: KVReceiver | None = None

    async def before_release(rid: str) -> None:
        # Stop KV writes into the request's blocks before the core frees them.
        try:
            lease = await asyncio.get_running_loop().run_in_executor(
                kv_writers, receiver.discard, rid
            )
        except RuntimeError:  # the writers are shut down (the pod is stopping): no write runs
            lease = receiver.discard(rid)
        if lease is None:
            return
        # A memory transport's writer may still be copying: wait for its notice or the lease's
        # end (polling: the notice is handled on the kv-write threads, which must stay free).
        try:
            while not receiver.drained(lease):
                await asyncio.sleep(0.005)
        finally:
            receiver.end_drain(rid)

    pool_files = PoolFiles.create(settings.tensor_parallel_size)
    spec = CoreSpec(
        role="decode",
        engine=settings.engine_config().model_copy(
            update={"kv_pool_path": pool_files.path, "share_rank_pools": True}
        ),
        pod_id=settings.pod_id,
        share_kv_pool=True,
    )
    try:
        pod = await PodRuntime.create(
            settings, spec, detokenize=True, before_release=before_release
        )
    except BaseException:
        pool_files.remove()
        raise
    info = pod.info
    pool = info.kv_pool
    if pool is None:  # CPU pools in shared-memory files: rank 0's, then the other ranks'
        pool, *rank_pools = (
            shm_transport.map_pool(
                rank_pool_path(info.kv_pool_path, rank), pool_shape(info), info.kv_spec.dtype
            )
            for rank in range(info.tensor_parallel_size)
        )
    else:  # GPU pools: rank 0's came with the info, the other ranks' as they shared them
        rank_pools = [pickle.loads(shared) for shared in info.kv_rank_pools]
    pools, exports = offered_pools(settings, info, pool)
    receiver = KVReceiver(
        pool,
        info.kv_wire_spec,
        info.fingerprint,
        rank_pools=rank_pools,
        max_chunk_bytes=settings.kv_max_chunk_bytes,
        write_lease_s=settings.kv_write_lease_s,
        engine_event=(
            torch.cuda.Event.from_ipc_handle(info.kv_pool.device, info.engine_event)
            if info.engine_event is not None
            else None
        ),
    )
    servicer = DecodeServicer(
        settings, pod.core, receiver, kv_writers, pod.identity, pod.metrics, pools
    )
    add_decode_service(servicer, pod.server.server)

    def release_pool() -> None:
        for export in exports:
            export.close()
        pool_files.remove()

    # After the server stopped: in-flight writes finish, then the core (which owns the pool) stops.
    service = await pod.start([lambda: kv_writers.shutdown(wait=True)], servicer=servicer)
    service.on_stop(release_pool)
    return service


def pool_shape(info) -> tuple[int, ...]:
    s = info.kv_spec
    return (s.num_layers, 2, info.num_kv_blocks + 1, s.block_size, s.num_kv_heads, s.head_dim)


class PoolFiles:
    """This pod's shared-memory files for its CPU KV pools: rank 0's, and one per further
    tensor-parallel rank (``kv_cache.rank_pool_path``), each locked while the pod lives."""

    def __init__(self, path: str, fds: list[int]) -> None:
        self.path = path
        """Rank 0's file (``EngineConfig.kv_pool_path``)."""
        self._fds = fds

    @classmethod
    def create(cls, num_ranks: int) -> "PoolFiles":
        """Fresh files (mode 0600: other users on the node must not read its KV), each with a
        shared lock this process holds for its lifetime. Pool files nobody holds a lock on
        (their pod died without removing them: kill -9) are removed first; a lock, unlike a
        pid, means the same in every container sharing the node's /dev/shm."""
        directory = shm_dir()
        for stale in glob.glob(os.path.join(directory, shm_transport.POOL_FILE_PREFIX + "*")):
            try:
                fd = os.open(stale, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its pod holds it
            else:
                _unlink(stale)
            finally:
                os.close(fd)
        path = os.path.join(
            directory, f"{shm_transport.POOL_FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        )
        files = cls(path, [])
        try:
            for rank in range(num_ranks):
                fd = os.open(rank_pool_path(path, rank), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                files._fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            files.remove()
            raise
        return files

    def remove(self) -> None:
        for rank, fd in enumerate(self._fds):
            _unlink(rank_pool_path(self.path, rank))
            os.close(fd)
        self._fds = []


def _unlink(path: str | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def offered_pools(settings: DecodeSettings, info, pool: torch.Tensor):
    """The memory transports this pod offers (``--kv-transport``), and the exports to close."""
    mode = settings.kv_transport
    wanted = [
        t for t in MEMORY_TRANSPORTS if mode == t or (mode == "auto" and t in AUTO_TRANSPORTS)
    ]
    if info.tensor_parallel_size > 1:
        # Every rank holds its own heads of a page: a writer would need each rank's pool.
        if mode not in ("auto", "grpc"):
            logger.warning("--kv-transport %s: a tensor-parallel decode pod takes grpc only", mode)
        wanted = []
    pools: list[PoolDescriptor] = []
    exports = []
    for encoded in info.kv_exports:  # made by the core: cuda-ipc
        d = descriptor_decoder.decode(encoded)
        if d.transport in wanted:
            pools.append(d)
    for name in ("shm", "nixl"):
        if name not in wanted:
            continue
        try:
            export = export_pool(name, pool, path=info.kv_pool_path)
        except TransportUnavailable as exc:
            if mode == name:
                logger.warning("--kv-transport %s is not available on this pod: %s", name, exc)
            continue
        exports.append(export)
        pools.append(export.descriptor())
    pools.sort(key=lambda d: TRANSPORTS.index(d.transport))
    logger.info("KV transports offered: %s", ", ".join([d.transport for d in pools] + ["grpc"]))
    return pools, exports


async def serve(settings: DecodeSettings) -> None:
    await serve_pod("decode", settings, start)
