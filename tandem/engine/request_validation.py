"""Request validation: what the engine refuses before holding anything.

A prompt must be non-empty token ids inside the vocabulary; prompt + max_tokens must fit the
context and the KV pool (a request that could never complete is refused up front, never
admitted to wait forever); request fields must be in range.
"""

from collections.abc import Sequence as SequenceABC

from tandem.api.errors import InvalidRequest, RequestTooLarge
from tandem.api.sampling_params import SamplingParams
from tandem.engine.config import ResolvedLimits
from tandem.tokenizer import Tokenizer


class RequestValidator:
    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, limits: ResolvedLimits, block_size: int
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.limits = limits
        self.block_size = block_size

    def check_fields(self, params: SamplingParams, priority: int, cache_salt: str | None) -> None:
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(
                "sampling params must be a SamplingParams", param="sampling_params"
            )
        if (
            not isinstance(priority, int)
            or isinstance(priority, bool)
            or not -(2**31) <= priority < 2**31
        ):
            raise InvalidRequest("priority must be a 32-bit integer", param="priority")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequest("cache_salt must be a non-empty string", param="cache_salt")
        bad = next((t for t, _ in params.logit_bias if t >= self.vocab_size), None)
        if bad is not None:  # never ignored silently
            raise InvalidRequest(
                f"logit_bias token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                param="logit_bias",
            )

    def prompt_ids(self, prompt: str | SequenceABC[int]) -> list[int]:
        """Token ids of a text or token-id prompt, validated (non-empty, ids inside the vocab)."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, SequenceABC) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
        else:
            raise InvalidRequest("prompt must be a string or a list of token ids", param="prompt")
        if not ids:
            raise InvalidRequest("prompt is empty", param="prompt")
        # Checked for text too: a tokenizer's added tokens can lie beyond the model's vocab.
        vocab = self.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt"
            )
        return ids

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Refuse a request that this engine could never complete.

        Raises:
            RequestTooLarge: prompt or prompt + max_tokens beyond the context or the KV pool.
        """
        max_len = self.limits.max_model_len
        if num_prompt_tokens >= max_len:
            raise RequestTooLarge(
                f"the prompt has {num_prompt_tokens} tokens "
                f"but this model's context length is {max_len}",
                param="prompt",
            )
        total = num_prompt_tokens + params.max_tokens
        if total > max_len:
            raise RequestTooLarge(
                f"this model's maximum context length is {max_len} tokens, "
                f"but {total} were requested "
                f"({num_prompt_tokens} in the prompt, {params.max_tokens} for max_tokens)",
                param="max_tokens",
            )
        # The last generated token is never written to the cache.
        needed = -(-(total - 1) // self.block_size)
        if needed > self.limits.num_kv_blocks:
            raise RequestTooLarge(
                f"the request needs {needed} KV blocks "
                f"but the pool holds {self.limits.num_kv_blocks}",
                param="max_tokens",
            )
