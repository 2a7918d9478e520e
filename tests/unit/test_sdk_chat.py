"""The SDK's chat call and new sampling fields on the wire, against a recording RouterService on a
real gRPC socket: what the router receives is what the caller meant, and bad input fails before
anything is sent."""

import asyncio
from concurrent import futures

import grpc
import pytest

from tandem.api import proto_convert
from tandem.api.errors import InvalidRequest
from tandem.api.sampling_params import StructuredOutputs
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.sdk import AsyncClient, Client


class RecordingRouter(router_pb2_grpc.RouterServiceServicer):
    """Keeps every request; answers two chunks."""

    def __init__(self) -> None:
        self.requests: list = []

    def _answer(self, request, response_cls):
        self.requests.append(request)
        yield response_cls(request_id="r", chunk=common_pb2.TokenChunk(token_ids=[5], text="a"))
        last = response_cls(request_id="r", chunk=common_pb2.TokenChunk(token_ids=[6], text="b"))
        last.chunk.finish_reason = common_pb2.FINISH_REASON_STOP
        last.usage.prompt_tokens, last.usage.completion_tokens = 3, 2
        yield last

    def Generate(self, request, context):
        yield from self._answer(request, router_pb2.GenerateResponse)

    def Chat(self, request, context):
        yield from self._answer(request, router_pb2.ChatResponse)


@pytest.fixture
def router():
    servicer = RecordingRouter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


MESSAGES = [
    {"role": "system", "content": "be brief"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "what "}, {"type": "text", "text": "is"}],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "2", "name": "f"},
]


def test_chat_sends_the_conversation_and_returns_the_reply(router):
    servicer, target = router
    with Client(target, timeout=10) as client:
        result = client.chat(
            MESSAGES,
            max_tokens=4,
            temperature=0,
            add_generation_prompt=False,
            chat_template_kwargs={"enable_thinking": False, "budget": 7},
            request_id="chat-1",
        )
        chunks = list(client.chat_stream(MESSAGES[:2], max_tokens=4))
    assert result.text == "ab" and list(result.token_ids) == [5, 6]
    assert result.finish_reason == "stop" and result.usage.completion_tokens == 2
    assert [c.text for c in chunks] == ["a", "b"]
    sent, streamed = servicer.requests
    assert isinstance(sent, router_pb2.ChatRequest) and sent.request_id == "chat-1"
    assert [m.role for m in sent.messages] == ["system", "user", "assistant", "tool"]
    assert sent.messages[1].content == "what is"
    assert not sent.messages[2].HasField("content")  # None stays "no content", not ""
    call = sent.messages[2].tool_calls[0]
    assert (call.id, call.name, call.arguments) == ("c1", "f", '{"x": 1}')
    assert (sent.messages[3].tool_call_id, sent.messages[3].name) == ("c1", "f")
    assert sent.HasField("add_generation_prompt") and not sent.add_generation_prompt
    assert sent.chat_template_kwargs == '{"enable_thinking": false, "budget": 7}'
    assert proto_convert.sampling_fields_from_proto(sent.sampling_params) == {
        "max_tokens": 4,
        "temperature": 0.0,
    }
    assert streamed.add_generation_prompt  # the default: the assistant's turn comes next


def test_async_chat(router):
    servicer, target = router

    async def main():
        async with AsyncClient(target, timeout=10) as client:
            whole = await client.chat(MESSAGES[:2], max_tokens=4)
            parts = [c.text async for c in client.chat_stream(MESSAGES[:2], max_tokens=4)]
            return whole, parts

    whole, parts = asyncio.run(main())
    assert whole.text == "ab" and parts == ["a", "b"]
    assert len(servicer.requests) == 2


def test_new_sampling_fields_go_on_the_wire_as_sampling_params_holds_them(router):
    servicer, target = router
    with Client(target, timeout=10) as client:
        client.generate(
            "x",
            max_tokens=2,
            n=2,
            best_of=3,
            logit_bias={"7": 100, 3: -5.5},  # JSON's string keys, as the HTTP API takes them
            prompt_logprobs=1,
            structured_outputs={"json": {"type": "object"}},
        )
        client.chat(MESSAGES[:1], max_tokens=2, structured_outputs=StructuredOutputs(regex="a+"))
    generate, chat = servicer.requests
    fields = proto_convert.sampling_fields_from_proto(generate.sampling_params)
    assert fields["n"] == 2 and fields["best_of"] == 3 and fields["prompt_logprobs"] == 1
    assert fields["logit_bias"] == ((3, -5.5), (7, 100.0))
    assert fields["structured_outputs"] == StructuredOutputs(json='{"type":"object"}')
    chat_fields = proto_convert.sampling_fields_from_proto(chat.sampling_params)
    assert chat_fields["structured_outputs"] == StructuredOutputs(regex="a+")


@pytest.mark.parametrize(
    ("messages", "kwargs", "param"),
    [
        ([], {}, "messages"),
        ("hello", {}, "messages"),
        ([{"content": "no role"}], {}, "messages.0"),
        ([{"role": "user", "content": 5}], {}, "messages.0.content"),
        ([{"role": "assistant", "tool_calls": ["f(1)"]}], {}, "messages.0"),
        ([{"role": "user", "content": "x", "name": 7}], {}, "messages.0"),
        ([{"role": "user", "content": "x"}], {"chat_template_kwargs": {"f": object()}}, None),
        ([{"role": "user", "content": "x"}], {"temperature": -1}, "temperature"),
        ([{"role": "user", "content": "x"}], {"logit_bias": {"a": 1}}, "logit_bias"),
        ([{"role": "user", "content": "x"}], {"best_of": 1, "n": 2}, "best_of"),
        ([{"role": "user", "content": "x"}], {"structured_outputs": {"nope": 1}}, None),
    ],
)
def test_bad_chat_input_fails_before_anything_is_sent(router, messages, kwargs, param):
    servicer, target = router
    with Client(target, timeout=10) as client, pytest.raises(InvalidRequest) as err:
        client.chat(messages, **kwargs)
    if param is not None:
        assert err.value.param == param
    assert servicer.requests == []
