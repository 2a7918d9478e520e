"""The prefill service: ``PrefillService`` over an engine in the prefill role.

``Prefill`` queues the prompt in the engine (continuous batching, chunked prefill, prefix
cache) as a one-token request. While the forward runs, the KV sender streams each finished
layer group's pages to the decode pod named in the request; once the first token is sampled
the transfer is closed with it, and the call returns when the decode pod acknowledged it.
"""

import asyncio
import dataclasses
import logging

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.prefill.settings import PrefillSettings
from tandem import telemetry
from tandem.api import proto_convert
from tandem.api.errors import CapacityExceeded, InvalidRequest, KVFingerprintMismatch, TandemError
from tandem.api.grpc_status import abort_with
from tandem.api.outputs import OutputKind
from tandem.api.sampling_params import SamplingParams
from tandem.engine.llm_engine import LLMEngine
from tandem.proto.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from tandem.serving.engine_worker import EngineWorker
from tandem.serving.grpc_server import RunningService
from tandem.serving.kv_event_publisher import KVEventPublisher
from tandem.serving.pod import PodRuntime, pod_stats, serve_pod
from tandem.serving.pod_metrics import PodMetrics
from tandem.transfer.push_streams import KVTarget
from tandem.transfer.sender import KVSender

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
        worker: EngineWorker,
        sender: KVSender,
        identity: dict,
        metrics: PodMetrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.worker = worker
        self.sender = sender
        self.identity = identity
        self.fingerprint = worker.engine.fingerprint.digest()

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
            if self.worker.stats.num_waiting >= self.settings.max_waiting:
                raise CapacityExceeded(
                    f"{self.worker.stats.num_waiting} prompts are already waiting"
                )
            stream = self.worker.open_stream(rid)
            # The kv_transfer span's parent, handed to the engine thread explicitly.
            trace_context = otel_context.get_current() if span.is_recording() else None
            await self.worker.call(
                lambda e: self._add(e, request, ids, params, target, trace_context)
            )
            item = await stream.get()
            if isinstance(item, BaseException):
                raise item
            self.metrics.observe_finished(item.metrics)
            end = proto_convert.transfer_end(item, target.request_id, self.fingerprint)
            try:
                result = await asyncio.wrap_future(self.sender.finish(rid, end))
            except TandemError:
                self.metrics.transfer("failed")
                raise
            self.metrics.transfer("ok", result.bytes, result.seconds)
            done = True
            timing = proto_convert.prefill_timing(item.metrics, result.seconds)
            if span.is_recording():
                span.set_attributes(
                    {
                        "tandem.prefill.cached_tokens": item.num_cached_tokens,
                        "tandem.prefill.queue_seconds": timing.queue_seconds,
                        "tandem.prefill.compute_seconds": timing.compute_seconds,
                        "tandem.prefill.transfer_seconds": timing.transfer_seconds,
                        "tandem.kv.bytes": result.bytes,
                        "tandem.kv.chunks": result.chunks,
                    }
                )
            return prefill_pb2.PrefillResponse(
                first_token_id=end.first_token_id,
                num_cached_tokens=item.num_cached_tokens,
                timing=timing,
                kv_bytes=result.bytes,
                kv_chunks=result.chunks,
            )
        except TandemError as exc:
            span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            await abort_with(context, exc)
        finally:
            # Only what this call created: a refused duplicate id must not touch the original.
            if stream is not None:
                self.worker.end_stream(rid, finished=done)

    def _target(self, request: prefill_pb2.PrefillRequest) -> KVTarget:
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
        return KVTarget(t.address, t.request_id, t.skip_blocks, self.fingerprint)

    def _add(
        self, engine: LLMEngine, request, ids, params, target: KVTarget, trace_context
    ) -> None:
        """Engine thread: register the KV transfer, then queue the prompt."""
        rid = request.request_id
        self.sender.start(rid, target, len(ids), trace_context)
        try:
            engine.add_request(
                rid,
                ids,
                params,
                priority=request.priority,
                cache_salt=request.cache_salt or None,
                output_kind=OutputKind.FINAL_ONLY,
            )
        except BaseException:
            self.sender.abort(rid)
            raise

    async def GetStats(self, request, context):
        return prefill_pb2.GetStatsResponse(stats=pod_stats(self.worker, self.identity))


def release_request(sender: KVSender, engine: LLMEngine, rid: str) -> None:
    """Engine thread: stop the request's KV transfer, then free its blocks."""
    sender.abort(rid)
    engine.abort_request(rid)


async def start(settings: PrefillSettings) -> RunningService:
    """Load the model and start serving; returns once the gRPC server is up."""
    engine = LLMEngine(settings.engine_config(), enable_kv_events=settings.kvstore is not None)
    sender = KVSender(
        engine.runner.kv_spec,
        engine.fingerprint.digest(),
        layers_per_group=settings.kv_layers_per_group,
        max_chunk_bytes=settings.kv_chunk_bytes,
        num_streams=settings.kv_streams,
        push_timeout_s=settings.kv_push_timeout_s,
        staging_buffers=settings.kv_staging_buffers,
        device=engine.runner.device,
    )
    engine.set_kv_layer_hook(sender)
    publisher: KVEventPublisher | None = None
    after_step = None
    if settings.kvstore is not None:

        def after_step(e: LLMEngine) -> None:
            publisher.enqueue(e.take_kv_events())

    pod = PodRuntime.create(
        "prefill",
        settings,
        engine,
        after_step=after_step,
        release=lambda e, rid: release_request(sender, e, rid),
    )
    if settings.kvstore is not None:

        async def snapshot():
            # On the engine thread: queued events are superseded by the full list of cached blocks.
            return await pod.worker.call(
                lambda e: (publisher.drop_pending(), e.take_kv_events(), e.cached_block_hashes())[2]
            )

        publisher = KVEventPublisher(
            settings.kvstore,
            pod_id=pod.identity["pod_id"],
            pod_address=settings.address(pod.server.port),
            incarnation=pod.identity["incarnation"],
            fingerprint=pod.identity["model_fingerprint"],
            block_size=engine.config.block_size,
            snapshot=snapshot,
            heartbeat_interval_s=settings.kvstore_heartbeat_s,
        )
    servicer = PrefillServicer(settings, pod.worker, sender, pod.identity, pod.metrics)
    prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, pod.server.server)
    service = await pod.start([sender.close], sender=sender, publisher=publisher)
    if publisher is not None:
        service.on_stop(asyncio.create_task(publisher.run(), name="kv-events").cancel)
    return service


async def serve(settings: PrefillSettings) -> None:
    await serve_pod("prefill", settings, start)
