"""Tool-call parsers: complete outputs, the same outputs streamed in pieces of every size, and
texts that are not calls (plain content, never an error)."""

import json
import re

import pytest

from services.router.tool_calls import plan_tools
from services.router.tool_parsers import MistralParser, get_parser

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
]

# (parser, model output, expected content, expected [(name, arguments)])
CALLS = [
    (
        "hermes",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
        "Let me look.\n",
        [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})],
    ),
    (  # cut short after the call's JSON: still a call
        "hermes",
        '<tool_call>{"name": "add", "arguments": {"a": 1}}',
        None,
        [("add", {"a": 1})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "add", "arguments": {"a": "{;}"}}',
        None,
        [("get_weather", {"city": "Paris"}), ("add", {"a": "{;}"})],
    ),
    (
        "llama3_json",
        '  {"name": "get_weather", "parameters": {"city": "Zürich"}}',
        None,
        [("get_weather", {"city": "Zürich"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "add", "arguments": {"a": 1}}]',
        None,
        [("get_weather", {"city": "Paris"}), ("add", {"a": 1})],
    ),
    (
        "mistral",
        'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[ARGS]{"a": 1}',
        "Sure.",
        [("get_weather", {"city": "Paris"}), ("add", {"a": 1})],
    ),
]

NOT_CALLS = [
    ("hermes", "The weather is fine; no <tool_ needed."),
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": </tool_call>'),  # broken JSON
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    ("hermes", '<tool_call>{"name": "add", "arguments": [1]}</tool_call>'),  # not an object
    ("llama3_json", 'Here it is: {"name": "add", "parameters": {}}'),  # not leading
    ("llama3_json", '{"name": "add", "parameters": {}} and then prose'),
    ("llama3_json", '{"city": "Paris"}'),  # JSON, but not a call
    ("llama3_json", "{"),
    ("llama3_json", "<|python"),
    ("mistral", "[TOOL_CALLS] not json"),
    ("mistral", '[TOOL_CALLS][{"name": "add"'),
    ("mistral", "just text [TOOL_"),
]


def _plan(parser: str):
    return plan_tools(TOOLS, "auto", None, parser_name=parser, enable_auto=True)


def _streamed(parser: str, text: str, size: int) -> tuple[str, list, str]:
    """(content, [(name, arguments)], finish reason) of ``text`` streamed in ``size`` pieces,
    with every tool-call delta checked for OpenAI's shape."""
    stream = _plan(parser).stream()
    deltas = []
    for i in range(0, len(text), size):
        deltas += stream.feed(text[i : i + size])
    deltas += stream.finish()
    content, calls = "", {}
    for delta in deltas:
        assert set(delta) in ({"content"}, {"tool_calls"}), delta
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if "id" in call:  # the call's first delta: id, type and name
                assert call["type"] == "function" and call["index"] not in calls
                calls[call["index"]] = [call["function"]["name"], ""]
            calls[call["index"]][1] += call["function"]["arguments"]
    named = [(name, json.loads(args)) for _, (name, args) in sorted(calls.items())]
    return content, named, stream.finish_reason("stop")


@pytest.mark.parametrize("parser, text, content, calls", CALLS)
def test_a_complete_output_parses_to_its_calls(parser, text, content, calls):
    message, finish = _plan(parser).message(text, "stop")
    assert message["content"] == content and finish == "tool_calls"
    got = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message["tool_calls"]
    ]
    assert got == calls
    ids = [c["id"] for c in message["tool_calls"]]
    assert len(set(ids)) == len(ids)
    pattern = r"[A-Za-z0-9]{9}" if parser == "mistral" else r"chatcmpl-tool-[0-9a-f]{32}"
    assert all(re.fullmatch(pattern, i) for i in ids)


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
@pytest.mark.parametrize("parser, text, content, calls", CALLS)
def test_a_streamed_output_gives_the_same_calls(parser, text, content, calls, size):
    got_content, got_calls, finish = _streamed(parser, text, size)
    assert got_content == (content or "") and got_calls == calls and finish == "tool_calls"


@pytest.mark.parametrize("parser, text", NOT_CALLS)
def test_text_that_is_no_call_is_plain_content(parser, text):
    message, finish = _plan(parser).message(text, "stop")
    assert message == {"role": "assistant", "content": text, "tool_calls": []}
    assert finish == "stop"
    assert get_parser(parser).parse(text).tool_calls == ()
    for size in (1, 3, 1000):
        assert _streamed(parser, text, size) == (text, [], "stop")


def test_streamed_content_is_held_only_while_it_may_begin_a_call():
    stream = _plan("hermes").stream()
    assert stream.feed("Hello <tool") == [{"content": "Hello "}]  # "<tool" may begin a call
    assert stream.feed("box> x") == [{"content": "<toolbox> x"}]  # ... and then did not
    assert stream.feed("<tool_call>") == []  # a call: held to the end
    assert stream.feed('{"name": "add", "arguments": {}}') == []
    assert stream.finish()[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": "{}"}

    llama = _plan("llama3_json").stream()
    assert llama.feed("  ") == [] and llama.feed("Hi") == [{"content": "  Hi"}]
    assert llama.feed(" {") == [{"content": " {"}]  # past the start: never a call


def test_parallel_tool_calls_false_keeps_the_first_call():
    plan = plan_tools(TOOLS, "auto", False, parser_name="hermes", enable_auto=True)
    text = CALLS[0][1]
    message, _ = plan.message(text, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    stream = plan.stream()
    deltas = stream.feed(text) + stream.finish()
    assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])] == [
        "get_weather"
    ]


def test_mistral_ids_fit_mistral_templates():
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", MistralParser.new_id()) for _ in range(50))
