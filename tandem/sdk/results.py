"""Typed results of the SDK."""

from dataclasses import dataclass, replace

from tandem.api import proto_convert
from tandem.api.outputs import TokenLogprob
from tandem.api.requests import Usage
from tandem.proto.router.v1 import router_pb2


@dataclass(slots=True, frozen=True)
class ToolCallDelta:
    """A streamed piece of a tool call (OpenAI's streamed ``tool_calls`` delta): a call's first
    piece has its ``id`` and ``name``, later pieces (``id`` and ``name`` empty) more of its
    ``arguments``."""

    index: int
    """Which call of the reply (0, 1, ...)."""
    id: str
    name: str
    arguments: str
    """The next fragment of the arguments' JSON text."""


@dataclass(slots=True, frozen=True)
class ToolCall:
    """A function call the model made (OpenAI's ``tool_calls`` entry of type ``function``)."""

    id: str
    name: str
    arguments: str
    """The call's arguments, a JSON text (``json.loads`` it)."""

    @classmethod
    def from_deltas(cls, deltas: list[ToolCallDelta]) -> tuple["ToolCall", ...]:
        """The calls a stream's deltas add up to, by ``index``."""
        calls: dict[int, ToolCall] = {}
        for d in deltas:
            call = calls.get(d.index) or cls("", "", "")
            calls[d.index] = replace(
                call,
                id=call.id or d.id,
                name=call.name or d.name,
                arguments=call.arguments + d.arguments,
            )
        return tuple(calls[i] for i in sorted(calls))


@dataclass(slots=True, frozen=True)
class GenerateChunk:
    """New tokens of a streamed request; the last chunk has ``finish_reason`` and ``usage``.

    With ``n`` (or ``best_of``) above 1, each chunk belongs to completion ``index``, and each
    completion's last chunk has its ``finish_reason``; ``usage`` comes once, on the very last.

    A chat with ``tools``: ``text`` is the reply's content only (tool-call markup and the
    constrained output of a ``required`` or named ``tool_choice`` removed), ``tool_calls`` the
    tool-call pieces of the chunk, and the last chunk's ``finish_reason`` is ``"tool_calls"``
    where the model called tools (a named ``tool_choice`` ends with ``"stop"``, as OpenAI's).
    ``token_ids`` are always every generated token.
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
    tool_calls: tuple[ToolCallDelta, ...] = ()
    """A chat with tools: the tool-call pieces this chunk adds."""

    @classmethod
    def from_proto(
        cls, resp: router_pb2.GenerateResponse | router_pb2.ChatResponse
    ) -> "GenerateChunk":
        event = proto_convert.token_event(resp)  # the same shape as a decode pod's response
        text, finish_reason, tool_calls = event.text, event.finish_reason, ()
        if isinstance(resp, router_pb2.ChatResponse):
            if resp.HasField("content"):
                text = resp.content
            finish_reason = resp.finish_reason or finish_reason
            tool_calls = tuple(
                ToolCallDelta(d.index, d.id, d.name, d.arguments) for d in resp.tool_calls
            )
        return cls(
            request_id=resp.request_id,
            token_ids=tuple(event.token_ids),
            text=text,
            logprobs=tuple(event.logprobs),
            finish_reason=finish_reason,
            stop_reason=event.stop_reason,
            usage=event.usage,
            prompt_logprobs=(
                tuple(event.prompt_logprobs) if event.prompt_logprobs is not None else None
            ),
            index=event.index,
            tool_calls=tool_calls,
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
    tool_calls: tuple[ToolCall, ...] = ()
    """A chat with tools: the calls the model made (``finish_reason`` then ``"tool_calls"``,
    or ``"stop"`` for a named ``tool_choice``)."""

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
            tool_calls=ToolCall.from_deltas([d for c in chunks for d in c.tool_calls]),
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
    tool_calls: tuple[ToolCall, ...] = ()
    """A chat with tools: the first completion's calls (``text`` is then its content only)."""

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
            tool_calls=first.tool_calls,
        )


@dataclass(slots=True, frozen=True)
class ModelInfo:
    id: str
    max_model_len: int
