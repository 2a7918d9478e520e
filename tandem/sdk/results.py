"""Typed results of the SDK."""

from dataclasses import dataclass

from tandem.api import proto_convert
from tandem.api.outputs import TokenLogprob
from tandem.api.requests import Usage
from tandem.proto.router.v1 import router_pb2


@dataclass(slots=True, frozen=True)
class GenerateChunk:
    """New tokens of a streamed request; the last chunk has ``finish_reason`` and ``usage``."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None
    stop_reason: str | int | None
    usage: Usage | None

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
        )


@dataclass(slots=True, frozen=True)
class GenerateResult:
    """A whole completion."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: str | int | None
    usage: Usage | None
    logprobs: tuple[TokenLogprob, ...]

    @classmethod
    def from_chunks(cls, chunks: list[GenerateChunk]) -> "GenerateResult":
        last = chunks[-1]
        return cls(
            request_id=last.request_id,
            text="".join(c.text for c in chunks),
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
            usage=last.usage,
            logprobs=tuple(lp for c in chunks for lp in c.logprobs),
        )


@dataclass(slots=True, frozen=True)
class ModelInfo:
    id: str
    max_model_len: int
