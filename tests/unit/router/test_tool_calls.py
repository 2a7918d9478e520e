"""Tool plans and output constraints at the router: schemas built from tools, the request
fields translated to one ``StructuredOutputs``, every refusal naming its field, the history
rendered by the chat template, and responses (whole and streamed) through ``OpenAIServing``."""

import asyncio
import json

import jsonschema
import pytest

from services.router.jobs import JobBuilder
from services.router.openai_api import OpenAIServing
from services.router.openai_protocol import ChatCompletionRequest, CompletionRequest
from services.router.tool_calls import CallArrayScanner, plan_tools, required_schema
from tandem.api.errors import InvalidRequest
from tandem.api.requests import TokenEvent, Usage
from tandem.api.sampling_params import StructuredOutputs
from tandem.tokenizer import Tokenizer

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "ping", "description": "no parameters"}},
]
USER = [{"role": "user", "content": "weather in Paris?"}]


def plan(tools=TOOLS, choice="required", parallel=None, parser=None, auto=False):
    return plan_tools(tools, choice, parallel, parser_name=parser, enable_auto=auto)


# ---- schemas --------------------------------------------------------------------------------


def test_required_schema_accepts_exactly_lists_of_the_tools_calls():
    schema = json.loads(plan().constraint.json)
    assert schema == required_schema(TOOLS, parallel=True)
    good = [
        {"name": "get_weather", "parameters": {"city": "Paris", "days": 2}},
        {"name": "ping", "parameters": {}},
    ]
    jsonschema.validate(good, schema)
    for bad in (
        [],
        [{"name": "get_weather", "parameters": {"days": 2}}],  # city is required
        [{"name": "nope", "parameters": {}}],
        [{"name": "ping"}],
        {"name": "ping", "parameters": {}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = json.loads(plan(parallel=False).constraint.json)
    assert single["maxItems"] == 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, single)


def test_required_schema_hoists_defs_and_refuses_two_definitions_of_one_name():
    with_defs = {
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/place"}},
        "$defs": {"place": {"type": "string"}},
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": with_defs}}]
    schema = required_schema(tools, parallel=True)
    assert schema["$defs"] == {"place": {"type": "string"}}
    jsonschema.validate([{"name": "f", "parameters": {"where": "x"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "parameters": {"where": 1}}], schema)
    other = {**with_defs, "$defs": {"place": {"type": "integer"}}}
    tools.append({"type": "function", "function": {"name": "g", "parameters": other}})
    with pytest.raises(InvalidRequest) as e:
        required_schema(tools, parallel=True)
    assert e.value.param == "tools"


def test_a_named_choice_constrains_the_output_to_the_functions_parameters():
    named = plan(choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.mode == "named" and json.loads(named.constraint.json) == WEATHER
    empty = plan(choice={"type": "function", "function": {"name": "ping"}})
    assert json.loads(empty.constraint.json) == {"type": "object", "properties": {}}
    message, finish = named.message('{"city": "Paris"}', "stop")
    assert message["content"] is None and finish == "stop"  # as OpenAI and vLLM answer
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_none_and_auto_leave_decoding_free():
    none = plan(choice="none")
    assert none.mode == "none" and none.constraint is None
    assert none.message('{"name": "ping"}', "stop") == (
        {"role": "assistant", "content": '{"name": "ping"}', "tool_calls": []},
        "stop",
    )
    auto = plan(choice=None, parser="hermes", auto=True)  # tools without tool_choice: auto
    assert auto.mode == "auto" and auto.constraint is None
    assert auto.skip_special_tokens is False  # the parser needs the family's markers
    assert plan_tools(None, None, None, parser_name=None, enable_auto=False) is None


def test_a_required_output_cut_short_is_returned_as_text():
    text = '[{"name": "get_weather", "parameters": {"ci'
    message, finish = plan().message(text, "length")
    assert message["content"] == text and message["tool_calls"] == [] and finish == "length"


# ---- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tools, choice, auto, param, words",
    [
        ({"type": "function"}, "required", False, "tools", "list"),
        ([{"type": "retrieval"}], "required", False, "tools", "tools[0]"),
        ([{"type": "function"}], "required", False, "tools", "tools[0].function"),
        ([{"function": {"name": "has space"}}], "required", False, "tools", "name"),
        ([{"function": {"name": "x" * 65}}], "required", False, "tools", "name"),
        (TOOLS + TOOLS[:1], "required", False, "tools", "two tools"),
        (
            [{"function": {"name": "f", "parameters": {"type": "wrong"}}}],
            "required",
            False,
            "tools",
            "not a valid JSON schema",
        ),
        ([{"function": {"name": "f", "parameters": []}}], "required", False, "tools", "schema"),
        (
            [{"function": {"name": "f", "parameters": {"$defs": [1]}}}],
            "required",
            False,
            "tools",
            "$defs",
        ),
        ([{"function": {"name": "f", "description": 3}}], "required", False, "tools", "desc"),
        (
            TOOLS,
            {"type": "function", "function": {"name": "launch"}},
            False,
            "tool_choice",
            "launch",
        ),
        (TOOLS, {"type": "function"}, False, "tool_choice", "tool_choice must be"),
        (TOOLS, "sometimes", False, "tool_choice", "tool_choice must be"),
        (TOOLS, "auto", False, "tool_choice", "--enable-auto-tool-choice"),
        (TOOLS, None, False, "tool_choice", "--enable-auto-tool-choice"),
        (None, "required", False, "tool_choice", "needs tools"),
        ([], {"type": "function", "function": {"name": "f"}}, False, "tool_choice", "tools"),
    ],
)
def test_bad_tools_and_tool_choices_are_refused_naming_the_field(tools, choice, auto, param, words):
    with pytest.raises(InvalidRequest) as e:
        plan_tools(tools, choice, None, parser_name="hermes" if auto else None, enable_auto=auto)
    assert e.value.param == param and words in e.value.message


def test_auto_needs_a_parser_even_when_enabled():
    with pytest.raises(InvalidRequest) as e:
        plan_tools(TOOLS, "auto", None, parser_name=None, enable_auto=True)
    assert e.value.param == "tool_choice"


# ---- the OpenAI and vLLM spellings of a constraint --------------------------------------------


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"messages": USER, **fields})


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutputs(json_object=True)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "w", "schema": WEATHER, "strict": True},
                }
            },
            StructuredOutputs(json=WEATHER),
        ),
        ({"guided_json": WEATHER}, StructuredOutputs(json=WEATHER)),
        ({"guided_json": json.dumps(WEATHER)}, StructuredOutputs(json=WEATHER)),
        ({"guided_regex": "[a-z]+"}, StructuredOutputs(regex="[a-z]+")),
        ({"guided_choice": ["yes", "no"]}, StructuredOutputs(choice=("yes", "no"))),
        ({"guided_grammar": 'start: "a"+'}, StructuredOutputs(grammar='start: "a"+')),
        ({"structured_outputs": {"json": WEATHER}}, StructuredOutputs(json=WEATHER)),
        ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutputs(choice=("a", "b"))),
    ],
)
def test_each_spelling_becomes_one_structured_output(fields, expected):
    assert chat(**fields).sampling_fields().get("structured_outputs") == expected


def test_completions_take_the_guided_extras():
    req = CompletionRequest(prompt="x", guided_choice=["a", "b"])
    assert req.sampling_fields()["structured_outputs"] == StructuredOutputs(choice=("a", "b"))


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format",
            "not a valid JSON schema",
        ),
        ({"guided_json": "{not json"}, "guided_json", "not JSON"),
        # nested deeper than json.loads recurses: a 400, not a 500 (RecursionError)
        ({"guided_json": "[" * 100_000}, "guided_json", "not JSON"),
        ({"structured_outputs": {"json": "[" * 100_000}}, "structured_outputs.json", "not JSON"),
        ({"guided_json": {"type": "wrong"}}, "guided_json", "not a valid JSON schema"),
        ({"guided_json": {"$schema": 5}}, "guided_json", "not a valid JSON schema"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_regex": ""}, "guided_regex", "non-empty"),
        ({"structured_outputs": {"json": "{nope"}}, "structured_outputs.json", "not JSON"),
        (
            {"structured_outputs": {"json": {"type": "wrong"}}},
            "structured_outputs.json",
            "not a valid JSON schema",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one of"),
        (
            {"structured_outputs": {"regex": "a+"}, "guided_regex": "b+"},
            "guided_regex",
            "structured_outputs and guided_regex",
        ),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a+"},
            "guided_regex",
            "response_format and guided_regex",
        ),
        (
            {"guided_json": WEATHER, "guided_choice": ["a"]},
            "guided_choice",
            "guided_json and guided_choice",
        ),
    ],
)
def test_bad_or_several_constraints_are_refused_naming_the_fields(fields, param, words):
    with pytest.raises(InvalidRequest) as e:
        chat(**fields).sampling_fields()
    assert e.value.param == param and words in e.value.message


def test_the_grammar_backend_refuses_what_it_cannot_compile():
    pytest.importorskip("tandem.api.structured_grammar")
    with pytest.raises(InvalidRequest) as e:
        chat(guided_regex="(unclosed").sampling_fields()
    assert e.value.param == "guided_regex"
    with pytest.raises(InvalidRequest) as e:
        chat(guided_grammar="start: ???").sampling_fields()
    assert e.value.param == "guided_grammar"


def test_a_forced_tool_call_and_a_response_format_are_two_constraints():
    req = chat(response_format={"type": "json_object"})
    with pytest.raises(InvalidRequest) as e:
        req.sampling_fields(plan().constraint)
    assert e.value.param == "tool_choice" and "response_format and tool_choice" in e.value.message


# ---- history ----------------------------------------------------------------------------------


def test_history_calls_reach_the_template_with_object_arguments():
    req = chat(
        messages=[
            *USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call-1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call-1", "content": "sunny"},
        ]
    )
    _, assistant, tool = req.template_messages()
    assert assistant == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call-1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call-1"}


def test_history_call_arguments_that_are_not_json_are_refused():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
    req = chat(messages=[*USER, {"role": "assistant", "tool_calls": [call]}])
    with pytest.raises(InvalidRequest) as e:
        req.template_messages()
    assert e.value.param == "messages.1.tool_calls.0.function.arguments"


# ---- through OpenAIServing, with the tiny model's tokenizer -------------------------------------


class ScriptedDispatcher:
    """Answers every job with the given text pieces, then ``finish``."""

    def __init__(self, pieces, finish="stop"):
        self.pieces, self.finish, self.jobs = pieces, finish, []

    async def generate(self, job, route):
        self.jobs.append(job)
        for piece in self.pieces[:-1]:
            yield TokenEvent([1], piece, [])
        yield TokenEvent([1], self.pieces[-1], [], self.finish, None, Usage(3, 5, 0))


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return Tokenizer(llama_dir)


def serving(tokenizer, pieces, **opts):
    jobs = JobBuilder(
        tokenizer, model_name="m", vocab_size=tokenizer.vocab_size, max_model_len=lambda: 2048
    )
    return OpenAIServing(jobs, ScriptedDispatcher(pieces), **opts)


def test_the_prompt_shows_the_tools_and_a_forced_call_is_constrained(tokenizer):
    s = serving(tokenizer, ["x"])
    req = chat(tools=TOOLS, tool_choice="required")
    job = s.chat_job(req, "r")
    prompt = tokenizer.decode(job.prompt_token_ids, skip_special_tokens=False)
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert job.params.structured_outputs == plan().constraint
    assert job.params.skip_special_tokens is True


def test_auto_keeps_special_tokens_for_the_parser(tokenizer):
    s = serving(tokenizer, ["x"], tool_call_parser="hermes", enable_auto_tool_choice=True)
    job = s.chat_job(chat(tools=TOOLS), "r")
    assert job.params.structured_outputs is None and job.params.skip_special_tokens is False
    with pytest.raises(InvalidRequest) as e:
        serving(tokenizer, ["x"]).chat_job(chat(tools=TOOLS), "r")
    assert e.value.param == "tool_choice"


REQUIRED_OUTPUT = ['[{"name": "get_', 'weather", "parameters": {"ci', 'ty": "Paris"}}]']


def test_a_required_call_in_a_whole_response(tokenizer):
    s = serving(tokenizer, REQUIRED_OUTPUT)
    req = chat(tools=TOOLS, tool_choice="required")
    job = s.chat_job(req, "r")
    body = asyncio.run(s.chat(req, job, "r", None))
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def _sse_chunks(s, req, job):
    async def events():
        async for event in s.dispatcher.generate(job, None):
            yield 0, event

    async def run():
        return [chunk async for chunk in s.chat_sse(req, "r", events())]

    chunks = [c.decode().removeprefix("data: ").strip() for c in asyncio.run(run())]
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def test_a_required_call_streams_its_name_then_argument_fragments(tokenizer):
    s = serving(tokenizer, REQUIRED_OUTPUT)
    req = chat(tools=TOOLS, tool_choice="required", stream=True)
    chunks = _sse_chunks(s, req, s.chat_job(req, "r"))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    first = deltas[1]["tool_calls"][0]
    assert first["index"] == 0 and first["type"] == "function" and first["id"]
    assert first["function"]["name"] == "get_weather"
    fragments = [first["function"]["arguments"]] + [
        d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:-1]
    ]
    assert len([f for f in fragments if f]) >= 2  # arguments came in pieces, as generated
    assert json.loads("".join(fragments)) == {"city": "Paris"}
    assert all("id" not in d["tool_calls"][0] for d in deltas[2:-1])
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_named_call_streams_the_output_as_arguments(tokenizer):
    s = serving(tokenizer, ['{"city"', ': "Paris"}'])
    choice = {"type": "function", "function": {"name": "get_weather"}}
    req = chat(tools=TOOLS, tool_choice=choice, stream=True)
    deltas = [c["choices"][0]["delta"] for c in _sse_chunks(s, req, s.chat_job(req, "r"))]
    calls = [d["tool_calls"][0] for d in deltas[1:-1]]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city"'}
    assert calls[1] == {"index": 0, "function": {"arguments": ': "Paris"}'}}


def test_a_text_without_tools_streams_as_before(tokenizer):
    s = serving(tokenizer, ["Hel", "lo"])
    req = chat(stream=True)
    chunks = _sse_chunks(s, req, s.chat_job(req, "r"))
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_the_call_scanner_reads_any_split_the_same(size):
    text = (
        ' [ {"parameters" : {"s": "a\\"}{,", "n": [1, {"x": null}]}, "name": "f"},'
        '{"name":"g","parameters":{}} ]'
    )
    scanner = CallArrayScanner("parameters")
    events = []
    for i in range(0, len(text), size):
        events += scanner.feed(text[i : i + size])
    names = [(e[1], e[2]) for e in events if e[0] == "name"]
    args: dict[int, str] = {}
    for e in events:
        if e[0] == "args":
            assert (e[1], e[2]) != names[e[1]]
            args[e[1]] = args.get(e[1], "") + e[2]
    assert names == [(0, "f"), (1, "g")]
    assert json.loads(args[0]) == {"s": 'a"}{,', "n": [1, {"x": None}]}
    assert json.loads(args[1]) == {}
    # A call's name comes before any of its arguments.
    order = [(e[0], e[1]) for e in events]
    assert order.index(("name", 0)) < order.index(("args", 0))


# ---- flags --------------------------------------------------------------------------------------


def test_tandem_up_hands_the_tool_flags_to_the_router():
    from pathlib import Path

    from services.local_cluster import LocalCluster, UpOptions

    def router_args(**opts):
        cluster = LocalCluster(
            UpOptions(model=Path("m"), port=0, kvstore=False, **opts), Path("m"), relay=False
        )
        cluster.plan()
        return cluster.by_name("router").args

    args = router_args(tool_call_parser="llama3_json", enable_auto_tool_choice=True)
    assert args[args.index("--tool-call-parser") + 1] == "llama3_json"
    assert "--enable-auto-tool-choice" in args
    plain = router_args()
    assert "--tool-call-parser" not in plain and "--enable-auto-tool-choice" not in plain


def test_auto_tool_choice_without_a_parser_is_refused_at_start():
    from pydantic import ValidationError

    from services.router.settings import RouterSettings

    with pytest.raises(ValidationError, match="--tool-call-parser"):
        RouterSettings(model="m", enable_auto_tool_choice=True, allow_unauthenticated=True)
    with pytest.raises(ValidationError):
        RouterSettings(model="m", tool_call_parser="gpt", allow_unauthenticated=True)
    ok = RouterSettings(
        model="m",
        tool_call_parser="mistral",
        enable_auto_tool_choice=True,
        allow_unauthenticated=True,
    )
    assert ok.tool_call_parser == "mistral"


def test_a_malformed_required_stream_sends_no_broken_call():
    """Should the output break the grammar's promise, the scanner must not fail the stream."""
    scanner = CallArrayScanner("parameters")
    events = scanner.feed(
        '[{"name": 12, "parameters": {"a": 1}}, {"name": "ok", "parameters": {}}]'
    )
    assert [e for e in events if e[0] == "name"] == [("name", 1, "ok")]
    assert [e for e in events if e[1] == 0] == []  # no name: its arguments are never sent


DEEP = "[" * 100_000 + "]" * 100_000
"""JSON nested deeper than Python's parser recurses (RecursionError, not ValueError)."""


def test_deeply_nested_arguments_in_the_history_are_a_400(tokenizer):
    call = {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": DEEP}}
    req = chat(messages=[*USER, {"role": "assistant", "tool_calls": [call]}])
    with pytest.raises(InvalidRequest) as e:
        serving(tokenizer, ["x"]).chat_job(req, "r")
    assert e.value.param == "messages.1.tool_calls.0.function.arguments"


@pytest.mark.parametrize("mode", ["required", "auto"])
def test_deeply_nested_model_output_is_text_not_a_crash(mode):
    # A recursive parameter schema lets even a constrained output nest that deep.
    p = plan(choice=mode, parser="hermes", auto=True)
    for text in (DEEP, f'<tool_call>{{"name": "ping", "arguments": {DEEP}}}</tool_call>'):
        message, finish = p.message(text, "stop")
        assert message["tool_calls"] == [] and message["content"] is not None
        assert finish == "stop"


def test_grpc_chat_with_deeply_nested_template_kwargs_is_a_400(tokenizer):
    from services.router.grpc_api import RouterServicer
    from tandem.proto.router.v1 import router_pb2

    s = serving(tokenizer, ["x"])
    servicer = RouterServicer(s.jobs, None, None, chat_prompt=s.chat_prompt_ids)
    message = router_pb2.ChatMessage(role="user", content="hi")
    request = router_pb2.ChatRequest(messages=[message], chat_template_kwargs=DEEP)
    with pytest.raises(InvalidRequest) as e:
        servicer._chat_job(request)
    assert e.value.param == "chat_template_kwargs"
