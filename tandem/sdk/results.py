"""Typed results of the SDK."""

from dataclasses import dataclass

from tandem.api import proto_convert
from tandem.api.outputs import TokenLogprob
from tandem.api.requests import Usage
from tandem.proto.router.v1 import router_pb2


@dataclass(slots=True, frozen=True)
class GenerateChunk:
    """New tokens of a streamed request; the last chunk has ``finish_reason`` and ``usage``.

    With ``n`` (or ``best_of``) above 1, each chunk belongs to completion ``index``, and each
    completion's last chunk has its ``finish_reason``; ``usage`` comes once, on the very last.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None
    stop_reason: str | int | None
    usage: Usage | None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """On the first chunk, with ``prompt_logprobs``: one per prompt token from the second on."""
    index: int = 0
    """Which of the request's ``n`` completions these tokens belong to."""

    @classmethod
    def from_proto(cls, resp: router_pb2.GenerateResponse) -> "GenerateChunk":
        event = proto_convert.token_event(resp)  # the same shape as a decode pod's response
        return cls(
            request_id=resp.request_id,
            token_ids=tuple(event.token_ids),
            text=event.text,
            logprobs=tuple(event.logprobs),
            finish_reason=event.finish_reason,
            stop_reason=event.stop_reason,
            usage=event.usage,
            prompt_logprobs=(
                tuple(event.prompt_logprobs) if event.prompt_logprobs is not None else None
            ),
            index=event.index,
        )


@dataclass(slots=True, frozen=True)
class Choice:
    """One of a request's ``n`` completions, whole."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: tuple[TokenLogprob, ...]

    @classmethod
    def from_chunks(cls, index: int, chunks: list[GenerateChunk]) -> "Choice":
        ends = [c for c in chunks if c.finish_reason is not None]
        end = ends[-1] if ends else chunks[-1]
        return cls(
            index=index,
            text="".join(c.text for c in chunks),
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            finish_reason=end.finish_reason,
            stop_reason=end.stop_reason,
            logprobs=tuple(lp for c in chunks for lp in c.logprobs),
        )


@dataclass(slots=True, frozen=True)
class GenerateResult:
    """A whole request: its first completion's fields, and every completion in ``choices``
    (one unless ``n`` was above 1)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: str | int | None
    usage: Usage | None
    logprobs: tuple[TokenLogprob, ...]
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """With ``prompt_logprobs``: one per prompt token from the second on (the first has no
    context to be predicted from)."""

    choices: tuple[Choice, ...] = ()
    """Every completion, by ``index`` (``n`` of them)."""

    @classmethod
    def from_chunks(cls, chunks: list[GenerateChunk]) -> "GenerateResult":
        last = chunks[-1]
        by_index: dict[int, list[GenerateChunk]] = {}
        for c in chunks:
            by_index.setdefault(c.index, []).append(c)
        choices = tuple(Choice.from_chunks(i, by_index[i]) for i in sorted(by_index))
        first = choices[0]
        return cls(
            request_id=last.request_id,
            text=first.text,
            token_ids=first.token_ids,
            finish_reason=first.finish_reason,
            stop_reason=first.stop_reason,
            usage=next((c.usage for c in reversed(chunks) if c.usage is not None), None),
            logprobs=first.logprobs,
            prompt_logprobs=next(
                (c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None
            ),
            choices=choices,
        )


@dataclass(slots=True, frozen=True)
class ModelInfo:
    id: str
    max_model_len: int
