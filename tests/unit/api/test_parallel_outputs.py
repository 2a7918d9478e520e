"""Outputs of n > 1 completions: merging a stream's queued deltas never mixes indices; chunks
carry their index over the wire; the SDK groups chunks into choices."""

import pytest

from tandem.api import proto_convert
from tandem.api.outputs import CompletionOutput, RequestOutput, TokenLogprob, merge_deltas
from tandem.api.requests import TokenEvent, Usage, coalesce_token_events
from tandem.proto.router.v1 import router_pb2
from tandem.sdk.results import GenerateChunk, GenerateResult


def out(*comps: CompletionOutput, finished=False) -> RequestOutput:
    return RequestOutput("r", [1, 2], list(comps), finished=finished)


def comp(index, text, tokens, finish=None, logprobs=None) -> CompletionOutput:
    return CompletionOutput(index, text, tokens, finish, None, logprobs)


def test_merge_deltas_merges_each_index_with_its_own():
    lp = TokenLogprob(3, -0.5, 1, ())
    merged = merge_deltas(
        [
            out(comp(0, "a", [1])),
            out(comp(1, "x", [7], logprobs=[lp])),
            out(comp(0, "b", [2], "length"), comp(1, "y", [8], "stop", logprobs=[lp])),
        ]
    )
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in merged.outputs] == [
        (0, "ab", [1, 2], "length"),
        (1, "xy", [7, 8], "stop"),
    ]
    assert merged.outputs[0].logprobs is None and merged.outputs[1].logprobs == [lp, lp]


def test_coalescing_events_keeps_their_index_and_refuses_to_mix():
    a, b = TokenEvent([1], "a", [], index=2), TokenEvent([2], "b", [], "length", index=2)
    merged = coalesce_token_events([a, b])
    assert (merged.index, merged.text, merged.finish_reason) == (2, "ab", "length")
    with pytest.raises(ValueError, match="different completions"):
        coalesce_token_events([a, TokenEvent([3], "c", [], index=0)])


def test_chunks_carry_their_index_and_the_sdk_groups_them():
    item = out(comp(0, "a", [1]), comp(2, "z", [9], "length"))
    chunks = [proto_convert.token_chunk(item, c) for c in item.outputs]
    assert [c.index for c in chunks] == [0, 2]
    event = proto_convert.token_event(router_pb2.GenerateResponse(chunk=chunks[1]))
    assert event.index == 2 and event.finish_reason == "length"
    assert proto_convert.event_chunk(event).index == 2

    def sdk_chunk(index, text, finish=None, usage=None):
        return GenerateChunk("r", (len(text),), text, (), finish, None, usage, index=index)

    result = GenerateResult.from_chunks(
        [
            sdk_chunk(1, "x"),
            sdk_chunk(0, "a"),
            sdk_chunk(0, "b", "stop"),
            sdk_chunk(1, "y", "length", Usage(2, 4, 0)),
        ]
    )
    assert [(c.index, c.text, c.finish_reason) for c in result.choices] == [
        (0, "ab", "stop"),
        (1, "xy", "length"),
    ]
    assert (result.text, result.finish_reason, result.usage) == ("ab", "stop", Usage(2, 4, 0))
