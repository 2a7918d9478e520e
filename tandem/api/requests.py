"""Value objects of a request's life in the router: the validated job and its token events.

Torch-free: the router, the gRPC front door and the SDK conversions share them.
"""

from dataclasses import dataclass

from tandem.api.errors import InvalidRequest
from tandem.api.outputs import TokenLogprob
from tandem.api.sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class Resume:
    """What a request migrated to another decode pod brings along: the output its stream
    already carried to the client."""

    output_token_ids: tuple[int, ...]
    """Tokens generated so far: the pods run prompt + these, counting these as output."""
    num_text_chars: int
    """Characters of their text the client received (text held back for stop strings is not)."""


def check_num_output_tokens(num_output_tokens: int, num_tokens: int, max_tokens: int) -> int:
    """A migrated request's output so far (the last ``num_output_tokens`` of its ``num_tokens``
    prompt tokens) must leave a prompt and room for one more token. Returns the count.

    Raises:
        InvalidRequest: not a count in [0, min(num_tokens, max_tokens)).
    """
    n = num_output_tokens
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < min(num_tokens, max_tokens):
        raise InvalidRequest(
            f"num_output_tokens must be below the prompt's length ({num_tokens}) and "
            f"max_tokens ({max_tokens}), got {n!r}",
            param="num_output_tokens",
        )
    return n


@dataclass(slots=True, frozen=True)
class Job:
    """A validated, tokenized request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    resume: Resume | None = None
    """Set on the job the router re-admits after a decode pod failed mid-stream (migration)."""

    @property
    def token_ids(self) -> list[int]:
        """What the pods run: the prompt, then a migrated request's output so far."""
        if self.resume is None:
            return self.prompt_token_ids
        return [*self.prompt_token_ids, *self.resume.output_token_ids]


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
    index: int = 0
    """Which of the request's n completions (``SamplingParams.n``) these tokens belong to."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """On a request's first event, with ``SamplingParams.prompt_logprobs``: one per prompt
    token from the second on."""


def coalesce_token_events(events: list[TokenEvent]) -> TokenEvent:
    """Consecutive events of one request as one: tokens, text and logprobs in order, the prompt
    logprobs of the one that had them, the end (finish and stop reasons, usage) of the last.
    What a stream sends a consumer that fell behind, instead of each event.

    Raises:
        ValueError: the events are of different completions (``index``, with n > 1).
    """
    if len(events) == 1:
        return events[0]
    last = events[-1]
    if any(e.index != last.index for e in events):
        raise ValueError("events of different completions (index) cannot be coalesced")
    return TokenEvent(
        token_ids=[t for e in events for t in e.token_ids],
        text="".join(e.text for e in events),
        logprobs=[lp for e in events for lp in e.logprobs],
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        usage=last.usage,
        index=last.index,
        prompt_logprobs=next(
            (e.prompt_logprobs for e in events if e.prompt_logprobs is not None), None
        ),
    )
