"""The prefill service: ``PrefillService`` over an engine in the prefill role.

``Prefill`` queues the prompt in the pod's engine core process (continuous batching, chunked
prefill, prefix cache) as a one-token request. While the forward runs, the core's KV sender
streams each finished layer group's pages to the decode pod named in the request; once the
first token is sampled the core closes the transfer with it, and the call returns when the
decode pod acknowledged it. This process holds the gRPC server and the kvstore publisher.
"""

import asyncio
import dataclasses
import logging
import time

import grpc
from opentelemetry import propagate, trace

from services.prefill.settings import PrefillSettings
from tandem import telemetry
from tandem.api import proto_convert
from tandem.api.errors import CapacityExceeded, InvalidRequest, KVFingerprintMismatch, TandemError
from tandem.api.grpc_status import abort_with
from tandem.api.outputs import RequestMetrics
from tandem.api.sampling_params import SamplingParams
from tandem.proto.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from tandem.serving import core_protocol
from tandem.serving.engine_client import EngineCoreClient
from tandem.serving.engine_core import CoreSpec, SenderOptions
from tandem.serving.grpc_server import RunningService
from tandem.serving.kv_event_publisher import KVEventPublisher
from tandem.serving.pod import PodRuntime, pod_stats, serve_pod
from tandem.serving.pod_metrics import PodMetrics

logger = logging.getLogger(__name__)


def prefill_only(params: SamplingParams) -> SamplingParams:
    """The request as a prefill pod runs it: one token, sampled like the decode pod would.

    Stop strings are the decode pod's business (it detokenizes the first token too).
    """
    return dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=())


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(
        self,
        settings: PrefillSettings,
        core: EngineCoreClient,
        identity: dict,
        metrics: PodMetrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.core = core
        self.identity = identity
        self.fingerprint = core.info.fingerprint

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
            ids = proto_convert.prompt_ids(request.prompt_token_ids)
            params = prefill_only(proto_convert.sampling_params_from_proto(request.sampling_params))
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
            await self.core.add(
                rid,
                ids,
                params,
                priority=request.priority,
                cache_salt=request.cache_salt or None,
                kv_target=target,
                trace_carrier=carrier,
            )
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
            self.metrics.transfer("ok", item.transfer_bytes, item.transfer_seconds)
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
        return core_protocol.KVTargetSpec(t.address, t.request_id, t.skip_blocks)

    async def GetStats(self, request, context):
        return prefill_pb2.GetStatsResponse(stats=pod_stats(self.core, self.identity))


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
    servicer = PrefillServicer(settings, pod.core, pod.identity, pod.metrics)
    prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, pod.server.server)
    service = await pod.start([], publisher=publisher)
    if publisher is not None:
        service.on_stop(asyncio.create_task(publisher.run(), name="kv-events").cancel)
    return service


async def serve(settings: PrefillSettings) -> None:
    await serve_pod("prefill", settings, start)
