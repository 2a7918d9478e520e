"""From a request's sampling fields to validated ``SamplingParams``: the one translation both
front doors (the router's OpenAI HTTP API and its gRPC RouterService) and the SDK share.

A front door only gathers the fields its request sets, by ``SamplingParams`` name; everything
else happens here, once, so HTTP and gRPC cannot drift apart:

- fields the request leaves unset take the model's generation defaults (vLLM's
  ``--generation-config auto``: ``GENERATION_DEFAULT_FIELDS`` of ``generation_config.json``);
- ``top_k`` 0 or -1 means "no top-k" (vLLM's and Hugging Face's spelling), overriding a default;
- ``max_tokens`` defaults to the rest of the context, and prompt + ``max_tokens`` must fit it;
- ``stop_token_ids`` and ``logit_bias``'s token ids must lie inside the vocabulary;
- every value is range-checked by ``SamplingParams`` itself.

Every problem raises ``InvalidRequest`` (``RequestTooLarge`` for what cannot fit the context)
naming the field, which each front door maps in its one place to a 400 or INVALID_ARGUMENT.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tandem.api.errors import InvalidRequest, RequestTooLarge
from tandem.api.sampling_params import SAMPLING_FIELDS, SamplingParams

GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""Sampling fields of a model's generation_config.json that become a request's defaults (vLLM's
set)."""

TOP_K_OFF = (0, -1)
"""``top_k`` values that switch top-k off (None in ``SamplingParams``)."""


@dataclass(slots=True, frozen=True)
class RequestLimits:
    """What the served model and its pods accept, checked against every request."""

    vocab_size: int
    max_model_len: int
    """Longest prompt + output served (the smallest of the configured and the pods' contexts)."""


def check_prompt_ids(prompt_ids: Sequence[int], limits: RequestLimits, param: str) -> None:
    """A prompt must be non-empty token ids inside the vocabulary, shorter than the context.

    Args:
        param: the request field that carried the prompt (``prompt``, ``messages``).
    """
    n = len(prompt_ids)
    if n == 0:
        raise InvalidRequest("the prompt is empty", param=param)
    vocab = limits.vocab_size
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)
    if n >= limits.max_model_len:
        raise RequestTooLarge(
            f"this model's maximum context length is {limits.max_model_len} tokens, "
            f"but the prompt has {n}",
            param=param,
        )


def resolve_sampling_params(
    requested: Mapping[str, Any],
    *,
    num_prompt_tokens: int,
    limits: RequestLimits | None,
    defaults: Mapping[str, Any] | None = None,
) -> SamplingParams:
    """Validated ``SamplingParams`` for a request.

    Args:
        requested: the fields the request sets, by ``SamplingParams`` name (None: unset).
        num_prompt_tokens: the prompt's length, for ``max_tokens`` against the context.
        limits: the served model's; None where they are not known (the SDK, checking a call
            before it sends it: ``max_tokens`` then defaults to a stand-in for validation only).
        defaults: values for the ``GENERATION_DEFAULT_FIELDS`` the request leaves unset.

    Raises:
        InvalidRequest: an unknown field or a value out of range (``param`` names it).
        RequestTooLarge: prompt + ``max_tokens`` beyond the context.
    """
    requested = {k: v for k, v in requested.items() if v is not None}
    unknown = sorted(set(requested) - set(SAMPLING_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown sampling option {unknown[0]!r}", param=unknown[0])
    kwargs = {k: v for k, v in (defaults or {}).items() if k in GENERATION_DEFAULT_FIELDS}
    kwargs.update(requested)
    if _is_int(kwargs.get("top_k")) and kwargs["top_k"] in TOP_K_OFF:
        del kwargs["top_k"]
    kwargs["max_tokens"] = _max_tokens(kwargs, num_prompt_tokens, limits)
    if limits is not None:
        _check_stop_token_ids(kwargs.get("stop_token_ids") or (), limits.vocab_size)
    params = SamplingParams(**kwargs)
    if limits is not None:
        _check_logit_bias(params, limits.vocab_size)
    return params


def _max_tokens(kwargs: dict[str, Any], num_prompt_tokens: int, limits: RequestLimits | None):
    requested = kwargs.get("max_tokens")
    if limits is None:
        if requested is not None:
            return requested
        # Without the context length, any valid max_tokens will do to check the rest.
        min_tokens = kwargs.get("min_tokens", 0)
        return max(1, min_tokens) if _is_int(min_tokens) else 1
    if requested is None:
        return limits.max_model_len - num_prompt_tokens
    if _is_int(requested) and num_prompt_tokens + requested > limits.max_model_len:
        raise RequestTooLarge(
            f"this model's maximum context length is {limits.max_model_len} tokens, but "
            f"{num_prompt_tokens + requested} were requested ({num_prompt_tokens} in the prompt, "
            f"{requested} for max_tokens)",
            param="max_tokens",
        )
    return requested


def _check_stop_token_ids(stop_token_ids, vocab_size: int) -> None:
    if isinstance(stop_token_ids, str | bytes) or not isinstance(stop_token_ids, Sequence):
        return  # not a list: SamplingParams names the problem
    if any(_is_int(t) and t >= vocab_size for t in stop_token_ids):
        raise InvalidRequest(
            f"stop_token_ids must be below the vocabulary size {vocab_size}", param="stop_token_ids"
        )


def _check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    bad = next((t for t, _ in params.logit_bias if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"logit_bias token id {bad} is outside the vocabulary [0, {vocab_size})",
            param="logit_bias",
        )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
