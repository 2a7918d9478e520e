"""RouterService: the router's gRPC front door, used by the client SDK."""

import asyncio
import uuid

import grpc

from services.router.auth import AUTHORIZATION, ApiKeys, KeyLease, KeyLimits, job_tokens
from services.router.flow import Dispatcher, Route
from services.router.input_limits import REQUEST_ID_MAX_CHARS, valid_request_id
from services.router.jobs import JobBuilder
from services.router.metrics import RouterMetrics
from services.router.request_trace import RequestTrace
from tandem import telemetry
from tandem.api import proto_convert
from tandem.api.errors import InvalidRequest, RequestTooLarge, TandemError
from tandem.api.grpc_status import abort_with
from tandem.api.requests import Job
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Generate and ListModels. The API key was checked by the server's interceptor; here each
    Generate takes its share of the key's limits (``services.router.auth``)."""

    def __init__(
        self,
        jobs: JobBuilder,
        dispatcher: Dispatcher,
        metrics: RouterMetrics,
        *,
        keys: ApiKeys | None = None,
        limits: KeyLimits | None = None,
    ) -> None:
        self.jobs = jobs
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.keys = keys
        self.limits = limits

    def _lease(self, context: grpc.aio.ServicerContext) -> KeyLease | None:
        if self.limits is None or not self.limits.enabled:
            return None
        key = None
        if self.keys is not None and self.keys.enabled:
            metadata = context.invocation_metadata() or ()
            key = self.keys.identify(next((v for k, v in metadata if k == AUTHORIZATION), None))
        return self.limits.open(key)

    def _job(self, request: router_pb2.GenerateRequest) -> Job:
        self.jobs.check_model(request.model)
        # The bounds of the HTTP API (services/router/input_limits.py): a text the context could
        # never hold is refused before tokenizing, token ids before they are copied.
        request_id = request.request_id or uuid.uuid4().hex
        if valid_request_id(request_id) is None:
            raise InvalidRequest(
                f"request_id must be 1 to {REQUEST_ID_MAX_CHARS} characters of "
                "[A-Za-z0-9._:/+=@~-]",
                param="request_id",
            )
        which = request.WhichOneof("prompt")
        if which == "text":
            ids = self.jobs.encode(request.text)
        elif which == "token_ids":
            if len(request.token_ids.ids) >= self.jobs.max_model_len:
                raise RequestTooLarge(
                    f"this model's maximum context length is {self.jobs.max_model_len} tokens, "
                    f"but the prompt has {len(request.token_ids.ids)}",
                    param="prompt",
                )
            ids = list(request.token_ids.ids)
        else:
            raise InvalidRequest("a prompt (text or token_ids) is required", param="prompt")
        return self.jobs.job(
            request_id,
            ids,
            proto_convert.sampling_fields_from_proto(request.sampling_params),
            priority=request.priority,
            cache_salt=request.cache_salt or None,
        )

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ):
        span = telemetry.start_server_span(context, "/tandem.router.v1.RouterService/Generate")
        error: TandemError | None = None
        route: Route | None = None
        lease: KeyLease | None = None
        try:
            lease = self._lease(context)
            job = await asyncio.to_thread(
                self._job, request
            )  # tokenizing a long prompt: off the loop
            if lease is not None:
                lease.reserve(job_tokens([job]))
            route = Route(
                trace=RequestTrace(
                    "text_completion", job.request_id, self.jobs.model_name, [job], span=span
                )
            )
            async for event in self.dispatcher.generate(job, route):
                response = router_pb2.GenerateResponse(
                    request_id=job.request_id, chunk=proto_convert.event_chunk(event)
                )
                if event.usage is not None:
                    response.usage.CopyFrom(proto_convert.usage_to_proto(event.usage))
                yield response
        except TandemError as exc:
            error = exc
            await abort_with(context, exc)
        finally:
            if lease is not None:
                lease.close()
            if route is not None:  # counted once it ran (or failed), retries included, as over HTTP
                self.metrics.observe_route(route, len(job.prompt_token_ids))
            telemetry.end_server_span(span, error)

    async def ListModels(self, request, context):
        model = router_pb2.Model(id=self.jobs.model_name, max_model_len=self.jobs.max_model_len)
        return router_pb2.ListModelsResponse(models=[model])
