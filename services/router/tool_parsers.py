"""Tool-call parsers: a model's free text to OpenAI tool calls, by model family (vLLM's
``--tool-call-parser``).

Each parser knows one family's call format:

- ``llama3_json`` (Llama 3.x): the whole output is one or more ``{"name": ..., "parameters":
  {...}}`` objects (or ``"arguments"``), ``;``-separated, optionally after ``<|python_tag|>``.
- ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks, possibly after some content.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` objects (v3
  tokenizers) or ``name[ARGS]{...}`` per call (v11+), possibly after some content.

A text that does not parse as the family's calls in full is plain content (never an error): a
model may always answer in prose. ``call_markers`` tell the streaming side (``tool_calls.py``)
where a call may begin, so it can stream content up to there and hold the rest.
"""

import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import ClassVar


@dataclass(slots=True, frozen=True)
class ToolCall:
    """One function call, as the response's ``tool_calls`` carry it."""

    id: str
    name: str
    arguments: str
    """The arguments as JSON text (OpenAI sends a string)."""

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(slots=True, frozen=True)
class ParsedOutput:
    """A model's output split into content and calls; ``tool_calls`` empty: all content."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


def tool_call_id() -> str:
    """vLLM's id for a tool call: ``chatcmpl-tool-<32 hex digits>``."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def arguments_json(arguments: object) -> str:
    return json.dumps(arguments, ensure_ascii=False)


class ToolParser:
    """One model family's tool-call format."""

    name: ClassVar[str]
    call_markers: ClassVar[tuple[str, ...]]
    """Texts a call starts with; what comes before the first is content."""
    leading_only: ClassVar[bool] = False
    """Calls are the whole output (after whitespace), never after content."""

    @staticmethod
    def new_id() -> str:
        return tool_call_id()

    def parse(self, text: str) -> ParsedOutput:
        """The calls in a complete output, or all of it as content when it holds none or they
        do not parse."""
        calls = self._calls(text)
        if not calls:
            return ParsedOutput(text)
        return ParsedOutput(self._content_before(text), calls)

    def _calls(self, text: str) -> tuple[ToolCall, ...]:
        raise NotImplementedError

    def _content_before(self, text: str) -> str | None:
        if self.leading_only:
            return None
        starts = [i for i in (text.find(m) for m in self.call_markers) if i >= 0]
        content = text[: min(starts)] if starts else text
        return content if content.strip() else None

    def _call(self, obj: object, args_keys: tuple[str, ...]) -> ToolCall | None:
        """A ``{"name": ..., <args key>: {...}}`` object as a call, or None if it is not one."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        keys = [k for k in args_keys if k in obj]
        if len(keys) > 1 or set(obj) - {"name", *args_keys}:
            return None
        arguments = obj[keys[0]] if keys else {}
        if not isinstance(arguments, dict):
            return None
        return ToolCall(self.new_id(), obj["name"], arguments_json(arguments))


_DECODER = json.JSONDecoder()


def _json_values(text: str, separator: str) -> list | None:
    """The JSON values ``text`` holds, separated by ``separator`` (and whitespace), or None if
    anything else is there."""
    values, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        try:
            value, i = _DECODER.raw_decode(text, i)
        except (json.JSONDecodeError, RecursionError):  # the model's text nested too deep
            return None
        values.append(value)
        rest = text[i:].lstrip()
        if not rest:
            return values
        if not separator or not rest.startswith(separator):
            return None
        i = len(text) - len(rest) + len(separator)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"
    call_markers = (PYTHON_TAG, "{")
    leading_only = True

    def _calls(self, text: str) -> tuple[ToolCall, ...]:
        body = text.strip()
        if body.startswith(self.PYTHON_TAG):
            body = body[len(self.PYTHON_TAG) :]
        if not body.lstrip().startswith("{"):
            return ()
        values = _json_values(body, ";")
        calls = [self._call(v, ("parameters", "arguments")) for v in values or ()]
        return tuple(calls) if calls and all(calls) else ()


class HermesParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    call_markers = (START,)
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)

    def _calls(self, text: str) -> tuple[ToolCall, ...]:
        if self.START not in text:
            return ()
        calls = []
        for match in self._BLOCK.finditer(text):
            body = match.group(1) if match.group(1) is not None else match.group(2)
            values = _json_values(body, "")
            call = self._call(values[0], ("arguments", "parameters")) if values else None
            if call is None:
                return ()
            calls.append(call)
        return tuple(calls)


class MistralParser(ToolParser):
    name = "mistral"
    TOKEN = "[TOOL_CALLS]"
    ARGS = "[ARGS]"
    call_markers = (TOKEN,)
    _ID_CHARS = string.ascii_letters + string.digits

    @staticmethod
    def new_id() -> str:
        # Mistral's chat templates accept only 9 alphanumeric characters as a call's id when the
        # call comes back in the history.
        return "".join(secrets.choice(MistralParser._ID_CHARS) for _ in range(9))

    def _calls(self, text: str) -> tuple[ToolCall, ...]:
        start = text.find(self.TOKEN)
        if start < 0:
            return ()
        calls: list[ToolCall | None] = []
        for part in text[start:].split(self.TOKEN)[1:]:
            part = part.strip()
            if part.startswith(("[", "{")):  # v3: a JSON list of calls (or one call)
                values = _json_values(part, "")
                items = values[0] if values and isinstance(values[0], list) else values
                calls += [self._call(v, ("arguments",)) for v in items or [None]]
            else:  # v11+: name[ARGS]{...}, or name{...}
                name, sep, args = part.partition(self.ARGS)
                if not sep:
                    brace = part.find("{")
                    name, args = (part[:brace], part[brace:]) if brace > 0 else ("", "")
                values = _json_values(args, "")
                obj = {"name": name.strip(), "arguments": values[0]} if values else None
                calls.append(self._call(obj, ("arguments",)) if name.strip() else None)
        return tuple(calls) if calls and all(calls) else ()


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (Llama3JsonParser, HermesParser, MistralParser)
}
"""The parsers ``--tool-call-parser`` may name."""


def get_parser(name: str) -> ToolParser:
    return PARSERS[name]()
