"""Value objects of a request's life in the router: the validated job and its token events.

Torch-free: the router, the gRPC front door and the SDK conversions share them.
"""

from dataclasses import dataclass

from tandem.api.outputs import TokenLogprob
from tandem.api.sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class Job:
    """A validated, tokenized request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(slots=True)
class TokenEvent:
    """New tokens of a request; the last event carries the finish reason and usage."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None


def coalesce_token_events(events: list[TokenEvent]) -> TokenEvent:
    """Consecutive events of one request as one: tokens, text and logprobs in order, the end
    (finish and stop reasons, usage) of the last. What a stream sends a consumer that fell
    behind, instead of each event."""
    if len(events) == 1:
        return events[0]
    last = events[-1]
    return TokenEvent(
        token_ids=[t for e in events for t in e.token_ids],
        text="".join(e.text for e in events),
        logprobs=[lp for e in events for lp in e.logprobs],
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        usage=last.usage,
    )
