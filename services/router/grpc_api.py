"""RouterService: the router's gRPC front door, used by the client SDK.

``Generate`` takes a prompt (text or token ids); ``Chat`` a conversation, rendered by the HTTP
chat route's own code (``OpenAIServing.chat_prompt_ids``, handed in as ``chat_prompt``) so both
doors build the same prompt from the same messages. Both stream the same responses.

A Chat with ``tools`` is planned by the HTTP route's own ``tool_calls.plan_tools`` (handed in as
``tool_plan``: the same validation, parser and structured-decoding constraint) and each
completion's text goes through the plan's ``ToolCallStream`` as the SSE stream's does: its
deltas become ``ChatResponse.content`` and ``ChatResponse.tool_calls``, its finish reason
``ChatResponse.finish_reason`` ("tool_calls" where HTTP answers it).
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
from services.router.structured_request import only_one
from services.router.tool_calls import ToolCallStream, ToolPlan, plan_tools
from tandem import telemetry
from tandem.api import proto_convert
from tandem.api.errors import InvalidRequest, RequestTooLarge, TandemError
from tandem.api.grpc_status import abort_with
from tandem.api.requests import Job, TokenEvent
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
        tool_plan: Callable[[ChatCompletionRequest], ToolPlan | None] | None = None,
    ) -> None:
        """
        Args:
            chat_prompt: a conversation's prompt ids, as the HTTP chat route renders it (Chat
                answers UNIMPLEMENTED without it).
            tool_plan: a conversation's tool plan, as the HTTP chat route makes it
                (``OpenAIServing.tool_plan``: the router's ``--tool-call-parser`` and
                ``--enable-auto-tool-choice``); default: no parser, so no ``auto`` choice.
        """
        self.jobs = jobs
        self.chat_prompt = chat_prompt
        self.tool_plan = tool_plan or _plan_without_parser
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

    def _generate_call(self, request: router_pb2.GenerateRequest):
        job = self._job(request)
        return job, lambda event: _response(router_pb2.GenerateResponse, job.request_id, event)

    def _chat_call(self, request: router_pb2.ChatRequest):
        job, plan = self._chat_job(request)
        return job, _ChatReplies(job.request_id, plan)

    def _chat_job(self, request: router_pb2.ChatRequest) -> tuple[Job, ToolPlan | None]:
        """The conversation as the HTTP chat route receives it, rendered by its code; its tools
        planned by its code too (the plan's constraint joins the sampling fields as
        ``structured_outputs``, so it cannot be combined with another)."""
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
            "tools": _json_field(request.tools, "tools") if request.tools else None,
            "tool_choice": _tool_choice(request.tool_choice) if request.tool_choice else None,
            "parallel_tool_calls": (
                request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None
            ),
        }
        try:
            chat = ChatCompletionRequest.model_validate(body)
        except pydantic.ValidationError as exc:
            raise InvalidRequest(_validation_message(exc), param=_validation_param(exc)) from None
        plan = self.tool_plan(chat)
        sampling = proto_convert.sampling_fields_from_proto(request.sampling_params)
        if plan is not None:
            if plan.constraint is not None:
                if "structured_outputs" in sampling:  # as HTTP: one output constraint
                    only_one(["structured_outputs", "tool_choice"])
                sampling["structured_outputs"] = plan.constraint
            if plan.skip_special_tokens is not None:
                sampling["skip_special_tokens"] = plan.skip_special_tokens
        job = self.jobs.job(
            request_id,
            self.chat_prompt(chat),
            sampling,
            priority=request.priority,
            cache_salt=request.cache_salt or None,
            prompt_param="messages",
        )
        return job, plan

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ):
        async for response in self._serve(request, context, self._generate_call, "Generate"):
            yield response

    async def Chat(self, request: router_pb2.ChatRequest, context: grpc.aio.ServicerContext):
        if self.chat_prompt is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this router serves no Chat")
        async for response in self._serve(request, context, self._chat_call, "Chat"):
            yield response

    async def _serve(self, request, context: grpc.aio.ServicerContext, make_call, rpc):
        """Run the job ``make_call(request)`` builds and stream its events through the responder
        it returns with it (an event -> the response to send)."""
        span = telemetry.start_server_span(context, f"/tandem.router.v1.RouterService/{rpc}")
        error: TandemError | None = None
        route: Route | None = None
        lease: KeyLease | None = None
        operation = "chat" if rpc == "Chat" else "text_completion"
        try:
            lease = self._lease(context)
            job, respond = await asyncio.to_thread(make_call, request)  # tokenizing: off the loop
            if lease is not None:
                lease.reserve(job_tokens([job]))
            route = Route(
                trace=RequestTrace(
                    operation, job.request_id, self.jobs.model_name, [job], span=span
                )
            )
            async for event in self.dispatcher.generate(job, route):
                yield respond(event)
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


def _response(response_cls, request_id: str, event: TokenEvent):
    """A router token event as a GenerateResponse or ChatResponse."""
    response = response_cls(request_id=request_id, chunk=proto_convert.event_chunk(event))
    if event.usage is not None:
        response.usage.CopyFrom(proto_convert.usage_to_proto(event.usage))
    return response


class _ChatReplies:
    """A Chat call's events as ChatResponses. With a tool plan, each completion's text goes
    through its own ``ToolCallStream`` (as ``OpenAIServing.chat_sse`` sends it): its content
    deltas joined into ``content``, its tool-call deltas into ``tool_calls``, and its finish
    reason (``tool_calls`` where the model called tools) into ``finish_reason``."""

    def __init__(self, request_id: str, plan: ToolPlan | None) -> None:
        self.request_id = request_id
        self.plan = plan
        self.streams: dict[int, ToolCallStream] = {}

    def __call__(self, event: TokenEvent) -> router_pb2.ChatResponse:
        response = _response(router_pb2.ChatResponse, self.request_id, event)
        finish = event.finish_reason
        if self.plan is not None:
            stream = self.streams.get(event.index)
            if stream is None:
                stream = self.streams[event.index] = self.plan.stream()
            deltas = stream.feed(event.text)
            if finish is not None:
                deltas += stream.finish()
                finish = stream.finish_reason(finish)
            response.content = "".join(d.get("content") or "" for d in deltas)
            for delta in deltas:
                for call in delta.get("tool_calls", ()):
                    function = call.get("function", {})
                    response.tool_calls.add(
                        index=call["index"],
                        id=call.get("id", ""),
                        name=function.get("name", ""),
                        arguments=function.get("arguments", ""),
                    )
        if finish is not None:
            response.finish_reason = finish
        return response


def _plan_without_parser(chat: ChatCompletionRequest) -> ToolPlan | None:
    return plan_tools(
        chat.tools, chat.tool_choice, chat.parallel_tool_calls, parser_name=None, enable_auto=False
    )


def _json_field(text: str, param: str) -> object:
    """A JSON text field of the request, parsed.

    Raises:
        InvalidRequest: naming ``param``, when the text is not JSON.
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(
            f"{param} must be a JSON text: {type(exc).__name__}: {exc}", param=param
        ) from None


def _tool_choice(text: str) -> object:
    """``tool_choice``: JSON (``"required"``, an object), or one of the bare words."""
    if text in ("none", "auto", "required"):
        return text
    return _json_field(text, "tool_choice")


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
