"""What the engine returns per request: tokens, text, finish reason, logprobs, timings."""

import enum
from dataclasses import dataclass, field


class OutputKind(enum.Enum):
    """How much each output carries (vLLM's RequestOutputKind)."""

    CUMULATIVE = "cumulative"
    """Everything generated so far, every step."""
    DELTA = "delta"
    """Only what is new since the previous output (streaming)."""
    FINAL_ONLY = "final_only"
    """One output, when the request finishes (offline generation)."""


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """A generated token's logprob, its rank in the distribution, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps (``time.monotonic()``) of a request's life in the engine."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    """Times the request was preempted and recomputed."""


@dataclass(slots=True)
class CompletionOutput:
    """One completion of a request: ``index`` of its ``n`` (or ``best_of``)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """"stop", "length" or "abort" once finished."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended generation, if any."""
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class RequestOutput:
    """What a request produced: cumulative, a delta or final, per its ``OutputKind``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    prompt: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    """With ``SamplingParams.prompt_logprobs``: one per prompt token from the second on (the
    first is predicted from nothing); sent once, on a request's first output."""
    metrics: RequestMetrics | None = field(default=None, repr=False)


def merge_deltas(outputs: "list[RequestOutput]") -> RequestOutput:
    """Consecutive ``DELTA`` outputs of one request as one: tokens, text and logprobs in order,
    the prompt logprobs of the one that had them, the state (finished, finish and stop reasons,
    cached tokens, metrics) of the last. A stream
    whose consumer fell behind sends this instead of each. Completions of different indices
    (``n`` > 1) are never mixed: each index's are merged on their own."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    # Each completion (n > 1) is merged with its own: one per index, in order of appearance.
    by_index: dict[int, list[CompletionOutput]] = {}
    for o in outputs:
        for c in o.outputs:
            by_index.setdefault(c.index, []).append(c)
    merged = [_merge_completions(comps) for comps in by_index.values()]
    return RequestOutput(
        request_id=last.request_id,
        prompt_token_ids=last.prompt_token_ids,
        outputs=merged,
        finished=last.finished,
        num_cached_tokens=last.num_cached_tokens,
        prompt=last.prompt,
        prompt_logprobs=next(
            (o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None
        ),
        metrics=last.metrics,
    )


def _merge_completions(comps: list[CompletionOutput]) -> CompletionOutput:
    """Consecutive deltas of one completion (one index) as one."""
    if len(comps) == 1:
        return comps[0]
    logprobs = [lp for c in comps if c.logprobs for lp in c.logprobs]
    return CompletionOutput(
        index=comps[0].index,
        text="".join(c.text for c in comps),
        token_ids=[t for c in comps for t in c.token_ids],
        finish_reason=comps[-1].finish_reason,
        stop_reason=comps[-1].stop_reason,
        logprobs=logprobs if any(c.logprobs is not None for c in comps) else None,
    )
