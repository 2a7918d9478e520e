"""Tool calling through the gRPC SDK (``Client.chat``/``chat_stream``, ``AsyncClient.chat``)
against real routers and pods (tiny random model, CPU), through the disaggregating router and
the colocated one: the RouterService plans tools with the HTTP chat route's code, so it answers
what HTTP answers (same calls under greedy decoding, same finish reasons, same refusals).

Random weights write gibberish: every call below is schema-valid only because decoding is
constrained (a named function or ``required`` by the tools' schemas; the ``auto`` test by a
regex that makes the model write a Hermes ``<tool_call>`` for the router's parser to find).
"""

import asyncio
import json

import grpc
import httpx
import jsonschema
import pytest

from tandem.api.errors import InvalidRequest
from tandem.api.grpc_status import PARAM_KEY
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.sdk import AsyncClient, Client, ToolCall
from tests.e2e.conftest import start_tool_cluster, wait_idle
from tests.e2e.test_tool_calling import ADD, MAX_TOKENS, MESSAGES, SCHEMAS, TOOLS

NAMED = {"type": "function", "function": {"name": "get_weather"}}
AUTO_REGEX = r'Sure\. <tool_call>\{"name": "add", "arguments": \{"a": [0-9]\}\}</tool_call>'


@pytest.fixture(scope="module")
def cluster(e2e_model):
    """The routers parse Hermes tool calls (``start_tool_cluster``)."""
    c = start_tool_cluster(e2e_model)
    yield c
    c.stop()


def grpc_target(cluster, name: str) -> str:
    if name == "router":
        return cluster.router_grpc
    args = cluster.by_name(name).args
    return f"127.0.0.1:{args[args.index('--grpc-port') + 1]}"


def http_url(cluster, name: str) -> str:
    return f"http://{cluster.by_name(name).address}"


@pytest.fixture(scope="module", params=["router", "router-colocated"])
def router(request, cluster) -> tuple[str, str]:
    """(gRPC target, HTTP URL) of one router."""
    return grpc_target(cluster, request.param), http_url(cluster, request.param)


def chat(target: str, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    with Client(target, timeout=120) as client:
        return client.chat(kwargs.pop("messages", MESSAGES), **kwargs)


def chat_stream(target: str, **kwargs) -> list:
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    with Client(target, timeout=120) as client:
        return list(client.chat_stream(kwargs.pop("messages", MESSAGES), **kwargs))


def http_chat(url: str, **kwargs) -> dict:
    body = {"model": "llama", "messages": MESSAGES, "max_tokens": MAX_TOKENS, **kwargs}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def check_call(call: ToolCall) -> dict:
    args = json.loads(call.arguments)
    jsonschema.validate(args, SCHEMAS[call.name])
    return args


def reassembled(chunks) -> tuple[str, tuple[ToolCall, ...], str | None]:
    """(content, calls, finish reason) of a stream's chunks, checking the deltas' shape: each
    call's first piece has its id and name, later pieces neither."""
    seen: set[int] = set()
    for d in (d for c in chunks for d in c.tool_calls):
        if d.index in seen:
            assert d.id == "" and d.name == ""
        else:
            assert d.id.startswith("chatcmpl-tool-") and d.name
            seen.add(d.index)
    calls = ToolCall.from_deltas([d for c in chunks for d in c.tool_calls])
    finish = next((c.finish_reason for c in reversed(chunks) if c.finish_reason), None)
    return "".join(c.text for c in chunks), calls, finish


def test_a_named_function_returns_a_schema_valid_call_ending_with_stop(router):
    target, url = router
    r = chat(target, tools=TOOLS, tool_choice=NAMED, temperature=0)
    assert r.finish_reason == "stop" and r.text == ""  # as OpenAI: named ends with "stop"
    (call,) = r.tool_calls
    assert call.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    args = check_call(call)
    assert r.choices[0].tool_calls == r.tool_calls and r.token_ids  # the tokens are still there

    content, calls, finish = reassembled(
        chat_stream(target, tools=TOOLS, tool_choice=NAMED, temperature=0)
    )
    assert content == "" and finish == "stop" and [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == args  # greedy: the same call, in pieces

    http = http_chat(url, tools=TOOLS, tool_choice=NAMED, temperature=0)  # the same as HTTP's
    assert http["finish_reason"] == "stop"
    assert json.loads(http["message"]["tool_calls"][0]["function"]["arguments"]) == args


def test_required_returns_schema_valid_calls_ending_with_tool_calls(router):
    """parallel_tool_calls false: exactly one call (greedy random weights never close a
    parallel array, as test_tool_calling notes)."""
    target, url = router
    kwargs = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0)
    r = chat(target, **kwargs)
    assert r.finish_reason == "tool_calls" and r.text == ""
    (call,) = r.tool_calls
    args = check_call(call)

    chunks = chat_stream(target, **kwargs)
    content, calls, finish = reassembled(chunks)
    assert content == "" and finish == "tool_calls" and len(calls) == 1
    assert calls[0].name == call.name and json.loads(calls[0].arguments) == args
    assert sum(len(c.tool_calls) for c in chunks) > 2  # arguments streamed as generated

    http = http_chat(url, **kwargs)
    assert http["finish_reason"] == "tool_calls"
    (http_call,) = http["message"]["tool_calls"]
    assert http_call["function"]["name"] == call.name
    assert json.loads(http_call["function"]["arguments"]) == args


def test_async_client_carries_tools(cluster):
    async def run():
        async with AsyncClient(cluster.router_grpc, timeout=120) as client:
            return await client.chat(
                MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS
            )

    r = asyncio.run(run())
    assert r.finish_reason == "tool_calls" and r.tool_calls
    for call in r.tool_calls:
        check_call(call)


def test_auto_parses_the_models_calls_whole_and_streamed(cluster):
    """The regex makes the model write a Hermes call after some content; the router's parser
    (--tool-call-parser hermes) finds it and takes its markup out of the content."""
    kwargs = dict(tools=TOOLS, structured_outputs={"regex": AUTO_REGEX})
    r = chat(cluster.router_grpc, tool_choice="auto", **kwargs)
    assert r.finish_reason == "tool_calls" and r.text == "Sure. "
    (call,) = r.tool_calls
    assert call.name == "add"
    check_call(call)

    content, calls, finish = reassembled(chat_stream(cluster.router_grpc, **kwargs))  # default
    assert content == "Sure. " and finish == "tool_calls" and [c.name for c in calls] == ["add"]
    check_call(calls[0])


def test_tool_choice_none_makes_no_calls_but_shows_the_tools(cluster):
    plain = chat(cluster.router_grpc, max_tokens=4)
    r = chat(cluster.router_grpc, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.tool_calls == () and r.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # rendered into the prompt
    chunks = chat_stream(cluster.router_grpc, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert not any(c.tool_calls for c in chunks)


def test_a_history_of_calls_and_results_renders(cluster):
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ]
    plain = chat(cluster.router_grpc, max_tokens=1)
    r = chat(cluster.router_grpc, messages=history, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert r.finish_reason == "length"
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 15  # the call and its result


def raw_chat(target: str, **fields) -> grpc.RpcError:
    """A ChatRequest sent with the generated stub (what a non-Python client sends); its error."""
    request = router_pb2.ChatRequest(
        messages=[router_pb2.ChatMessage(role="user", content="hi")], **fields
    )
    with grpc.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Chat(request, timeout=30))
    return e.value


@pytest.mark.parametrize(
    "fields, param",
    [
        (
            {
                "tools": json.dumps(TOOLS),
                "tool_choice": json.dumps(NAMED).replace("get_weather", "launch"),
            },
            "tool_choice",
        ),
        ({"tools": '[{"type": "function", "function": {"name": "f"}'}, "tools"),  # not JSON
        ({"tools": json.dumps(TOOLS), "tool_choice": "{"}, "tool_choice"),
        ({"tools": json.dumps(TOOLS), "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": '{"name": "f"}'}, "tools"),  # not a list
        ({"tools": json.dumps([{"type": "function", "function": {"name": "bad name"}}])}, "tools"),
    ],
)
def test_bad_tools_are_invalid_argument_naming_the_field(cluster, fields, param):
    for name in ("router", "router-colocated"):
        err = raw_chat(grpc_target(cluster, name), **fields)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert param in err.details()
        assert dict(err.trailing_metadata() or ())[PARAM_KEY] == param


def test_sdk_raises_invalid_request_naming_the_field(cluster):
    launch = {"type": "function", "function": {"name": "launch"}}
    with Client(cluster.router_grpc, timeout=30) as client:
        with pytest.raises(InvalidRequest, match="launch") as e:
            client.chat(MESSAGES, tools=TOOLS, tool_choice=launch, max_tokens=4)
        assert e.value.param == "tool_choice"
        with pytest.raises(InvalidRequest) as e:  # two output constraints, as over HTTP
            client.chat(
                MESSAGES,
                tools=TOOLS,
                tool_choice="required",
                structured_outputs={"json": ADD},
                max_tokens=4,
            )
        assert e.value.param == "tool_choice"
        with pytest.raises(InvalidRequest) as e:  # not JSON: refused before sending
            client.chat(MESSAGES, tools=[{"function": object()}], max_tokens=4)
        assert e.value.param == "tools"


def test_pods_are_idle_after_the_module(cluster):
    wait_idle(cluster)
