"""OpenAI request bodies as vLLM accepts them.

Unknown fields are ignored (as vLLM does); known fields are type-checked by pydantic. A body
hands its sampling fields over by ``SamplingParams`` name (``sampling_fields``); the router's
``JobBuilder`` resolves and range-checks them exactly as it does for gRPC requests. Every problem
is an ``InvalidRequest`` naming the field, which the HTTP layer turns into a 400 with the OpenAI
error envelope.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.api.errors import InvalidRequest
from tandem.api.sampling_params import SAMPLING_FIELDS


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

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

    def _check_supported(self) -> None:
        if self.n != 1:
            raise InvalidRequest("only n=1 is supported", param="n")
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported", param="logit_bias")
        if self.best_of not in (None, 1):
            raise InvalidRequest("only best_of=1 is supported", param="best_of")
        if self.prompt_logprobs is not None:
            raise InvalidRequest("prompt_logprobs is not supported", param="prompt_logprobs")
        if self.structured_outputs is not None:
            raise InvalidRequest("structured_outputs is not supported", param="structured_outputs")
        if self.cache_salt is not None and not self.cache_salt:
            raise InvalidRequest("cache_salt must be a non-empty string", param="cache_salt")

    def sampling_fields(self) -> dict[str, Any]:
        """The sampling fields this request sets, by ``SamplingParams`` name, for
        ``tandem.api.sampling_request`` (which applies defaults and limits and validates)."""
        self._check_supported()
        names = type(self).model_fields
        fields = {name: getattr(self, name) for name in SAMPLING_FIELDS if name in names}
        # The two fields whose spelling differs between /v1/completions and /v1/chat/completions.
        fields["max_tokens"] = self.requested_max_tokens
        fields["logprobs"] = self.num_logprobs
        return {name: value for name, value in fields.items() if value is not None}

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

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s): a string, a list of strings, token ids, or lists of token ids."""
        if self.echo:
            raise InvalidRequest("echo is not supported", param="echo")
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {
            "role": "system" if self.role == "developer" else self.role,
            "content": content or "",
        }


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    """A Jinja chat template replacing the model's (vLLM's extension; only with the router's
    --trust-request-chat-template)."""

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

    def template_messages(self) -> list[dict[str, str]]:
        if self.tools:
            raise InvalidRequest("tools are not supported", param="tools")
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest(
                "only response_format type 'text' is supported", param="response_format"
            )
        return [m.as_template_message() for m in self.messages]

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
