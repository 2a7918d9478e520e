"""The router's FastAPI application: OpenAI routes, health, metrics; gRPC server alongside.

The gRPC RouterService runs on the same event loop, started and stopped with the app.
"""

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.router.auth import ApiKeyAuth, ApiKeys, KeyLimits, load_api_keys, reserve_tokens
from services.router.drain import DrainGate
from services.router.flow import Dispatcher, Route
from services.router.grpc_api import RouterServicer
from services.router.http_errors import error_body, error_response, http_exception_response
from services.router.input_limits import (
    BodyLimits,
    InputLimitsMiddleware,
    LargeTextGate,
    ParsedBodyRoute,
    valid_request_id,
)
from services.router.jobs import JobBuilder
from services.router.metrics import RouterMetrics
from services.router.openai_api import OpenAIServing, merge_events
from services.router.openai_protocol import ChatCompletionRequest, CompletionRequest
from services.router.pods import PodRegistry
from services.router.prefix_index import PrefixIndexClient
from services.router.request_trace import RequestTrace
from services.router.settings import RouterSettings
from services.router.utility_routes import add_utility_routes, model_card
from tandem import telemetry
from tandem.api import cluster_auth
from tandem.api.errors import RequestCancelled, TandemError, UpstreamUnavailable
from tandem.model_dir import load_model_config
from tandem.proto.router.v1 import router_pb2_grpc
from tandem.serving.grpc_server import GrpcServer
from tandem.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"


async def run_unless_disconnected(request: Request, coro):
    """Await ``coro``, cancelling it if the HTTP client goes away first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise RequestCancelled("the client disconnected")
    finally:
        if not task.done():
            task.cancel()


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _is_field(part) -> bool:
    """Location parts that name a field or an index, not a union member's type tag."""
    return isinstance(part, int) or (
        "[" not in part and part.split("-")[0].lower() not in _UNION_TAGS
    )


class RequestIdAndMetrics:
    """Pure ASGI middleware: echoes/assigns ``x-request-id`` and counts requests by route/status.

    NOTE: not Starlette's BaseHTTPMiddleware, which wraps ``receive`` so that handlers can no
    longer see the client disconnect (and a gone client's generation would run to the end).
    """

    def __init__(self, app, metrics: RouterMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        # An over-long or odd id is replaced (input_limits.valid_request_id).
        request_id = valid_request_id(headers.get(REQUEST_ID_HEADER.encode())) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        trace.get_current_span().set_attribute(
            telemetry.REQUEST_ID, request_id
        )  # the HTTP server span
        start = time.perf_counter()
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (REQUEST_ID_HEADER.encode(), request_id.encode()),
                    ],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.request_duration.labels(path).observe(time.perf_counter() - start)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in err.get("loc", ()) if part != "body" and _is_field(part)]
    if err.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None
    else:
        param = ".".join(loc) or None
        message = (
            f"{param}: {err.get('msg', 'invalid value')}"
            if param
            else err.get("msg", "invalid request")
        )
    return JSONResponse(error_body(message, 400, "BadRequestError", param), status_code=400)


def create_app(settings: RouterSettings) -> FastAPI:
    """The router app: OpenAI routes over a Dispatcher, gRPC RouterService started alongside."""
    tokenizer = Tokenizer(settings.model)
    model_config = load_model_config(settings.model)
    # The secret every call to the pods and kvstore carries (a router without one refuses to
    # start unless --allow-unauthenticated); the API keys its own clients must send.
    cluster_auth.install(settings.cluster_auth())
    keys = ApiKeys(tuple(load_api_keys(settings.api_key, settings.api_key_file)))
    key_limits = KeyLimits(settings.max_requests_per_key, settings.max_reserved_tokens_per_key)
    registry = PodRegistry(
        settings.make_discovery(),
        interval_s=settings.stats_interval_s,
        timeout_s=settings.pod_timeout_s,
        stall_timeout_s=settings.stall_timeout_s,
    )
    prefix_index = (
        PrefixIndexClient(settings.kvstore, settings.kvstore_timeout_s)
        if settings.kvstore
        else None
    )
    dispatcher = Dispatcher(registry, settings, prefix_index)
    configured_context = settings.max_model_len or model_config.max_position_embeddings

    def served_context() -> int:
        """The configured context, or less if a decode pod reports less (a pod caps it to what
        its KV pool holds)."""
        reported = [
            p.stats.max_model_len
            for p in registry.by_role("decode")
            if p.stats and p.stats.max_model_len
        ]
        return min([configured_context, *reported])

    jobs = JobBuilder(
        tokenizer,
        model_name=settings.model_name(),
        vocab_size=model_config.vocab_size,
        max_model_len=served_context,
        sampling_defaults=settings.sampling_defaults(),
        max_prompts_per_request=settings.max_prompts_per_request,
        max_n=settings.max_n,
    )
    serving = OpenAIServing(
        jobs,
        dispatcher,
        trust_request_chat_template=settings.trust_request_chat_template,
        tool_call_parser=settings.tool_call_parser,
        enable_auto_tool_choice=settings.enable_auto_tool_choice,
    )
    metrics = RouterMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await registry.start()
        if prefix_index is not None:
            await prefix_index.start()
        server = GrpcServer(
            settings.host,
            settings.grpc_port,
            ["tandem.router.v1.RouterService"],
            auth=keys.check_grpc if keys.enabled else None,
            auth_message="missing or invalid API key (authorization: Bearer <key>)",
            tls=settings.tls_pem(),
            # A RouterService call carries what an HTTP body does: refused past the same bound.
            max_receive_message_length=settings.max_request_body_bytes,
        )
        router_pb2_grpc.add_RouterServiceServicer_to_server(
            RouterServicer(
                jobs,
                dispatcher,
                metrics,
                keys=keys,
                limits=key_limits,
                chat_prompt=serving.chat_prompt_ids,
                tool_plan=serving.tool_plan,
            ),
            server.server,
        )
        await server.start()
        app.state.grpc_port, app.state.grpc_server = server.port, server
        # Discovered pods, not only those up: pods still loading their model are counted too
        # (each one's "is up" line follows when it first answers).
        logger.info(
            "router gRPC on port %d; %s discovery: %s",
            server.port,
            settings.discovery,
            ", ".join(
                f"{role} pods {len(registry.by_role(role, healthy=False))} "
                f"({len(registry.by_role(role))} up)"
                for role in ("prefill", "decode")
            ),
        )
        try:
            yield
        finally:
            # SDK streams in flight finish (a drain began this stop already: it is awaited)
            await server.stop(settings.shutdown_grace_s)
            await registry.close()
            if prefix_index is not None:
                await prefix_index.close()

    app = FastAPI(title="Tandem router", lifespan=lifespan)
    app.router.route_class = ParsedBodyRoute  # FastAPI takes InputLimitsMiddleware's parse
    telemetry.instrument_fastapi(app)
    app.state.registry, app.state.serving, app.state.metrics = registry, serving, metrics
    _add_error_handlers(app, settings)
    app.add_middleware(
        InputLimitsMiddleware,
        limits=BodyLimits(
            settings.max_request_body_bytes,
            settings.body_read_timeout_s,
            max_json_values=lambda: jobs.max_json_values,
            max_json_containers=lambda: jobs.max_json_containers,
            check_json=jobs.check_json_shape,
        ),
    )  # inside ApiKeyAuth: a client without a key cannot make the router read a body
    app.add_middleware(
        ApiKeyAuth, keys=keys, limits=key_limits, retry_after_s=settings.retry_after_s
    )  # inside RequestIdAndMetrics: refusals are counted and carry the request id
    # The SIGTERM drain's gate (server.py starts the drain through app.state.drain_gate): inside
    # RequestIdAndMetrics too, so its 503s carry x-request-id and are counted.
    app.state.drain_gate = DrainGate(retry_after_s=settings.retry_after_s)
    app.add_middleware(app.state.drain_gate.wrap)
    app.add_middleware(RequestIdAndMetrics, metrics=metrics)
    large_texts = LargeTextGate()
    _add_openai_routes(app, serving, metrics, large_texts)
    add_utility_routes(  # /tokenize, /detokenize, /version, ...
        app,
        serving,
        large_texts,
        tokenizer_info=settings.enable_tokenizer_info_endpoint,
    )
    _add_operational_routes(app, serving, metrics)
    return app


def _add_error_handlers(app: FastAPI, settings: RouterSettings) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return http_exception_response(exc)  # 404, 405, ... in the OpenAI envelope

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(TandemError)
    async def on_tandem_error(request: Request, exc: TandemError):
        return error_response(exc, retry_after_s=settings.retry_after_s)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(exc)


def _add_openai_routes(
    app: FastAPI, serving: OpenAIServing, metrics: RouterMetrics, large_texts: LargeTextGate
) -> None:
    dispatcher = serving.dispatcher

    def count_routes(routes: list[Route], jobs) -> None:
        for route, job in zip(routes, jobs, strict=False):
            metrics.observe_route(route, len(job.prompt_token_ids))

    async def counted(stream, routes: list[Route], jobs):
        """An SSE stream whose requests are counted when it ends: by then every prompt of it is
        placed (or failed), retries included."""
        try:
            async for chunk in stream:
                yield chunk
        finally:
            count_routes(routes, jobs)

    async def respond(request: Request, jobs, routes: list[Route], sse, result):
        """Run the jobs: as an SSE stream (``sse(events)``) or one JSON body (``result()``); their
        placements are counted once every one is final."""
        reserve_tokens(request, jobs)  # the API key's token budget (429 when over)
        if sse is not None:
            try:
                events = await run_unless_disconnected(
                    request, serving.open_stream(merge_events(dispatcher, jobs, routes))
                )
            except BaseException:
                count_routes(routes, jobs)
                raise
            return StreamingResponse(
                counted(sse(events), routes, jobs), media_type="text/event-stream"
            )
        try:
            return JSONResponse(await run_unless_disconnected(request, result()))
        finally:
            count_routes(routes, jobs)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        rid = request.state.request_id
        async with large_texts.slot(request):  # tokenized in a thread; large texts few at once
            jobs = await asyncio.to_thread(serving.completion_jobs, body, rid)
        trace = RequestTrace("text_completion", rid, serving.model_name, jobs)
        routes = [Route(trace=trace) for _ in jobs]
        return await respond(
            request,
            jobs,
            routes,
            (lambda events: serving.completion_sse(body, rid, events, jobs))
            if body.stream
            else None,
            lambda: serving.completion(body, jobs, rid, routes),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        rid = request.state.request_id
        async with large_texts.slot(request):
            job = await asyncio.to_thread(serving.chat_job, body, rid)
        route = Route(trace=RequestTrace("chat", rid, serving.model_name, [job]))
        return await respond(
            request,
            [job],
            [route],
            (lambda events: serving.chat_sse(body, rid, events)) if body.stream else None,
            lambda: serving.chat(body, job, rid, route),
        )

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [model_card(serving)],
        }


def _add_operational_routes(app: FastAPI, serving: OpenAIServing, metrics: RouterMetrics) -> None:
    registry = serving.dispatcher.registry

    @app.get("/health")
    async def health():
        if not registry.by_role("decode"):
            raise UpstreamUnavailable("no decode pod is ready")
        return {
            "status": "ok",
            "prefill_pods": len(registry.by_role("prefill")),
            "decode_pods": len(registry.by_role("decode")),
        }

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
