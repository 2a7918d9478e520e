"""What the client trial's scenarios share: the registry (``@scenario``) and the context each
gets, the tools and schemas they send, how they read streams, and the checks that turn a wrong
answer into an exception (runs in the clients' venv; imports no Tandem code).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Ctx:
    base_url: str
    """The router's root URL (http://HOST:PORT), without /v1."""
    model: str
    model_dir: Path
    work_dir: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=self.v1, api_key="unused", timeout=120, max_retries=0)

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))


SCENARIOS: dict[str, tuple[str, str, Callable[[Ctx], str]]] = {}
"""name -> (client, what it does, function)."""


def scenario(name: str, client: str, what: str):
    def register(fn: Callable[[Ctx], str]) -> Callable[[Ctx], str]:
        SCENARIOS[name] = (client, what, fn)
        return fn

    return register


USER = [{"role": "user", "content": "What is the weather in Paris?"}]

GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
GET_TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["utc_offset"],
            "additionalProperties": False,
        },
    },
}
TOOLS = {t["function"]["name"]: t for t in (GET_WEATHER, GET_TIME)}

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"type": "string", "enum": ["prefill", "decode", "router"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


def need(condition: Any, message: str) -> None:
    """Fail the scenario with ``message`` unless ``condition`` holds."""
    if not condition:
        raise AssertionError(message)


def validate(value: Any, schema: dict) -> None:
    """Raise unless ``value`` validates against the JSON schema (jsonschema, a litellm dep)."""
    import jsonschema

    jsonschema.validate(value, schema)


def collect_stream_text(stream, chat: bool) -> tuple[str, str | None, Any]:
    """(text, finish_reason, usage) of an openai stream of one choice."""
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append((choice.delta.content if chat else choice.text) or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def collect_stream_tool_calls(stream) -> tuple[list, str | None]:
    """The tool calls a streamed chat reply assembled from its deltas (by index), as objects
    with ``id`` and ``function.name``/``function.arguments``, and its finish_reason."""
    from types import SimpleNamespace

    calls: dict[int, SimpleNamespace] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(
                    delta.index,
                    SimpleNamespace(id=None, function=SimpleNamespace(name="", arguments="")),
                )
                call.id = call.id or delta.id
                if delta.function is not None:
                    call.function.name += delta.function.name or ""
                    call.function.arguments += delta.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


def check_calls(calls, names: set[str]) -> str:
    need(calls, "no tool_calls in the reply")
    for call in calls:
        need(call.id, f"tool call without an id: {call}")
        need(call.function.name in names, f"tool {call.function.name!r} not in {sorted(names)}")
        args = json.loads(call.function.arguments)
        validate(args, TOOLS[call.function.name]["function"]["parameters"])
    return ", ".join(f"{c.function.name}({c.function.arguments})" for c in calls)
