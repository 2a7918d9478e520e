"""Tool calling and structured outputs end to end: the official ``openai`` client against real
routers and pods (tiny random model, CPU), through the disaggregating router (the prefill pod
samples the first token under the grammar, the decode pod continues its matcher) and the
colocated one.

Random weights write gibberish, so every call below is schema-valid only because decoding is
constrained: a named function or ``required`` by the tools' schemas, ``json_schema`` by its
schema, and the ``auto`` test by a regex that makes the model write a Hermes ``<tool_call>``
(which the router's parser then has to find, whole and streamed).
"""

import json

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import start_tool_cluster, wait_idle

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "sum", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 80


@pytest.fixture(scope="module")
def cluster(e2e_model):
    """The routers parse Hermes tool calls (``start_tool_cluster``)."""
    c = start_tool_cluster(e2e_model)
    yield c
    c.stop()


@pytest.fixture(scope="module", params=["router", "router-colocated"])
def router(request, cluster) -> str:
    return f"http://{cluster.by_name(request.param).address}"


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def create(url: str, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return client(url).chat.completions.create(model="llama", **kwargs)


def streamed(url: str, **kwargs) -> tuple[str, dict[int, dict], str, list]:
    """(content, calls by index, finish reason, the chunks) of a streamed request."""
    content, calls, finish, chunks = "", {}, None, []
    for chunk in create(url, stream=True, **kwargs):
        chunks.append(chunk)
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            if call.id is not None:  # a call's first delta: its id, type and name
                assert call.index not in calls and call.type == "function"
                assert call.function.name
                calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish, chunks


def check_call(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def test_a_named_function_returns_a_schema_valid_call(router):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = create(router, tools=TOOLS, tool_choice=choice)
    message = r.choices[0].message
    assert message.content is None and r.choices[0].finish_reason == "stop"  # as OpenAI
    (call,) = message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    check_call("get_weather", call.function.arguments)

    content, calls, finish, _ = streamed(router, tools=TOOLS, tool_choice=choice)
    assert content == "" and finish == "stop" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    check_call("get_weather", calls[0]["arguments"])


def test_required_returns_a_schema_valid_call(router):
    """parallel_tool_calls false: exactly one call (with parallel calls allowed, greedy random
    weights never close the array; the schema's difference is pinned by the unit tests)."""
    kwargs = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0)
    r = create(router, **kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    check_call(call.function.name, call.function.arguments)

    content, calls, finish, chunks = streamed(router, **kwargs)
    assert content == "" and finish == "tool_calls" and list(calls) == [0]
    # Greedy: the stream made the same call as the whole response...
    assert calls[0]["name"] == call.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)
    # ...its arguments in fragments, as they were generated.
    deltas = [d for c in chunks for ch in c.choices for d in (ch.delta.tool_calls or [])]
    assert len(deltas) > 2 and all(d.id is None for d in deltas[1:])


def test_json_schema_response_format_output_validates(router):
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}
    r = create(router, response_format=fmt)
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)
    content, calls, finish, _ = streamed(router, response_format=fmt)
    assert not calls and finish == "stop"
    jsonschema.validate(json.loads(content), WEATHER)


def test_guided_extras_are_honoured(cluster):
    r = create(cluster.router_url, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = create(cluster.router_url, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"})
    content = r.choices[0].message.content
    assert len(content) == 6 and content[:3].isdigit() and content[3] == "-"


AUTO_REGEX = r'Sure\. <tool_call>\{"name": "add", "arguments": \{"a": [0-9]\}\}</tool_call>'


def test_auto_parses_the_models_calls_whole_and_streamed(cluster):
    """The regex makes the model write a Hermes call after some content; the router's parser
    (--tool-call-parser hermes) finds it. (Parsing is the router's: one router is enough.)"""
    router = cluster.router_url
    extra = {"extra_body": {"structured_outputs": {"regex": AUTO_REGEX}}}
    r = create(router, tools=TOOLS, tool_choice="auto", **extra)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure. "
    (call,) = choice.message.tool_calls
    assert call.function.name == "add"
    check_call("add", call.function.arguments)

    content, calls, finish, _ = streamed(router, tools=TOOLS, **extra)  # auto by default
    assert content == "Sure. " and finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "add"
    check_call("add", calls[0]["arguments"])


def test_the_history_of_calls_reaches_the_model(cluster):
    """Assistant tool_calls and tool results are rendered by the chat template, not dropped."""
    args = '{"city": "Paris", "days": 2}'
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": args},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ]
    plain = create(cluster.router_url, messages=MESSAGES, max_tokens=1)
    with_tools = create(
        cluster.router_url, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=1
    )
    with_history = create(cluster.router_url, messages=history, max_tokens=1)
    tokens = lambda r: r.usage.prompt_tokens  # noqa: E731
    assert tokens(with_tools) > tokens(plain) + 50  # the tools' signatures are in the prompt
    assert tokens(with_history) > tokens(plain) + 15  # the call and its result too


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_json": ADD}, "tool_choice"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
    ],
)
def test_bad_tool_and_format_requests_get_400_naming_the_field(cluster, body, param):
    for url in (cluster.router_url, f"http://{cluster.by_name('router-colocated').address}"):
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "llama", "messages": MESSAGES, "max_tokens": 4, **body},
            timeout=30,
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == 400 and err["message"], err


def test_pods_are_idle_after_the_module(cluster):
    wait_idle(cluster)
