"""Per-request state inside the engine: tokens, progress, status."""

import enum
from collections.abc import Iterable

from tandem.api.ids import BlockHash, RequestId
from tandem.api.outputs import TokenLogprob
from tandem.api.sampling_params import SamplingParams


class SequenceStatus(enum.IntEnum):
    """Lifecycle of a sequence. Ordered so that every finished state is ``>= FINISHED_STOPPED``."""

    WAITING = 0
    WAITING_FOR_KV = 1
    """Blocks reserved; its prompt's KV is arriving from a prefill pod (decode role)."""
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6

    @property
    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish reason of a finished status (the one mapping), else None."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    """One request's tokens and progress.

    Invariants: ``num_computed_tokens <= num_tokens``; the KV of the first ``num_computed_tokens``
    tokens is in the request's blocks; ``block_hashes`` covers a prefix of the full blocks of
    ``token_ids``.
    """

    __slots__ = (
        "request_id",
        "token_ids",
        "prompt_token_ids",
        "num_prompt_tokens",
        "sampling_params",
        "priority",
        "arrival_time",
        "arrival_index",
        "cache_salt",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "block_hashes",
        "num_preemptions",
        "stop_reason",
        "prompt_logprobs",
    )

    def __init__(
        self,
        request_id: RequestId,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        arrival_time: float,
        arrival_index: int,
        priority: int = 0,
        cache_salt: str | None = None,
        output_token_ids: Iterable[int] = (),
    ) -> None:
        """``output_token_ids``: tokens this request generated already, elsewhere (a request
        migrated from another engine): they count as output -- toward ``max_tokens`` and
        ``min_tokens``, in penalties -- and are computed with the prompt, like a preempted
        sequence's."""
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        """The prompt, kept apart so outputs can share it without slicing every step."""
        self.token_ids = [*self.prompt_token_ids, *output_token_ids]
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.priority = priority
        self.arrival_time = arrival_time
        self.arrival_index = arrival_index
        """Monotonic admission counter: the tie-breaker that keeps queue order total."""
        self.cache_salt = cache_salt
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None
        """Prompt tokens served from the prefix cache at first admission (None until admitted)."""
        self.block_hashes: list[BlockHash] = []
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        """The stop token id or stop string that finished the sequence, if any."""
        asked = sampling_params.prompt_logprobs is not None
        self.prompt_logprobs: list[TokenLogprob] | None = (
            [] if asked and not self.num_output_tokens else None
        )
        """With ``SamplingParams.prompt_logprobs``: the logprobs of prompt tokens 1.. computed so
        far (``tandem.engine.prompt_logprobs``), or the ones a prefill pod computed. None: not
        asked, or a migrated request (its first output, with them, was sent elsewhere)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt positions must still be computed for their logprobs: such a sequence
        skips the prefix cache (cached positions have no hidden states). Never once it has
        output (a preempted sequence's recompute, a remote prefill's decode)."""
        return (
            self.prompt_logprobs is not None
            and self.num_output_tokens == 0
            and len(self.prompt_logprobs) < self.num_prompt_tokens - 1
        )

    @property
    def complete_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """``prompt_logprobs`` once they cover every prompt token from the second on, else
        None (not asked, or not computed yet)."""
        lps = self.prompt_logprobs
        return lps if lps is not None and len(lps) == self.num_prompt_tokens - 1 else None

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
