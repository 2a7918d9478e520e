"""Structured outputs as llguidance grammars: the one translation from a request's
``StructuredOutputs`` to the grammar the engine enforces, and its validation.

Torch-free, so the router can refuse an invalid schema, regex or grammar with a 400 before any
pod sees it; the engine (``tandem.engine.structured_output``) compiles the same text into its
matchers. llguidance has no ahead-of-time compile: building a grammar's text is microseconds and
validating it well under a millisecond for ordinary schemas, and both are memoised here.

What each constraint becomes:

- ``json``: the JSON schema. NOTE: compact JSON by default (no whitespace between tokens,
  llguidance's ``whitespace_flexible: false``), where vLLM allows any whitespace: a model that
  may emit whitespace anywhere can loop on it until ``max_tokens`` (vLLM added
  ``disable-any-whitespace`` for that). A schema opts back in with
  ``"x-guidance": {"whitespace_flexible": true}``.
- ``json_object``: the schema ``{"type": "object"}`` (OpenAI's ``json_object``).
- ``regex``: the regular expression (Rust ``regex`` syntax), matched in full.
- ``choice``: exactly one of the strings, an alternation of their escaped literals.
- ``grammar``: a Lark grammar (llguidance's dialect) or a GBNF one (llama.cpp's, as vLLM's
  guidance backend also accepts), converted to Lark.
"""

import functools
import json

from tandem.api.errors import InvalidRequest
from tandem.api.sampling_params import StructuredOutputs

JSON_DEFAULTS = {"whitespace_flexible": False}
"""llguidance JSON options applied before the schema's own ``x-guidance`` (compact JSON)."""

JSON_OBJECT_SCHEMA = '{"type": "object"}'
"""The schema of OpenAI's ``json_object``: any JSON object."""

_CACHE_SIZE = 512
_MEMOISED_MAX_CHARS = 64 * 1024
"""Longer constraints are built and validated each time, never memoised: the caches keep their
keys (and grammars), and ``_CACHE_SIZE`` of the largest a request body may carry (2 MiB) would
pin gigabytes of the router's memory."""


def grammar_text(so: StructuredOutputs) -> str:
    """The llguidance grammar of a constraint, as the engine's matchers take it.

    Raises:
        InvalidRequest: the JSON schema is not JSON, or a grammar cannot be read at all
            (``param`` is ``structured_outputs.<kind>``); other problems surface only when the
            grammar is validated (``check_structured_outputs``).
    """
    grammar, error = (_build if _memoised(so) else _build_now)(so)
    if grammar is None:
        raise InvalidRequest(error, param=f"structured_outputs.{so.kind}")
    return grammar


def check_structured_outputs(so: StructuredOutputs, *, param: str | None = None) -> None:
    """Refuse a constraint that llguidance cannot compile: an invalid JSON schema, regex or
    grammar (checked without a tokenizer, so the router needs none). Memoised by value.

    Args:
        so: the request's constraint.
        param: the request field to name in the error; default ``structured_outputs.<kind>``
            (a front door that took the constraint from another field, such as
            ``response_format``, names that one).

    Raises:
        InvalidRequest: naming ``param``, with llguidance's reason.
    """
    error = (_validate if _memoised(so) else _validate_now)(so)
    if error is not None:
        raise InvalidRequest(error, param=param or f"structured_outputs.{so.kind}")


def _memoised(so: StructuredOutputs) -> bool:
    size = len(so.json or so.regex or so.grammar or "") + sum(map(len, so.choice or ()))
    return size <= _MEMOISED_MAX_CHARS


def _build_now(so: StructuredOutputs) -> tuple[str | None, str]:
    """(grammar, "") or (None, why not)."""
    from llguidance import LLMatcher, grammar_from  # deferred: a native library

    kind = so.kind
    try:
        if kind == "json":
            return LLMatcher.grammar_from_json_schema(so.json, defaults=JSON_DEFAULTS), ""
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema(
                JSON_OBJECT_SCHEMA, defaults=JSON_DEFAULTS
            ), ""
        if kind == "regex":
            return LLMatcher.grammar_from_regex(so.regex), ""
        if kind == "choice":
            # JSON string literals are Lark string literals: every character escaped.
            alternatives = " | ".join(json.dumps(c) for c in so.choice)
            return LLMatcher.grammar_from_lark(f"start: {alternatives}"), ""
        return grammar_from("grammar", so.grammar), ""
    except (ValueError, TypeError) as exc:
        what = "JSON schema" if kind == "json" else kind
        return None, f"invalid {what}: {exc}"


_build = functools.lru_cache(maxsize=_CACHE_SIZE)(_build_now)


def _validate_now(so: StructuredOutputs) -> str | None:
    from llguidance import LLMatcher

    grammar, error = (_build if _memoised(so) else _build_now)(so)
    if grammar is None:
        return error
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return None  # warnings (an unsupported keyword ignored, say) do not refuse it
    what = {"json": "JSON schema", "json_object": "JSON schema"}.get(so.kind, so.kind)
    return f"invalid {what}: {messages[0].strip() if messages else 'rejected by llguidance'}"


_validate = functools.lru_cache(maxsize=_CACHE_SIZE)(_validate_now)
