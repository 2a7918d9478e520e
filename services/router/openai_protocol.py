"""OpenAI request bodies as vLLM accepts them.

Known fields are type-checked by pydantic; the others go through ``field_policy`` (refused when
Tandem cannot honour them, unknown ones ignored and logged by name once, as vLLM does). A body
hands its sampling fields over by ``SamplingParams`` name (``sampling_fields``); the router's
``JobBuilder`` resolves and range-checks them exactly as it does for gRPC requests. Every problem
is an ``InvalidRequest`` naming the field, which the HTTP layer turns into a 400 with the OpenAI
error envelope.
"""

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from services.router import structured_request
from services.router.field_policy import check_fields
from tandem.api.errors import InvalidRequest
from tandem.api.sampling_params import SAMPLING_FIELDS, StructuredOutputs


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions.

    Undeclared fields are kept (``model_extra``) for ``field_policy``: refused when Tandem cannot
    honour what they ask, else ignored (unknown ones logged by name once).
    """

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    best_of: int | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    cache_salt: str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    structured_outputs: dict[str, Any] | None = None
    """vLLM's structured outputs: one of json, regex, choice, grammar, json_object."""
    return_tokens_as_token_ids: bool = False
    """Render logprob tokens as "token_id:N" (vLLM's extension; exact even for partial UTF-8)."""
    # vLLM's older spellings of structured_outputs (structured_request.py)
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _check_supported(self) -> None:
        check_fields(
            self.model_extra, "chat" if isinstance(self, ChatCompletionRequest) else "completion"
        )
        if self.stream and self.best_of is not None and self.best_of > self.n:
            # As vLLM: the best are known only once every completion finished.
            raise InvalidRequest(
                "best_of above n is not available when stream=True", param="best_of"
            )
        if self.stream and self.prompt_logprobs is not None and self.prompt_logprobs != 0:
            # As vLLM: a stream has no place for them (echo + logprobs streams its own).
            raise InvalidRequest(
                "prompt_logprobs are not available when stream=True", param="prompt_logprobs"
            )
        if self.cache_salt is not None and not self.cache_salt:
            raise InvalidRequest("cache_salt must be a non-empty string", param="cache_salt")

    def sampling_fields(self, tool_constraint: StructuredOutputs | None = None) -> dict[str, Any]:
        """The sampling fields this request sets, by ``SamplingParams`` name, for
        ``tandem.api.sampling_request`` (which applies defaults and limits and validates).

        Args:
            tool_constraint: the output constraint of a chat request's ``tool_choice``.
        """
        self._check_supported()
        names = type(self).model_fields
        fields = {name: getattr(self, name) for name in SAMPLING_FIELDS if name in names}
        fields["structured_outputs"] = self.output_constraint(tool_constraint)
        # The two fields whose spelling differs between /v1/completions and /v1/chat/completions.
        fields["max_tokens"] = self.requested_max_tokens
        fields["logprobs"] = self.num_logprobs
        return {name: value for name, value in fields.items() if value is not None}

    def constraint_fields(self) -> list[str]:
        """The fields of this request that constrain its output."""
        names = ["structured_outputs", *structured_request.GUIDED_FIELDS]
        return [name for name in names if getattr(self, name) is not None]

    def output_constraint(
        self, tool_constraint: StructuredOutputs | None = None
    ) -> StructuredOutputs | None:
        """The one output constraint this request sets (``structured_request``), or None.

        Raises:
            InvalidRequest: several fields constrain the output, or the one does not compile.
        """
        names = self.constraint_fields() + (["tool_choice"] if tool_constraint else [])
        structured_request.only_one(names)
        if not names or tool_constraint is not None:
            return tool_constraint
        name = names[0]
        if name == "structured_outputs":
            return structured_request.from_structured_outputs(self.structured_outputs)
        if name == "response_format":
            return structured_request.from_response_format(self.response_format)
        return structured_request.from_guided(name, getattr(self, name))

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token, or None for no logprobs."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def requested_max_tokens(self) -> int | None:
        # NOTE: max_tokens=0 (only with echo: without, SamplingParams refuses it, naming
        # max_tokens) runs as 1, as vLLM does; the router drops that token (``echo_only``).
        return 1 if self.echo_only else self.max_tokens

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens=0: the answer is the prompt alone (prompt scoring)."""
        return self.echo and self.max_tokens == 0

    def sampling_fields(self, tool_constraint: StructuredOutputs | None = None) -> dict[str, Any]:
        fields = super().sampling_fields(tool_constraint)
        if self.echo and self.logprobs is not None and "prompt_logprobs" not in fields:
            fields["prompt_logprobs"] = self.logprobs  # echo's logprobs cover the prompt (vLLM)
        return fields

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s): a string, a list of strings, token ids, or lists of token ids."""
        if self.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequest("prompt is empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCallMessage(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    """assistant: the calls it made."""
    tool_call_id: str | None = None
    """tool: the call this message answers."""

    def as_template_message(self, index: int = 0) -> dict[str, Any]:
        """The message as chat templates take it (transformers' format, as vLLM renders it):
        a call's arguments as an object, since templates write them with ``tojson``.

        Raises:
            InvalidRequest: a call's arguments are not JSON.
        """
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content or "",
        }
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments, index, i),
                    },
                }
                for i, call in enumerate(self.tool_calls)
            ]
        return message


def _arguments(text: str, message: int, call: int) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # nested deeper than the parser recurses: not a 500
        raise InvalidRequest(
            "a tool call's arguments must be JSON text",
            param=f"messages.{message}.tool_calls.{call}.function.arguments",
        ) from None


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    """Accepted; the schema is always enforced (by the grammar)."""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    """Functions the model may call (checked by ``tool_calls.plan_tools``)."""
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    """A Jinja chat template replacing the model's (vLLM's extension; only with the router's
    --trust-request-chat-template)."""
    _tool_plan: Any = PrivateAttr(None)
    _tool_plan_made: bool = PrivateAttr(False)

    @property
    def tool_plan(self) -> Any:
        """The ``tool_calls.ToolPlan`` the router made for this request (None: no tools)."""
        return self._tool_plan

    @property
    def tool_plan_made(self) -> bool:
        return self._tool_plan_made

    def set_tool_plan(self, plan: Any) -> None:
        self._tool_plan, self._tool_plan_made = plan, True

    @property
    def request_chat_template(self) -> str | None:
        """The chat template this request supplies, in either of vLLM's two places, or None."""
        kwargs = self.chat_template_kwargs or {}
        if self.chat_template is not None:
            return self.chat_template
        template = kwargs.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise InvalidRequest(
                "chat_template_kwargs.chat_template must be a string",
                param="chat_template_kwargs.chat_template",
            )
        return template

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.as_template_message(i) for i, m in enumerate(self.messages)]

    def constraint_fields(self) -> list[str]:
        names = super().constraint_fields()
        if self.response_format is not None and self.response_format.type != "text":
            names.insert(0, "response_format")
        return names

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise InvalidRequest("top_logprobs must be an integer in [0, 20]", param="top_logprobs")
        return self.top_logprobs or 0
