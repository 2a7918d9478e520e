"""RouterService: the router's gRPC front door, used by the client SDK."""

import asyncio
import uuid

import grpc

from services.router.flow import Route
from services.router.metrics import RouterMetrics
from services.router.openai_api import OpenAIServing
from services.router.request_trace import RequestTrace
from tandem import telemetry
from tandem.errors import InvalidRequest, TandemError
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.serving import convert
from tandem.serving.requests import Job
from tandem.serving.status import abort_with


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, serving: OpenAIServing, metrics: RouterMetrics) -> None:
        self.serving = serving
        self.metrics = metrics

    def _job(self, request: router_pb2.GenerateRequest) -> Job:
        self.serving.check_model(request.model)
        which = request.WhichOneof("prompt")
        if which == "text":
            ids = self.serving.tokenizer.encode(request.text)
        elif which == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            raise InvalidRequest("a prompt (text or token_ids) is required", param="prompt")
        sp = request.sampling_params
        requested = sp.max_tokens if sp.HasField("max_tokens") else None
        max_tokens = self.serving.resolve_max_tokens(ids, requested, "prompt")
        params = convert.sampling_params_from_proto(
            sp, max_tokens=max_tokens, defaults=self.serving.sampling_defaults
        )
        rid = request.request_id or uuid.uuid4().hex
        return Job(rid, ids, params, request.priority, request.cache_salt or None)

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ):
        span = telemetry.start_server_span(context, "/tandem.router.v1.RouterService/Generate")
        error: TandemError | None = None
        route: Route | None = None
        try:
            job = await asyncio.to_thread(
                self._job, request
            )  # tokenizing a long prompt: off the loop
            route = Route(
                trace=RequestTrace(
                    "text_completion", job.request_id, self.serving.model_name, [job], span=span
                )
            )
            async for event in self.serving.dispatcher.generate(job, route):
                response = router_pb2.GenerateResponse(
                    request_id=job.request_id, chunk=convert.event_chunk(event)
                )
                if event.usage is not None:
                    response.usage.CopyFrom(convert.usage_to_proto(event.usage))
                yield response
        except TandemError as exc:
            error = exc
            await abort_with(context, exc)
        finally:
            if route is not None:  # counted once it ran (or failed), retries included, as over HTTP
                self.metrics.observe_route(route, len(job.prompt_token_ids))
            telemetry.end_server_span(span, error)

    async def ListModels(self, request, context):
        model = router_pb2.Model(
            id=self.serving.model_name, max_model_len=self.serving.max_model_len
        )
        return router_pb2.ListModelsResponse(models=[model])
