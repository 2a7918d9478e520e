"""GenAI attributes of one API request on the router's server span, and its ``route`` spans.

The server span itself comes from the FastAPI or gRPC instrumentation; this module only adds
what an operator searches and aggregates by: the request id (``x-request-id``), the GenAI
request parameters and, when the request ends, its token usage and finish reasons. Prompt and
completion text are never recorded. With tracing off every call here is a cheap no-op.
"""

from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace

from services.router.routing import PrefillCandidate
from tandem import telemetry
from tandem.api.requests import Job, TokenEvent


class RequestTrace:
    """The server span of one API request (HTTP or gRPC), possibly running several jobs."""

    def __init__(
        self,
        operation: str,
        request_id: str,
        model: str,
        jobs: Sequence[Job],
        span: trace.Span | None = None,
    ) -> None:
        """``span``: the server span if it is not the current one (streaming gRPC handlers)."""
        self.span = span if span is not None else trace.get_current_span()
        self.context = (
            trace.set_span_in_context(span) if span is not None else otel_context.get_current()
        )
        """Parent of every span the request's jobs open (explicit: they run in other tasks)."""
        self._input_tokens = 0
        self._output_tokens = 0
        self._finish_reasons: list[str] = []
        if not self.span.is_recording():
            return
        params = jobs[0].params
        self.span.set_attributes(
            {
                telemetry.REQUEST_ID: request_id,
                telemetry.GEN_AI_OPERATION: operation,
                telemetry.GEN_AI_PROVIDER: "tandem",
                telemetry.GEN_AI_REQUEST_MODEL: model,
                telemetry.GEN_AI_REQUEST_MAX_TOKENS: params.max_tokens,
                telemetry.GEN_AI_REQUEST_TEMPERATURE: params.temperature,
                telemetry.GEN_AI_REQUEST_TOP_P: params.top_p,
                telemetry.GEN_AI_USAGE_INPUT_TOKENS: sum(len(j.prompt_token_ids) for j in jobs),
            }
        )

    def finished(self, event: TokenEvent) -> None:
        """A job's last event: add its usage and finish reason to the request's totals."""
        if not self.span.is_recording():
            return
        if event.usage is not None:
            self._output_tokens += event.usage.completion_tokens
        self._finish_reasons.append(event.finish_reason)
        self.span.set_attributes(
            {
                telemetry.GEN_AI_USAGE_OUTPUT_TOKENS: self._output_tokens,
                telemetry.GEN_AI_RESPONSE_FINISH_REASONS: list(self._finish_reasons),
            }
        )

    def migrated(
        self, *, from_pod: str, to_pod: str, num_tokens: int, reason: str, outcome: str
    ) -> None:
        """A ``migrated`` event: the request's decode pod failed after ``num_tokens`` tokens and
        the request moved to ``to_pod`` (outcome "resumed") or could not ("failed", "limit")."""
        if not self.span.is_recording():
            return
        self.span.add_event(
            "migrated",
            {
                "tandem.migration.from_pod": from_pod,
                "tandem.migration.to_pod": to_pod,
                "tandem.migration.tokens_so_far": num_tokens,
                "tandem.migration.reason": reason,
                "tandem.migration.outcome": outcome,
            },
        )


def route_attributes(
    *,
    attempt: int,
    mode: str,
    decode: str,
    prefill: str | None,
    reason: str,
    expected_cached_tokens: int,
    candidates: Sequence[PrefillCandidate],
    lookup: dict[str, float | str] | None,
) -> dict:
    """The ``route`` span's attributes: the decision and the score breakdown behind it."""
    attributes = {
        "tandem.route.attempt": attempt,
        "tandem.route.mode": mode,
        "tandem.route.decode_pod": decode,
        "tandem.route.prefill_pod": prefill or "",
        "tandem.route.prefill_reason": reason,
        "tandem.route.expected_cached_tokens": expected_cached_tokens,
        # The score breakdown, one entry per prefill candidate, best first.
        "tandem.route.candidates.pod": [c.pod.address for c in candidates],
        "tandem.route.candidates.cached_tokens": [c.cached_tokens for c in candidates],
        "tandem.route.candidates.queued_tokens": [c.queued_tokens for c in candidates],
        "tandem.route.candidates.cost": [float(c.cost) for c in candidates],
        "tandem.route.candidates.hot": [c.hot for c in candidates],
    }
    if lookup is not None:
        attributes.update({f"tandem.kvstore.lookup.{k}": v for k, v in lookup.items()})
    return attributes
