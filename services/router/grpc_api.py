"""RouterService: the router's gRPC front door, used by the client SDK.

``Generate`` takes a prompt (text or token ids); ``Chat`` a conversation, rendered by the HTTP
chat route's own code (``OpenAIServing.chat_prompt_ids``, handed in as ``chat_prompt``) so both
doors build the same prompt from the same messages. Both stream the same responses.
"""

import asyncio
import json
import uuid
from collections.abc import Callable

import grpc
import pydantic

from services.router.auth import AUTHORIZATION, ApiKeys, KeyLease, KeyLimits, job_tokens
from services.router.flow import Dispatcher, Route
from services.router.input_limits import REQUEST_ID_MAX_CHARS, valid_request_id
from services.router.jobs import JobBuilder
from services.router.metrics import RouterMetrics
from services.router.openai_protocol import ChatCompletionRequest
from services.router.request_trace import RequestTrace
from tandem import telemetry
from tandem.api import proto_convert
from tandem.api.errors import InvalidRequest, RequestTooLarge, TandemError
from tandem.api.grpc_status import abort_with
from tandem.api.requests import Job
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Generate, Chat and ListModels. The API key was checked by the server's interceptor; here
    each Generate or Chat takes its share of the key's limits (``services.router.auth``)."""

    def __init__(
        self,
        jobs: JobBuilder,
        dispatcher: Dispatcher,
        metrics: RouterMetrics,
        *,
        keys: ApiKeys | None = None,
        limits: KeyLimits | None = None,
        chat_prompt: Callable[[ChatCompletionRequest], list[int]] | None = None,
    ) -> None:
        """
        Args:
            chat_prompt: a conversation's prompt ids, as the HTTP chat route renders it (Chat
                answers UNIMPLEMENTED without it).
        """
        self.jobs = jobs
        self.chat_prompt = chat_prompt
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

    @staticmethod
    def _request_id(request) -> str:
        request_id = request.request_id or uuid.uuid4().hex
        if valid_request_id(request_id) is None:
            raise InvalidRequest(
                f"request_id must be 1 to {REQUEST_ID_MAX_CHARS} characters of "
                "[A-Za-z0-9._:/+=@~-]",
                param="request_id",
            )
        return request_id

    def _job(self, request: router_pb2.GenerateRequest) -> Job:
        self.jobs.check_model(request.model)
        # The bounds of the HTTP API (services/router/input_limits.py): a text the context could
        # never hold is refused before tokenizing, token ids before they are copied.
        request_id = self._request_id(request)
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

    def _chat_job(self, request: router_pb2.ChatRequest) -> Job:
        """The conversation as the HTTP chat route receives it, rendered by its code."""
        self.jobs.check_model(request.model)
        request_id = self._request_id(request)
        kwargs = None
        if request.chat_template_kwargs:
            try:
                kwargs = json.loads(request.chat_template_kwargs)
            except (ValueError, RecursionError):
                kwargs = None
            if not isinstance(kwargs, dict):
                raise InvalidRequest(
                    "chat_template_kwargs must be a JSON object", param="chat_template_kwargs"
                )
        body = {
            "model": request.model or None,
            "messages": [_message_json(m) for m in request.messages],
            "add_generation_prompt": (
                request.add_generation_prompt if request.HasField("add_generation_prompt") else True
            ),
            "chat_template_kwargs": kwargs,
        }
        try:
            chat = ChatCompletionRequest.model_validate(body)
        except pydantic.ValidationError as exc:
            raise InvalidRequest(_validation_message(exc), param=_validation_param(exc)) from None
        return self.jobs.job(
            request_id,
            self.chat_prompt(chat),
            proto_convert.sampling_fields_from_proto(request.sampling_params),
            priority=request.priority,
            cache_salt=request.cache_salt or None,
            prompt_param="messages",
        )

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ):
        async for response in self._serve(
            request, context, self._job, router_pb2.GenerateResponse, "Generate"
        ):
            yield response

    async def Chat(self, request: router_pb2.ChatRequest, context: grpc.aio.ServicerContext):
        if self.chat_prompt is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this router serves no Chat")
        async for response in self._serve(
            request, context, self._chat_job, router_pb2.ChatResponse, "Chat"
        ):
            yield response

    async def _serve(self, request, context: grpc.aio.ServicerContext, make_job, response_cls, rpc):
        """Run the job ``make_job(request)`` builds and stream its events as ``response_cls``."""
        span = telemetry.start_server_span(context, f"/tandem.router.v1.RouterService/{rpc}")
        error: TandemError | None = None
        route: Route | None = None
        lease: KeyLease | None = None
        operation = "chat" if rpc == "Chat" else "text_completion"
        try:
            lease = self._lease(context)
            job = await asyncio.to_thread(make_job, request)  # tokenizing: off the loop
            if lease is not None:
                lease.reserve(job_tokens([job]))
            route = Route(
                trace=RequestTrace(
                    operation, job.request_id, self.jobs.model_name, [job], span=span
                )
            )
            async for event in self.dispatcher.generate(job, route):
                response = response_cls(
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


def _message_json(m: router_pb2.ChatMessage) -> dict:
    """A ChatMessage as OpenAI's JSON has it (unset fields left out)."""
    message: dict = {"role": m.role}
    if m.HasField("content"):
        message["content"] = m.content
    if m.name:
        message["name"] = m.name
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in m.tool_calls
        ]
    return message


def _validation_param(exc: pydantic.ValidationError) -> str | None:
    err = exc.errors()[0] if exc.errors() else {}
    return ".".join(str(p) for p in err.get("loc", ()) if isinstance(p, int | str)) or None


def _validation_message(exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0] if exc.errors() else {}
    param = _validation_param(exc)
    message = err.get("msg", "invalid value")
    return f"{param}: {message}" if param else message
