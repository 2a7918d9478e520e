"""Tool calling for /v1/chat/completions, as vLLM serves it.

``plan_tools`` validates a request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` into
a ``ToolPlan``: the tools the chat template renders, and how the output becomes calls:

- ``none``: plain text (the template still sees the tools, as vLLM does by default).
- ``auto`` (only with ``--enable-auto-tool-choice`` and a ``--tool-call-parser``): decoding is
  free; the configured parser (``tool_parsers.py``) finds the calls in the text.
- a named function: decoding is constrained to that function's ``parameters`` schema, so the
  whole output is its arguments (vLLM's way).
- ``required``: decoding is constrained to a JSON array of ``{"name", "parameters"}`` objects,
  ``anyOf`` over the tools (at most one item when ``parallel_tool_calls`` is false).

The constrained modes hold even for a random-weight model: the engine masks every token the
grammar does not allow. ``ToolPlan.message`` builds a response's message; ``ToolPlan.stream``
a per-choice ``ToolCallStream`` that turns text deltas into OpenAI's streamed deltas (a first
delta with index, id, type and name, then argument fragments).
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from services.router.structured_request import check_grammar, check_json_schema
from services.router.tool_parsers import (
    ToolCall,
    ToolParser,
    arguments_json,
    get_parser,
    tool_call_id,
)
from tandem.api.errors import InvalidRequest
from tandem.api.sampling_params import StructuredOutputs

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}

Mode = Literal["none", "auto", "required", "named"]


@dataclass(slots=True, frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    tools: list[dict]
    """The tools as the chat template gets them (OpenAI's ``{"type": "function", ...}``)."""
    mode: Mode
    named: str | None = None
    parallel: bool = True
    parser: ToolParser | None = None
    constraint: StructuredOutputs | None = field(default=None, repr=False)
    """The output constraint of ``required`` and named modes."""

    @property
    def skip_special_tokens(self) -> bool | None:
        """False where parsing needs the family's special tokens (``[TOOL_CALLS]``,
        ``<|python_tag|>``) in the text; None: leave the request's choice."""
        return False if self.mode == "auto" else None

    def new_id(self) -> str:
        return self.parser.new_id() if self.parser is not None else tool_call_id()

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The response message for a complete output, and its finish reason (``tool_calls``
        when the model called tools, except for a named choice, which keeps ``stop`` as
        OpenAI and vLLM answer)."""
        calls: tuple[ToolCall, ...] = ()
        content: str | None = text
        if self.mode == "named":
            calls, content = (ToolCall(self.new_id(), self.named, text),), None
        elif self.mode == "required":
            try:
                items = json.loads(text)
            # cut short (finish_reason "length") or nested deeper than the parser recurses (a
            # recursive schema): the text as is
            except (json.JSONDecodeError, RecursionError):
                items = None
            if isinstance(items, list) and items and all(map(_is_call_item, items)):
                calls = tuple(
                    ToolCall(self.new_id(), item["name"], arguments_json(item["parameters"]))
                    for item in items
                )
                content = None
        elif self.mode == "auto":
            parsed = self.parser.parse(text)
            calls, content = self.allowed(parsed.tool_calls), parsed.content
        message = {
            "role": "assistant",
            "content": content,
            "tool_calls": [c.to_json() for c in calls],
        }
        if calls and self.mode != "named" and finish_reason == "stop":
            finish_reason = "tool_calls"
        return message, finish_reason

    def allowed(self, calls: tuple[ToolCall, ...]) -> tuple[ToolCall, ...]:
        """The calls a response carries: the first only when ``parallel_tool_calls`` is false."""
        return calls if self.parallel else calls[:1]

    def stream(self) -> "ToolCallStream":
        if self.mode == "named":
            return _NamedStream(self)
        if self.mode == "required":
            return _RequiredStream(self)
        if self.mode == "auto":
            return _AutoStream(self)
        return ToolCallStream(self)


def _is_call_item(item: object) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("name"), str)
        and isinstance(item.get("parameters"), dict)
    )


# ---- request -> plan ------------------------------------------------------------------------


def plan_tools(
    tools: object,
    tool_choice: object,
    parallel_tool_calls: bool | None,
    *,
    parser_name: str | None,
    enable_auto: bool,
) -> ToolPlan | None:
    """The request's tool plan, or None when it has no tools.

    Raises:
        InvalidRequest: naming ``tools`` (malformed, duplicate names, a schema that is not one)
            or ``tool_choice`` (unknown value or function, no tools, ``auto`` without
            ``--enable-auto-tool-choice``).
    """
    if tools is None or tools == []:
        if tool_choice is not None and tool_choice != "none":
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    checked = check_tools(tools)
    names = [t["function"]["name"] for t in checked]
    choice = "auto" if tool_choice is None else tool_choice
    parallel = parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan(checked, "none", parallel=parallel)
    parser = get_parser(parser_name) if parser_name else None
    if choice == "auto":
        if not enable_auto or parser is None:
            raise InvalidRequest(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set on the router",
                param="tool_choice",
            )
        return ToolPlan(checked, "auto", parallel=parallel, parser=parser)
    if choice == "required":
        schema = required_schema(checked, parallel)
        return ToolPlan(
            checked,
            "required",
            parallel=parallel,
            parser=parser,
            constraint=_json_constraint(schema),
        )
    name = _named_choice(choice)
    if name not in names:
        raise InvalidRequest(
            f"tool_choice names the function {name!r}, which is not among the tools "
            f"({', '.join(names)})",
            param="tool_choice",
        )
    params = checked[names.index(name)]["function"].get("parameters") or EMPTY_PARAMETERS
    return ToolPlan(
        checked,
        "named",
        named=name,
        parallel=parallel,
        parser=parser,
        constraint=_json_constraint(params),
    )


def _named_choice(choice: object) -> str:
    function = choice.get("function") if isinstance(choice, dict) else None
    if (
        not isinstance(choice, dict)
        or choice.get("type", "function") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        raise InvalidRequest(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    return function["name"]


def check_tools(tools: object) -> list[dict]:
    """``tools`` as the template gets them, each checked.

    Raises:
        InvalidRequest: naming ``tools``; the message says which entry and why.
    """
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list of functions", param="tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequest(f'{where} must be {{"type": "function", ...}}', param="tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequest(f"{where}.function must be an object", param="tools")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest(
                f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'",
                param="tools",
            )
        if name in seen:
            raise InvalidRequest(f"{where}: two tools are named {name!r}", param="tools")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"{where}.function.description must be a string", param="tools")
        parameters = function.get("parameters")
        if parameters is not None:
            check_json_schema(parameters, f"{where}.function.parameters", "tools")
        out.append({"type": "function", "function": function})
    return out


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """vLLM's schema for ``tool_choice: "required"``: an array of calls, each one of the tools'
    ``{"name": <const>, "parameters": <its schema>}``; the tools' ``$defs`` hoisted to the top
    (where their ``#/$defs/...`` references point).

    Raises:
        InvalidRequest: two tools define one ``$defs`` name differently.
    """
    defs: dict[str, Any] = {}
    variants = []
    for tool in tools:
        params = dict(tool["function"].get("parameters") or EMPTY_PARAMETERS)
        for name, schema in (params.pop("$defs", None) or {}).items():
            if defs.setdefault(name, schema) != schema:
                raise InvalidRequest(
                    f'tools define $defs {name!r} differently; tool_choice "required" '
                    "needs one definition",
                    param="tools",
                )
        variants.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool["function"]["name"]]},
                    "parameters": params,
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": variants},
    }
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _json_constraint(schema: dict) -> StructuredOutputs:
    constraint = StructuredOutputs(json=json.dumps(schema, separators=(",", ":")))
    check_grammar(constraint, "tools")
    return constraint


# ---- streaming ------------------------------------------------------------------------------


class ToolCallStream:
    """One choice's text deltas as OpenAI streamed deltas. This base passes text through as
    content (``tool_choice: "none"``)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.called = False
        """Some tool call was sent."""

    def feed(self, text: str) -> list[dict]:
        """The deltas (``{"content": ...}`` or ``{"tool_calls": [...]}``) ``text`` makes."""
        return [{"content": text}] if text else []

    def finish(self) -> list[dict]:
        """The deltas still held when the output ends."""
        return []

    def finish_reason(self, finish_reason: str | None) -> str | None:
        if self.called and self.plan.mode != "named" and finish_reason == "stop":
            return "tool_calls"
        return finish_reason

    def _start(self, index: int, name: str, arguments: str = "") -> dict:
        self.called = True
        return {
            "tool_calls": [
                {
                    "index": index,
                    "id": self.plan.new_id(),
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ]
        }

    @staticmethod
    def _args(index: int, fragment: str) -> dict:
        return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}


class _NamedStream(ToolCallStream):
    """The whole output is the named function's arguments: stream it as they come."""

    def feed(self, text: str) -> list[dict]:
        if not text:
            return []
        if not self.called:
            return [self._start(0, self.plan.named, text)]
        return [self._args(0, text)]

    def finish(self) -> list[dict]:
        return [] if self.called else [self._start(0, self.plan.named)]


class _RequiredStream(ToolCallStream):
    """The output is a JSON array of ``{"name", "parameters"}`` (the grammar holds it to that):
    a scanner over its characters sends each call's name once known, then its parameters' JSON
    text as it comes."""

    def __init__(self, plan: ToolPlan) -> None:
        super().__init__(plan)
        self.scanner = CallArrayScanner("parameters")

    def feed(self, text: str) -> list[dict]:
        out = []
        for event in self.scanner.feed(text):
            if event[0] == "name":
                out.append(self._start(event[1], event[2]))
            else:
                out.append(self._args(event[1], event[2]))
        return out


class _AutoStream(ToolCallStream):
    """Free text that may hold calls in the parser's format: content is sent up to where a
    call may begin; from a call's marker on, the text is held to the end and parsed whole
    (as the non-streaming response is), then sent as calls, or as content if it holds none.
    A text that could still become a marker (``<tool_`` of ``<tool_call>``) is held until it
    cannot."""

    def __init__(self, plan: ToolPlan) -> None:
        super().__init__(plan)
        self.parser = plan.parser
        self.text = ""  # everything so far
        self.sent = 0  # characters of ``text`` sent as content
        self.in_call = False
        self.plain = False  # leading_only parsers: the output is not a call

    def feed(self, text: str) -> list[dict]:
        self.text += text
        if self.in_call:
            return []
        if self.plain:
            return self._content(len(self.text))
        if self.parser.leading_only:
            head = self.text.lstrip()
            if any(head.startswith(m) for m in self.parser.call_markers):
                self.in_call = True
                return []
            if not head or any(m.startswith(head) for m in self.parser.call_markers):
                return []  # could still become a call
            self.plain = True
            return self._content(len(self.text))
        starts = [
            i for i in (self.text.find(m, self.sent) for m in self.parser.call_markers) if i >= 0
        ]
        if starts:
            self.in_call = True
            return self._content(min(starts))
        return self._content(len(self.text) - self._marker_prefix())

    def _marker_prefix(self) -> int:
        """Length of the longest end of the text that begins a marker."""
        longest = 0
        for marker in self.parser.call_markers:
            for n in range(min(len(marker) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(marker[:n]):
                    longest = n
                    break
        return longest

    def _content(self, end: int) -> list[dict]:
        chunk, self.sent = self.text[self.sent : end], max(self.sent, end)
        return [{"content": chunk}] if chunk else []

    def finish(self) -> list[dict]:
        if not self.in_call:
            return self._content(len(self.text))
        calls = self.plan.allowed(self.parser.parse(self.text).tool_calls)
        if not calls:
            return self._content(len(self.text))
        self.called = True
        return [{"tool_calls": [{"index": i, **call.to_json()} for i, call in enumerate(calls)]}]


class CallArrayScanner:
    """Incremental reader of a JSON array of call objects ``[{"name": "f", "<args>": {...}},
    ...]``: ``feed`` returns, in order, ("name", index, name) when a call's name is complete
    and ("args", index, fragment) for its arguments' JSON text (held until the name is known,
    if the arguments come first). Assumes well-formed JSON, which the grammar guarantees."""

    def __init__(self, args_key: str) -> None:
        self.args_key = args_key
        self.depth = 0  # open arrays and objects; a call's own keys are at depth 2
        self.in_string = self.escape = False
        self.index = -1
        self.name: str | None = None
        self.held = ""  # arguments read before the name
        self.key: str | None = None  # the key whose value is being read (None: between keys)
        self.token = ""  # the key being read, or the current value's text
        self.events: list[tuple] = []

    def feed(self, text: str) -> list[tuple]:
        for c in text:
            self._char(c)
        events, self.events = self.events, []
        return events

    def _char(self, c: str) -> None:
        at_call = self.depth == 2 and not self.in_string
        if self.depth == 1 and not self.in_string and c == "{":  # a call begins
            self.depth, self.index = 2, self.index + 1
            self.name, self.held, self.key, self.token = None, "", None, ""
        elif self.depth == 2 and self.key is None and (self.in_string or c == '"'):
            self._track(c)
            self.token += c
            if not self.in_string:  # the key's closing quote
                self.key, self.token = _json_string(self.token) or "", ""
        elif at_call and c in ",}":  # the value ends, and with "}" the call
            if self.key == "name" and _json_string(self.token) is not None:
                self.name = _json_string(self.token)
                self.events.append(("name", self.index, self.name))
                held, self.held = self.held, ""
                if held:
                    self._emit(held)
            self.key, self.token = None, ""
            if c == "}":
                self.depth -= 1
        elif at_call and c == ":" and self.key is not None and not self.token:
            pass
        else:
            self._track(c)
            if self.key is not None and (self.token or not c.isspace()):
                self.token += c
                if self.key == self.args_key:
                    self._emit(c)

    def _track(self, c: str) -> None:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
        elif c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1

    def _emit(self, fragment: str) -> None:
        if self.name is None:
            self.held += fragment
        elif self.events and self.events[-1][0] == "args" and self.events[-1][1] == self.index:
            self.events[-1] = ("args", self.index, self.events[-1][2] + fragment)
        else:
            self.events.append(("args", self.index, fragment))


def _json_string(text: str) -> str | None:
    """The string a JSON string literal holds, or None if ``text`` is not one."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, str) else None
