"""OpenTelemetry tracing: one trace per request across the router, prefill, decode and kvstore.

Off unless configured with the standard variables: tracing starts when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off again. Spans go to an
OTLP gRPC exporter, batched; every other ``OTEL_*`` variable (headers, insecure, batch sizes,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``) keeps its meaning.

Who starts a trace: only the router (its HTTP and gRPC server spans, sampled by
``OTEL_TRACES_SAMPLER``, default always-on). Pods and kvstore continue the caller's trace and never
start one of their own (``ParentBased(ALWAYS_OFF)``), so stats polls, heartbeats, KV-event
batches and index sweeps never produce stray traces.

How context travels: W3C ``traceparent`` in gRPC metadata. Servers use
``opentelemetry-instrumentation-grpc``'s asyncio server interceptor (a SERVER span per traced RPC
with the ``rpc.*`` attributes; the handler runs inside it). Clients inject the current context
with ``outgoing_metadata()`` at the few call sites that carry a request: the instrumentation's
asyncio *client* interceptors replace call objects with wrappers that break ``call.read()``,
``cancel()`` and the zero-copy PushKV path, so they are not used. The router's HTTP server span
comes from ``opentelemetry-instrumentation-fastapi``, kvstore's Redis calls are traced by
``opentelemetry-instrumentation-redis`` (arguments sanitized). No span ever records prompt or
completion text.
"""

import atexit
import logging
import os
import socket

from opentelemetry import propagate, trace

logger = logging.getLogger(__name__)

TRACER_NAME = "tandem"

# GenAI semantic conventions (https://opentelemetry.io/docs/specs/semconv/gen-ai/).
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
REQUEST_ID = "tandem.request_id"
"""The request id the router echoes as ``x-request-id`` (search traces by it)."""

UNTRACED_METHODS = ("GetStats", "Stats", "Heartbeat", "PublishEvents")
"""RPCs that belong to no request (polls, heartbeats, event batches): never traced."""

SELF_TRACED_METHODS = (
    "/tandem.decode.v1.DecodeService/Generate",
    "/tandem.router.v1.RouterService/Generate",
)
"""Response-streaming RPCs that open their SERVER span themselves (``start_server_span``).

The instrumentation's interceptor keeps its context attached across the handler's yields; when
a client goes away mid-stream, grpc.aio closes the generator from another task and the detach
fails with an ERROR traceback per cancelled stream (opentelemetry-python-contrib#2357).
"""

_enabled = False


def tracing_configured(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if (
        env.get("OTEL_SDK_DISABLED", "").lower() == "true"
        or env.get("OTEL_TRACES_EXPORTER", "").lower() == "none"
    ):
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup_tracing(
    service: str, *, instance: str | None = None, starts_traces: bool = False
) -> bool:
    """Install the global tracer provider for this process if tracing is configured.

    Args:
        service: the role ("router", "prefill", ...); the default ``service.name`` is
            ``tandem-<service>`` (``OTEL_SERVICE_NAME`` overrides it).
        instance: this process's ``service.instance.id`` (the pod id).
        starts_traces: True only for the router; everyone else follows the caller's decision.

    Returns:
        Whether tracing is on.
    """
    global _enabled
    if _enabled or not tracing_configured():
        return _enabled
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    attributes = {
        "service.name": os.environ.get("OTEL_SERVICE_NAME") or f"tandem-{service}",
        "service.namespace": "tandem",
        "tandem.role": service,
    }
    attributes["service.instance.id"] = instance or f"{socket.gethostname()}-{os.getpid()}"
    kwargs = {} if starts_traces else {"sampler": ParentBased(root=ALWAYS_OFF)}
    provider = TracerProvider(resource=Resource.create(attributes), **kwargs)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # flush what is batched
    _enabled = True
    logger.info(
        "tracing on: OTLP to %s",
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
    )
    return True


def tracing_enabled() -> bool:
    return _enabled


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def outgoing_metadata(
    metadata: tuple[tuple[str, str], ...] = (), context=None
) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current (or ``context``'s) trace, for a call that serves a
    request."""
    if not _enabled:
        return tuple(metadata)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return tuple(metadata) + tuple(carrier.items())


def server_interceptors() -> list:
    """The gRPC asyncio server interceptor that opens a SERVER span per traced RPC (none when
    off)."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    untraced = filters.any_of(
        filters.health_check(),
        *(filters.method_name(m) for m in UNTRACED_METHODS),
        *(filters.full_method_name(m) for m in SELF_TRACED_METHODS),
    )
    return [aio_server_interceptor(filter_=filters.negate(untraced))]


def start_server_span(context, full_method: str) -> trace.Span:
    """The SERVER span of a streaming RPC, continuing the caller's trace; never made current.

    The handler ends it (``end_server_span``) and parents its own spans on it explicitly.
    """
    if not _enabled:
        return trace.INVALID_SPAN
    carrier = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
    service, method = full_method.lstrip("/").split("/", 1)
    return tracer().start_span(
        full_method,
        context=propagate.extract(carrier),
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
    )


def end_server_span(span: trace.Span, error: BaseException | None = None) -> None:
    if not span.is_recording():
        return
    if error is not None:
        span.set_status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
    span.end()


def instrument_fastapi(app) -> None:
    """HTTP SERVER spans for the router's API (not for /health, /metrics, or each SSE chunk)."""
    if not _enabled:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app, excluded_urls="health,metrics", exclude_spans=["receive", "send"]
    )


def instrument_redis() -> None:
    """CLIENT spans for kvstore's Redis calls (inside a request's trace only: see the sampler)."""
    if not _enabled:
        return
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().instrument()
