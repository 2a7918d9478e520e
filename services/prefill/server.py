"""The prefill service: ``PrefillService`` over an engine in the prefill role.

``Prefill`` first checks that the decode target is a decode pod this pod knows from discovery
(``KnownTargets``: it pushes KV to no arbitrary address) and claims the decode pod's lease on the
reserved blocks (``ClaimKV``: the decode pod releases a reservation nobody claims within its
claim deadline), then queues the prompt in the pod's engine core process (continuous batching,
chunked prefill, prefix cache) as a one-token request. While the forward runs, the core's KV sender
streams each finished layer group's pages to the decode pod named in the request; once the
first token is sampled the core closes the transfer with it, and the call returns when the
decode pod acknowledged it. This process holds the gRPC server and the kvstore publisher.
"""

import asyncio
import dataclasses
import logging
import time

import grpc
import msgspec
import torch
from opentelemetry import propagate, trace

from services.prefill.settings import PrefillSettings
from tandem import telemetry
from tandem.api import cluster_auth, proto_convert
from tandem.api.channel_options import CLIENT_OPTIONS
from tandem.api.errors import (
    CapacityExceeded,
    InvalidRequest,
    KVFingerprintMismatch,
    KVPoolUnmappable,
    KVTargetForbidden,
    KVTransferError,
    TandemError,
)
from tandem.api.grpc_status import abort_with, error_from_rpc
from tandem.api.outputs import RequestMetrics
from tandem.api.sampling_params import SamplingParams
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc
from tandem.proto.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from tandem.serving import core_protocol
from tandem.serving.discovery import KnownTargets
from tandem.serving.engine_client import EngineCoreClient
from tandem.serving.engine_core import CoreSpec, SenderOptions
from tandem.serving.grpc_server import RunningService
from tandem.serving.kv_event_publisher import KVEventPublisher
from tandem.serving.pod import PodRuntime, pod_stats, serve_pod
from tandem.serving.pod_metrics import PodMetrics
from tandem.transfer.receiver import local_lease_end_ms
from tandem.transfer.transport import (
    LocalPool,
    PoolDescriptor,
    choose,
    descriptor_decoder,
    descriptor_encoder,
    local_transports,
)

logger = logging.getLogger(__name__)


def prefill_only(params: SamplingParams, num_output_tokens: int = 0) -> SamplingParams:
    """The request as a prefill pod runs it: one token, sampled like the decode pod would.

    A migrated request's output so far (``num_output_tokens``) counts, so the token sampled
    here is output token ``num_output_tokens + 1``, under the request's ``min_tokens``. Stop
    strings are the decode pod's business (it detokenizes the first token too).
    """
    last = num_output_tokens + 1
    return dataclasses.replace(
        params, max_tokens=last, min_tokens=min(params.min_tokens, last), stop=()
    )


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(
        self,
        settings: PrefillSettings,
        core: EngineCoreClient,
        identity: dict,
        metrics: PodMetrics,
        targets: KnownTargets,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.core = core
        self.identity = identity
        self.fingerprint = core.info.fingerprint
        self.transports = KVTransportChooser(settings, core.info)
        self.targets = targets
        """The decode pods KV may go to (discovery)."""

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        with telemetry.tracer().start_as_current_span("prefill") as span:
            return await self._prefill(request, context, span)

    async def _prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext, span
    ):
        rid = request.request_id
        stream = None
        done = False
        try:
            target = self._target(request)
            # Before anything connects anywhere: only a decode pod discovery knows.
            if not await self.targets.allows(target.address):
                self.metrics.transfer("forbidden")
                logger.warning(
                    "request %s: refused to push KV to %s, not a known decode pod",
                    rid,
                    target.address,
                )
                raise KVTargetForbidden(
                    f"decode target {target.address!r} is not a decode pod this prefill pod "
                    "knows from discovery"
                )
            ids = proto_convert.prompt_ids(request.prompt_token_ids)
            resumed = proto_convert.num_output_tokens(request)  # a migrated request's output
            params = prefill_only(
                proto_convert.sampling_params_from_proto(request.sampling_params), resumed
            )
            if span.is_recording():
                span.set_attributes(
                    {
                        telemetry.REQUEST_ID: rid,
                        telemetry.GEN_AI_USAGE_INPUT_TOKENS: len(ids),
                        "tandem.prefill.decode_pod": target.address,
                        "tandem.prefill.skip_blocks": target.skip_blocks,
                    }
                )
            if self.core.stats.num_waiting >= self.settings.max_waiting:
                raise CapacityExceeded(f"{self.core.stats.num_waiting} prompts are already waiting")
            stream = self.core.open_stream(rid)
            arrival = time.monotonic()
            # The kv_transfer span (in the engine core process) continues this trace.
            carrier: dict[str, str] | None = None
            if span.is_recording():
                carrier = {}
                propagate.inject(carrier)

            async def claim_and_add() -> core_protocol.KVTargetSpec:
                chosen = await self.transports.choose(target, self.metrics)
                # A claimed lease is released by whoever may write: the core's KV sender once it
                # has the request, this process if the core never got it (then nothing wrote).
                try:
                    await self.core.add(
                        rid,
                        ids,
                        params,
                        priority=request.priority,
                        cache_salt=request.cache_salt or None,
                        kv_target=chosen,
                        trace_carrier=carrier,
                        num_output_tokens=resumed,
                    )
                except BaseException as exc:
                    if isinstance(exc, KVPoolUnmappable):
                        self.transports.unmappable(chosen, str(exc))
                    await self.transports.release(chosen)
                    raise
                return chosen

            # Not cut short by a cancel between the claim and the add (see above).
            task = asyncio.ensure_future(claim_and_add())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen if we left
            target = await asyncio.shield(task)
            if span.is_recording():
                span.set_attribute("tandem.kv.transport", target.transport)
            item = await stream.get()  # the first token, once its KV transfer ended
            if isinstance(item, BaseException):
                raise item
            metrics = RequestMetrics(
                arrival_time=arrival,
                first_scheduled_time=item.scheduled_time,
                first_token_time=item.first_token_time,
                finished_time=item.first_token_time,
            )
            self.metrics.observe_finished(metrics)
            if item.error is not None:
                self.metrics.transfer("failed")
                raise core_protocol.error_from_info(item.error)
            self.metrics.transfer("ok", item.transfer_bytes, item.transfer_seconds, item.transport)
            done = True
            timing = proto_convert.prefill_timing(metrics, item.transfer_seconds)
            if span.is_recording():
                span.set_attributes(
                    {
                        "tandem.prefill.cached_tokens": item.num_cached_tokens,
                        "tandem.prefill.queue_seconds": timing.queue_seconds,
                        "tandem.prefill.compute_seconds": timing.compute_seconds,
                        "tandem.prefill.transfer_seconds": timing.transfer_seconds,
                        "tandem.kv.bytes": item.transfer_bytes,
                        "tandem.kv.chunks": item.transfer_chunks,
                    }
                )
            return prefill_pb2.PrefillResponse(
                first_token_id=item.first_token_id,
                num_cached_tokens=item.num_cached_tokens,
                timing=timing,
                kv_bytes=item.transfer_bytes,
                kv_chunks=item.transfer_chunks,
                kv_transport=item.transport,
            )
        except TandemError as exc:
            span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            await abort_with(context, exc)
        finally:
            # Only what this call created: a refused duplicate id must not touch the original.
            if stream is not None:
                self.core.end_stream(rid, finished=done)

    def _target(self, request: prefill_pb2.PrefillRequest) -> core_protocol.KVTargetSpec:
        t = request.decode_target
        if not request.request_id:
            raise InvalidRequest("request_id is required", param="request_id")
        if not t.address or not t.request_id:
            raise InvalidRequest(
                "decode_target needs an address and a request_id", param="decode_target"
            )
        if t.model_fingerprint and t.model_fingerprint != self.fingerprint:
            raise KVFingerprintMismatch(
                f"the decode pod's model fingerprint {t.model_fingerprint!r} differs from this "
                f"prefill pod's {self.fingerprint!r}"
            )
        return core_protocol.KVTargetSpec(
            t.address,
            t.request_id,
            t.skip_blocks,
            transfer_token=t.transfer_token,
            block_ids=list(t.block_ids),
            lease_expires_unix_ms=t.lease_expires_unix_ms,
            incarnation=t.incarnation,
            checksum=self.settings.kv_checksum,
        )

    async def GetStats(self, request, context):
        return prefill_pb2.GetStatsResponse(stats=pod_stats(self.core, self.identity))


class KVTransportChooser:
    """Picks each transfer's transport (``tandem.transfer.transport.choose``) from what the
    decode pod offers (``DescribeKV``, cached per pod incarnation), and claims the lease of a
    memory transport before the engine may write. A fallback is logged at WARNING, counted and
    put on the span; with ``--kv-transport-strict`` it is refused instead."""

    def __init__(self, settings: PrefillSettings, info) -> None:
        self.mode = settings.kv_transport
        self.strict = settings.kv_transport_strict
        s = info.kv_spec
        self.local = LocalPool(
            (s.num_layers, 2, info.num_kv_blocks + 1, s.block_size, s.num_kv_heads, s.head_dim),
            torch.device(info.device),
            s.dtype,
        )
        self.available = local_transports(self.local.device.type)
        if info.tensor_parallel_size > 1:
            # Its pages are gathered onto rank 0 each step, outside any pool a memory writer
            # could copy from (KVSender(memory_transports=False)).
            self.available = ["grpc"]
        self.fingerprint = info.fingerprint
        self._offers: dict[str, tuple[str, list[PoolDescriptor]]] = {}
        """Decode address -> (its incarnation, its pools)."""
        self._unmappable: dict[tuple[str, str], dict[str, str]] = {}
        """(decode address, incarnation) -> {transport: why}: pools the engine core could not
        map (``KVPoolUnmappable``); that pod incarnation gets gRPC from then on, not a failure
        per request. A restarted pod (a new incarnation) is tried again."""
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> decode_pb2_grpc.DecodeServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = cluster_auth.aio_channel(address, CLIENT_OPTIONS)
            self._channels[address] = channel
        return decode_pb2_grpc.DecodeServiceStub(channel)

    async def _offer(self, target: core_protocol.KVTargetSpec) -> list[PoolDescriptor]:
        cached = self._offers.get(target.address)
        if cached is not None and cached[0] == target.incarnation:
            return cached[1]
        try:
            answer = await self._stub(target.address).DescribeKV(
                decode_pb2.DescribeKVRequest(), timeout=10.0
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                answer = decode_pb2.DescribeKVResponse(incarnation=target.incarnation)
            else:
                raise error_from_rpc(exc) from None
        pools = []
        for p in answer.pools:
            try:
                pools.append(descriptor_decoder.decode(p.descriptor))
            except msgspec.DecodeError:
                logger.warning(
                    "the decode pod %s sent an unreadable %s descriptor",
                    target.address,
                    p.transport,
                )
        self._offers[target.address] = (answer.incarnation, pools)
        return pools

    async def choose(
        self, target: core_protocol.KVTargetSpec, metrics: PodMetrics
    ) -> core_protocol.KVTargetSpec:
        """The transport and, for a memory transport, where to write; the lease claimed either
        way (the decode pod releases a reservation nobody claims within its claim deadline)."""
        if not target.transfer_token:
            return target  # a router that passes no lease: nothing to claim or map
        if self.mode == "grpc":
            await self._claim(target, "grpc")
            return target
        offer = await self._offer(target)
        unusable = self._unmappable.get((target.address, target.incarnation))
        choice = choose(self.mode, self.local, offer, local=self.available, unusable=unusable)
        if choice.fallback is not None:
            wanted = self.mode if self.mode != "auto" else self.available[0]
            if self.strict:
                raise KVTransferError(
                    f"--kv-transport-strict: no {wanted} transfer to {target.address}: "
                    f"{choice.fallback}"
                )
            logger.warning(
                "KV transfer to %s falls back to %s (%s)",
                target.address,
                choice.transport,
                choice.fallback,
            )
            metrics.fallback(wanted, choice.transport)
        if choice.descriptor is None:
            await self._claim(target, "grpc")
            return target
        chosen = msgspec.structs.replace(
            target,
            transport=choice.transport,
            descriptor=descriptor_encoder.encode(choice.descriptor),
        )
        sent = time.time()
        claim = await self._claim(chosen, choice.transport)
        # Where and until when to write: the decode pod's word, not the request's; the end on
        # this host's clock (the engine core's writer compares it with time.time()).
        return msgspec.structs.replace(
            chosen,
            block_ids=list(claim.block_ids),
            skip_blocks=claim.first_block,
            lease_expires_unix_ms=local_lease_end_ms(
                claim.lease_expires_unix_ms, claim.lease_remaining_ms, sent
            ),
        )

    def unmappable(self, chosen: core_protocol.KVTargetSpec, why: str) -> None:
        """The engine core could not map ``chosen``'s pool: later transfers to that decode pod
        incarnation do not try it again (``choose`` falls back, logged and counted)."""
        logger.warning(
            "the KV pool of %s cannot be mapped for %s here; later transfers to it fall back (%s)",
            chosen.address,
            chosen.transport,
            why,
        )
        key = (chosen.address, chosen.incarnation)
        for old in [k for k in self._unmappable if k[0] == chosen.address and k != key]:
            del self._unmappable[old]  # that incarnation is gone
        self._unmappable.setdefault(key, {})[chosen.transport] = "its pool could not be mapped here"

    async def _claim(
        self, target: core_protocol.KVTargetSpec, transport: str
    ) -> decode_pb2.ClaimKVResponse:
        """Take the reservation's lease for ``transport`` (gRPC too: the claim tells the decode
        pod a writer holds the reservation, before the prompt waits in this pod's queue)."""
        try:
            return await self._stub(target.address).ClaimKV(
                decode_pb2.ClaimKVRequest(
                    request_id=target.request_id,
                    transfer_token=target.transfer_token,
                    transport=transport,
                    renews=transport != "grpc",  # the sender's LeaseRenewer does
                ),
                timeout=10.0,
            )
        except grpc.RpcError as exc:
            if transport != "grpc" and exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                await self.release(target)  # the decode pod may have recorded the claim
            raise error_from_rpc(exc) from None

    async def release(self, target: core_protocol.KVTargetSpec) -> None:
        """Free a claimed lease nothing will write (best effort: the lease's end frees it)."""
        if target.transport == "grpc":
            return
        end = common_pb2.KVTransferEnd(
            request_id=target.request_id,
            model_fingerprint=self.fingerprint,
            transfer_token=target.transfer_token,
            transport=target.transport,
            aborted=True,
        )
        try:
            await self._stub(target.address).CompleteKV(
                decode_pb2.CompleteKVRequest(end=end), timeout=5.0
            )
        except grpc.RpcError:
            pass

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


async def start(settings: PrefillSettings) -> RunningService:
    """Start the engine core (loads the model) and serve; returns once the gRPC server is up."""
    publisher: KVEventPublisher | None = None

    def on_kv_events(events) -> None:
        if publisher is not None:
            publisher.enqueue(events)

    spec = CoreSpec(
        role="prefill",
        engine=settings.engine_config(),
        pod_id=settings.pod_id,
        enable_kv_events=settings.kvstore is not None,
        sender=SenderOptions(
            layers_per_group=settings.kv_layers_per_group,
            max_chunk_bytes=settings.kv_chunk_bytes,
            num_streams=settings.kv_streams,
            push_timeout_s=settings.kv_push_timeout_s,
            staging_buffers=settings.kv_staging_buffers,
        ),
    )
    pod = await PodRuntime.create(settings, spec, detokenize=False, on_kv_events=on_kv_events)
    if settings.kvstore is not None:

        async def snapshot():
            # Events the core sent before taking the snapshot are superseded by it.
            hashes = await pod.core.kv_snapshot()
            publisher.drop_pending()
            return hashes

        publisher = KVEventPublisher(
            settings.kvstore,
            pod_id=pod.identity["pod_id"],
            pod_address=settings.address(pod.server.port),
            incarnation=pod.identity["incarnation"],
            fingerprint=pod.identity["model_fingerprint"],
            block_size=pod.info.block_size,
            snapshot=snapshot,
            heartbeat_interval_s=settings.kvstore_heartbeat_s,
        )
    discovery = settings.make_discovery()
    await asyncio.to_thread(discovery.start)
    if settings.discovery == "static" and not settings.decode:
        logger.warning("no --decode pods configured: every Prefill request will be refused")
    targets = KnownTargets(
        discovery, "decode", min_lookup_interval_s=settings.decode_lookup_interval_s
    )
    servicer = PrefillServicer(settings, pod.core, pod.identity, pod.metrics, targets)
    prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, pod.server.server)
    service = await pod.start([], publisher=publisher)
    service.on_stop(discovery.close)
    service.on_stop(lambda: asyncio.ensure_future(servicer.transports.close()))
    if publisher is not None:
        service.on_stop(asyncio.create_task(publisher.run(), name="kv-events").cancel)
    return service


async def serve(settings: PrefillSettings) -> None:
    await serve_pod("prefill", settings, start)
