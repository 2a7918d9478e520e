"""Prompt logprobs cross every boundary of a request's life: the engine core's step columns
(msgpack), the decode pod's TokenChunk, the router's TokenEvent, RouterService's chunk, the
prefill pod's KVTransferEnd; and merged deltas keep them."""

from tandem.api import proto_convert
from tandem.api.outputs import CompletionOutput, RequestOutput, TokenLogprob, merge_deltas
from tandem.api.requests import TokenEvent, coalesce_token_events
from tandem.api.stats import EngineStats
from tandem.api.step_outputs import StepOutputs
from tandem.proto.decode.v1 import decode_pb2
from tandem.serving import core_protocol as proto

LPS = [TokenLogprob(6, -1.5, 2, ((9, -0.5), (6, -1.5))), TokenLogprob(7, -0.25, 1, ())]


def output(prompt_logprobs=None, token=8) -> RequestOutput:
    comp = CompletionOutput(0, "x", [token], logprobs=[TokenLogprob(token, -0.1, 1, ())])
    return RequestOutput("r", [5, 6, 7], [comp], False, prompt_logprobs=prompt_logprobs)


def test_decode_chunk_to_router_event_to_router_chunk():
    chunk = proto_convert.token_chunk(output(LPS))
    event = proto_convert.token_event(decode_pb2.GenerateResponse(chunk=chunk))
    assert event.prompt_logprobs == LPS
    again = proto_convert.event_chunk(event)
    assert list(again.prompt_logprobs) == list(chunk.prompt_logprobs)
    # Later chunks carry none.
    plain = proto_convert.token_chunk(output())
    assert (
        proto_convert.token_event(decode_pb2.GenerateResponse(chunk=plain)).prompt_logprobs is None
    )


def test_transfer_end_carries_them_to_the_decode_pod():
    out = output(LPS)
    out.outputs[0].token_ids = [8]
    end = proto_convert.transfer_end(out, "r", "fp")
    assert [proto_convert.logprob_from_proto(lp) for lp in end.prompt_logprobs] == LPS
    assert not proto_convert.transfer_end(output(), "r", "fp").prompt_logprobs


def test_engine_core_columns_round_trip():
    steps = StepOutputs()
    common = dict(
        finish_reason=None,
        stop_token_id=None,
        num_cached_tokens=0,
        scheduled_time=None,
        num_preemptions=0,
    )
    steps.add("a", [8], [None], prompt_logprobs=LPS, **common)
    steps.add("b", [9], [None], **common)
    update = proto.CoreUpdate(stats=EngineStats(*[0] * 7, 0.0, *[0] * 5), steps=1)
    update.outputs = steps
    decoded = proto.update_decoder.decode(proto.update_encoder.encode(update)).outputs
    rows = list(decoded.rows())
    assert rows[0].prompt_logprobs == LPS and rows[1].prompt_logprobs is None
    cmd = proto.CompleteRemote(1, "r", 8, None, 0, LPS)
    (back,) = proto.commands_decoder.decode(proto.command_encoder.encode([cmd]))
    assert back.prompt_logprobs == LPS


def test_merged_deltas_and_coalesced_events_keep_them():
    merged = merge_deltas([output(LPS), output(token=9)])
    assert merged.prompt_logprobs == LPS and merged.outputs[0].token_ids == [8, 9]
    events = [TokenEvent([8], "a", [], prompt_logprobs=LPS), TokenEvent([9], "b", [])]
    assert coalesce_token_events(events).prompt_logprobs == LPS
