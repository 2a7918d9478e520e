"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's fields)."""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from tandem.api.errors import InvalidRequest

_GREEDY_EPS = 1e-5
_UINT32 = 2**32 - 1
_INT32_MAX = 2**31 - 1
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Per-request sampling and stopping options, validated on construction.

    Raises:
        InvalidRequest: a field is out of range; ``param`` names it.
    """

    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int | None = None
    """Keep only the k most likely tokens; None keeps all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one, in [0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens, whatever else is in the batch."""
    presence_penalty: float = 0.0
    """OpenAI presence penalty over generated tokens, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI frequency penalty over generated tokens, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """Multiplicative penalty (HF/vLLM) over prompt and generated tokens, > 0."""
    stop: tuple[str, ...] = ()
    """Stop strings; the text ends before the first one (unless include_stop_str_in_output).
    Only text generated after min_tokens tokens is searched."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end generation (kept in token_ids, left out of the text)."""
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    min_tokens: int = 0
    """EOS and stop tokens are suppressed, and stop strings ignored, until this many tokens
    exist."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives (0: sampled only)."""
    skip_special_tokens: bool = True
    argmax_only: bool = field(init=False, repr=False, compare=False)
    """Derived: greedy, no logprobs, no penalties, so a token is one argmax of the raw logits
    (once ``min_tokens`` is reached). The sampler's fast path, checked per row every step."""

    def __post_init__(self) -> None:
        # Lists given by callers become tuples, so the object stays hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                if not isinstance(value, Iterable) or isinstance(value, str | bytes | dict):
                    raise InvalidRequest(f"{name} must be a list, got {value!r}", param=name)
                object.__setattr__(self, name, tuple(value))
        self._validate()
        object.__setattr__(
            self, "argmax_only", self.is_greedy and self.logprobs is None and not self.has_penalties
        )

    def _validate(self) -> None:
        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{param} {why}, got {getattr(self, param)!r}", param=param)

        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= _UINT32:
            raise bad("max_tokens", "must be an integer >= 1")
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k is not None and (
            not _is_int(self.top_k) or not 1 <= self.top_k <= _INT32_MAX
        ):
            raise bad("top_k", "must be an integer >= 1 or null")
        if not _is_finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and (
            not _is_int(self.seed) or not _INT64[0] <= self.seed <= _INT64[1]
        ):
            raise bad("seed", "must be a 64-bit integer")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_finite(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if not _is_finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", "must be an integer in [0, max_tokens]")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20
        ):
            raise bad("logprobs", "must be an integer in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if any(not _is_int(t) or not 0 <= t <= _UINT32 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be token ids (non-negative integers)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams) if f.init)
"""Every field a request may set, in declaration order: the one list the translators derive
theirs from (the protobuf message must carry exactly these; a unit test holds them equal)."""
