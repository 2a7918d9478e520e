"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's fields)."""

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

from tandem.api.errors import InvalidRequest

_GREEDY_EPS = 1e-5
_UINT32 = 2**32 - 1
_INT32_MAX = 2**31 - 1
_INT64 = (-(2**63), 2**63 - 1)
MAX_LOGPROBS = 20
"""Most alternatives per position (``logprobs``, ``prompt_logprobs``): OpenAI's bound."""
LOGIT_BIAS_RANGE = (-100.0, 100.0)
"""OpenAI's bound on one ``logit_bias`` value."""
MAX_LOGIT_BIAS_ENTRIES = 1024
"""Most tokens one ``logit_bias`` may name: the sampler adds every entry of every row each step,
so an unbounded map (a whole vocabulary, times ``n`` samples) would cost seconds per step."""


@dataclass(slots=True, frozen=True)
class StructuredOutputs:
    """A constraint on the generated text (vLLM's ``structured_outputs``): exactly one of
    ``json``, ``regex``, ``choice``, ``grammar`` or ``json_object``.

    The engine compiles it to a grammar and masks every step's logits with the tokens the
    grammar allows (``tandem.engine.structured_output``); here only its shape is checked.

    Raises:
        InvalidRequest: none or several constraints, or one of the wrong type.
    """

    json: str | None = None
    """A JSON schema, as JSON text (a dict given here is serialized)."""
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar in Lark syntax (llguidance's dialect)."""
    json_object: bool = False
    """Any JSON object (OpenAI's ``response_format: json_object``)."""

    def __post_init__(self) -> None:
        param = "structured_outputs"
        if isinstance(self.json, Mapping):
            object.__setattr__(self, "json", json.dumps(self.json, separators=(",", ":")))
        if self.choice is not None and not isinstance(self.choice, tuple):
            if isinstance(self.choice, str | bytes) or not isinstance(self.choice, Iterable):
                raise InvalidRequest("choice must be a list of strings", param=f"{param}.choice")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequest(f"{name} must be a non-empty string", param=f"{param}.{name}")
        if self.choice is not None and (
            not self.choice or any(not isinstance(c, str) for c in self.choice)
        ):
            raise InvalidRequest(
                "choice must be a non-empty list of strings", param=f"{param}.choice"
            )
        if not isinstance(self.json_object, bool):
            raise InvalidRequest("json_object must be a boolean", param=f"{param}.json_object")
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name)]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequest(
                "structured_outputs takes exactly one of json, regex, choice, grammar or "
                f"json_object, got {given or 'none'}",
                param=param,
            )

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "regex", "choice", "grammar" or "json_object"."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


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
    n: int = 1
    """Completions returned for the prompt; they share its KV blocks."""
    best_of: int | None = None
    """Completions generated (>= n; None: n); the n of highest cumulative logprob are
    returned."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling, sorted by token id; a
    mapping given here (OpenAI's ``{"token id": bias}``) is converted."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob (from the second on) and this many alternatives."""
    structured_outputs: StructuredOutputs | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar."""
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
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if isinstance(self.structured_outputs, Mapping):
            object.__setattr__(
                self, "structured_outputs", _structured_outputs(self.structured_outputs)
            )
        self._validate()
        object.__setattr__(
            self,
            "argmax_only",
            self.is_greedy
            and self.logprobs is None
            and not self.has_penalties
            and not self.logit_bias
            and self.structured_outputs is None,
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
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}]")
        if not _is_int(self.n) or not 1 <= self.n <= _INT32_MAX:
            raise bad("n", "must be an integer >= 1")
        if self.best_of is not None and (
            not _is_int(self.best_of) or not self.n <= self.best_of <= _INT32_MAX
        ):
            raise bad("best_of", "must be an integer >= n")
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputs
        ):
            raise bad("structured_outputs", "must be an object")
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


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (token id, bias) pairs, from a mapping (JSON keys are strings of
    digits) or pairs.

    Raises:
        InvalidRequest: a key that is not a token id, or a bias outside ``LOGIT_BIAS_RANGE``.
    """
    items = value.items() if isinstance(value, Mapping) else value
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        raise InvalidRequest("logit_bias must map token ids to numbers", param="logit_bias")
    items = list(items)
    if len(items) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequest(
            f"logit_bias may name at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(items)}",
            param="logit_bias",
        )
    out: dict[int, float] = {}
    lo, hi = LOGIT_BIAS_RANGE
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise InvalidRequest("logit_bias must map token ids to numbers", param="logit_bias")
        key, bias = item
        token = int(key) if isinstance(key, str) and key.isdigit() and key.isascii() else key
        if not _is_int(token) or not 0 <= token <= _UINT32:
            raise InvalidRequest(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            )
        if not _is_finite(bias) or not lo <= bias <= hi:
            raise InvalidRequest(
                f"logit_bias values must be in [{lo:g}, {hi:g}], got {bias!r} for token {token}",
                param="logit_bias",
            )
        out[token] = float(bias)
    return tuple(sorted(out.items()))


def _structured_outputs(value: Mapping) -> StructuredOutputs:
    names = {f.name for f in fields(StructuredOutputs)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise InvalidRequest(
            f"structured_outputs has no option {unknown[0]!r} (supported: {sorted(names)})",
            param=f"structured_outputs.{unknown[0]}",
        )
    return StructuredOutputs(**{k: v for k, v in value.items() if v is not None})


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams) if f.init)
"""Every field a request may set, in declaration order: the one list the translators derive
theirs from (the protobuf message must carry exactly these; a unit test holds them equal)."""
