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
