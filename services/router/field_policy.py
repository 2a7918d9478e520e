"""Which request fields the router's OpenAI routes honour, refuse or ignore.

Every field of OpenAI's chat/completions and completions requests and of vLLM's extras falls in
one of four classes:

- **honoured**: declared on the pydantic bodies (``openai_protocol``) and acted on there (or
  refused there for values Tandem cannot honour, naming the field);
- **refused**: listed in ``REFUSED`` (``CHAT_REFUSED``/``COMPLETION_REFUSED`` for the fields of
  one endpoint): a request that *asks for something* with one of them (a value other than its
  neutral ones: ``null``, ``false``, the default) gets a 400 naming the field, so no client is
  ever served as if its request had been honoured. Sending the neutral value (``"audio": null``,
  ``"use_beam_search": false``, ``"modalities": ["text"]``) is accepted;
- **ignored**: ``IGNORED``: fields that change nothing a client gets back (``user``, ``store``,
  ``metadata``, ``service_tier``, ...): accepted, unused;
- **unknown**: in neither OpenAI's nor vLLM's request: accepted, and their *names* (never their
  values) logged at WARNING once per name per process, as vLLM does.

A field a body declares is honoured whatever these tables say: the helper that implements a
refused field declares it on the body, and its entry here no longer applies.
"""

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tandem.api.errors import InvalidRequest

logger = logging.getLogger(__name__)

Endpoint = Literal["chat", "completion"]


@dataclass(slots=True, frozen=True)
class Refusal:
    """A field Tandem cannot honour: ``why`` it is refused, unless its value is ``null``, one of
    ``neutral`` (values that ask for nothing, compared with their type: ``1`` is not ``true``),
    or, with ``empty_ok``, an empty list, object or string."""

    why: str
    neutral: tuple[Any, ...] = ()
    empty_ok: bool = False

    def asks_for_something(self, value: Any) -> bool:
        if value is None:
            return False
        if self.empty_ok and isinstance(value, list | dict | str) and not value:
            return False
        return not any(value == n and type(value) is type(n) for n in self.neutral)


def _empty(why: str) -> Refusal:
    """A list or object field: refused unless absent or empty."""
    return Refusal(why, empty_ok=True)


REFUSED: dict[str, Refusal] = {
    # OpenAI
    "audio": Refusal("audio output is not supported"),
    "modalities": Refusal("only text output is supported", (["text"],)),
    "prediction": Refusal("predicted outputs are not supported"),
    "web_search_options": Refusal("web search is not supported"),
    "reasoning_effort": Refusal("the served model has no reasoning-effort control"),
    "verbosity": Refusal("verbosity is not supported"),
    "functions": _empty("legacy functions are not supported; use tools"),
    "function_call": Refusal("legacy function_call is not supported; use tool_choice", ("none",)),
    # vLLM's extras
    "use_beam_search": Refusal("beam search is not supported", (False,)),
    "length_penalty": Refusal("length_penalty applies to beam search only", (1.0, 1)),
    "spaces_between_special_tokens": Refusal(
        "spaces_between_special_tokens: false is not supported", (True,)
    ),
    "truncate_prompt_tokens": Refusal("prompt truncation is not supported"),
    "allowed_token_ids": _empty("allowed_token_ids is not supported"),
    "bad_words": _empty("bad_words is not supported"),
    "logits_processors": _empty("custom logits processors are not supported"),
    "vllm_xargs": _empty("vllm_xargs is not supported"),
    "kv_transfer_params": _empty("Tandem moves the KV cache itself"),
    "return_token_ids": Refusal("return_token_ids is not supported", (False,)),
    "guided_json": Refusal("guided_json is not supported"),
    "guided_regex": Refusal("guided_regex is not supported"),
    "guided_choice": _empty("guided_choice is not supported"),
    "guided_grammar": Refusal("guided_grammar is not supported"),
    "structural_tag": Refusal("structural_tag is not supported"),
    "mm_processor_kwargs": _empty("the served model takes text only"),
    "media_io_kwargs": _empty("the served model takes text only"),
}
"""Fields of both endpoints Tandem cannot honour (when not declared on the body)."""

CHAT_REFUSED: dict[str, Refusal] = {
    "echo": Refusal("echo is not supported on chat completions", (False,)),
    "continue_final_message": Refusal(
        "continue_final_message is not supported (chat_template_kwargs reach the template)",
        (False,),
    ),
    "add_special_tokens": Refusal(
        "add_special_tokens: true is not supported on chat completions (the chat template "
        "writes the special tokens)",
        (False,),
    ),
    "documents": _empty("documents are not supported"),
}

COMPLETION_REFUSED: dict[str, Refusal] = {
    "suffix": Refusal("suffix is not supported", ("",)),
    "add_special_tokens": Refusal(
        "add_special_tokens: false is not supported on completions", (True,)
    ),
    "response_format": Refusal("response_format is not supported on completions"),
    "prompt_embeds": Refusal("prompt_embeds are not supported"),
}

IGNORED = frozenset(
    {
        # OpenAI: bookkeeping, billing and caching hints that change no output
        "user",
        "store",
        "metadata",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        # meaningful with tools only (refused or honoured with them)
        "parallel_tool_calls",
        # vLLM's: choices of implementation, or the request id (the x-request-id header is ours)
        "guided_decoding_backend",
        "guided_whitespace_pattern",
        "include_reasoning",
        "request_id",
    }
)
"""Fields accepted and unused: they change nothing a client gets back."""

MAX_WARNED_NAMES = 256
"""Most unknown field names remembered (and so warned about): a client sending a new name per
request must not grow the router's memory or flood its log."""

_warned: set[str] = set()


def check_fields(fields: Mapping[str, Any] | None, endpoint: Endpoint) -> None:
    """Apply the policy to the fields a body did not declare (pydantic's ``model_extra``: a
    declared field never reaches here, so its entry in these tables no longer applies).

    Args:
        fields: the undeclared fields and their values.
        endpoint: which route's tables apply.

    Raises:
        InvalidRequest: a refused field asks for something; ``param`` names it.
    """
    if not fields:
        return
    refused = {**REFUSED, **(CHAT_REFUSED if endpoint == "chat" else COMPLETION_REFUSED)}
    unknown = []
    for name, value in fields.items():
        if name in IGNORED:
            continue
        refusal = refused.get(name)
        if refusal is None:
            unknown.append(name)
        elif refusal.asks_for_something(value):
            raise InvalidRequest(f"{name}: {refusal.why}", param=name)
    if unknown:
        warn_unknown(unknown)


def warn_unknown(names: Iterable[str]) -> None:
    """Log, once per name, that these fields were ignored (names only, shortened; never values)."""
    new = sorted({n[:64] for n in names} - _warned)[: max(0, MAX_WARNED_NAMES - len(_warned))]
    if not new:
        return
    _warned.update(new)
    logger.warning(
        "The following fields were present in the request but ignored: %s",
        ", ".join(repr(n) for n in new),
    )


def all_listed() -> frozenset[str]:
    """Every field name the policy tables know (for the README's list and tests)."""
    return frozenset(REFUSED) | frozenset(CHAT_REFUSED) | frozenset(COMPLETION_REFUSED) | IGNORED
