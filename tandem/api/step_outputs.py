"""StepOutputs: the new tokens of one engine step, for every request that got some, as columns.

An engine core process (``tandem.serving.engine_core``) sends one per step to its pod's front
process, which detokenizes and applies stop strings there. Columns rather than one object per
request: a step of a thousand requests is a few lists to build, encode and decode.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

from tandem.api.outputs import TokenLogprob


@dataclass(slots=True, frozen=True)
class TokenRow:
    """One request's part of a step (a view built by ``StepOutputs.rows``)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    finish_reason: str | None
    stop_token_id: int | None
    num_cached_tokens: int
    scheduled_time: float | None
    num_preemptions: int
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class StepOutputs:
    request_ids: list[str] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    """How many of ``token_ids`` belong to each request, in order."""
    token_ids: list[int] = field(default_factory=list)
    """Every request's new tokens, one request after the other."""
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    """One per token of ``token_ids``: None where the request asked for no logprobs."""
    finish_reasons: list[str | None] = field(default_factory=list)
    """"stop", "length" or "abort" for a request that finished in this step, else None."""
    stop_token_ids: list[int | None] = field(default_factory=list)
    """The EOS or stop token that finished the request, if one did."""
    num_cached_tokens: list[int] = field(default_factory=list)
    scheduled_times: list[float | None] = field(default_factory=list)
    """When the request was first scheduled (``time.monotonic()``, comparable across the
    processes of one host): the end of its queue time."""
    num_preemptions: list[int] = field(default_factory=list)
    prompt_logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)
    """Per request: its prompt logprobs, on its first record when it asked for them."""

    def add(
        self,
        request_id: str,
        token_ids: list[int],
        logprobs: list[TokenLogprob | None],
        *,
        finish_reason: str | None,
        stop_token_id: int | None,
        num_cached_tokens: int,
        scheduled_time: float | None,
        num_preemptions: int,
        prompt_logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        self.request_ids.append(request_id)
        self.num_new_tokens.append(len(token_ids))
        self.token_ids += token_ids
        self.logprobs += logprobs
        self.finish_reasons.append(finish_reason)
        self.stop_token_ids.append(stop_token_id)
        self.num_cached_tokens.append(num_cached_tokens)
        self.scheduled_times.append(scheduled_time)
        self.num_preemptions.append(num_preemptions)
        self.prompt_logprobs.append(prompt_logprobs)

    def __len__(self) -> int:
        return len(self.request_ids)

    def rows(self) -> Iterator[TokenRow]:
        start = 0
        for i, rid in enumerate(self.request_ids):
            end = start + self.num_new_tokens[i]
            yield TokenRow(
                rid,
                self.token_ids[start:end],
                self.logprobs[start:end],
                self.finish_reasons[i],
                self.stop_token_ids[i],
                self.num_cached_tokens[i],
                self.scheduled_times[i],
                self.num_preemptions[i],
                self.prompt_logprobs[i],
            )
            start = end
