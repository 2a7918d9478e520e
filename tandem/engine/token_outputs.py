"""The engine core's output processor: records each step's new tokens as ``StepOutputs``
columns, without detokenizing or looking for stop strings.

An engine running in a pod's engine core process (``LLMEngine(detokenize=False)``) uses this in
place of ``OutputProcessor``, with the same three calls; the pod's front process mirrors each
request and runs ``OutputProcessor`` on the tokens (as vLLM V1 detokenizes in its front end).
Stop strings are found there too, and end the request here through an abort.
"""

import time

from tandem.api.outputs import OutputKind, RequestMetrics, TokenLogprob
from tandem.api.step_outputs import StepOutputs
from tandem.engine.sequence import Sequence


class TokenState:
    """Per-request state: how many output tokens were recorded, and their pending logprobs."""

    __slots__ = ("seq", "metrics", "sent_tokens", "logprobs", "sent_prompt_logprobs")

    def __init__(self, seq: Sequence, metrics: RequestMetrics) -> None:
        self.seq = seq
        self.metrics = metrics
        self.sent_tokens = seq.num_output_tokens
        """Recorded output tokens (a migrated request's brought-along output counts as sent)."""
        self.logprobs: list[TokenLogprob | None] = []
        """Of the tokens not recorded yet, when the request asked for logprobs."""
        self.sent_prompt_logprobs = False
        """Whether a record carried the prompt logprobs (sent once, with the first tokens)."""


class TokenOutputProcessor:
    def __init__(self) -> None:
        self._batch = StepOutputs()

    def new_state(
        self, seq: Sequence, kind: OutputKind, prompt: str | None, metrics: RequestMetrics
    ) -> TokenState:
        return TokenState(seq, metrics)

    def on_new_token(self, state: TokenState, logprob: TokenLogprob | None) -> None:
        """Note the sequence's newest token (no stop strings here: returns no status)."""
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = time.monotonic()
        if state.seq.sampling_params.logprobs is not None:
            state.logprobs.append(logprob)

    def make_output(self, state: TokenState) -> None:
        """Record the tokens the request got since the last record (and its end, if it ended)."""
        seq = state.seq
        new = seq.token_ids[seq.num_prompt_tokens + state.sent_tokens :]
        if not new and not seq.is_finished:
            return None
        if seq.is_finished and state.metrics.finished_time is None:
            state.metrics.finished_time = time.monotonic()
        logprobs = state.logprobs if state.logprobs else [None] * len(new)
        stop = seq.stop_reason
        prompt_logprobs = None if state.sent_prompt_logprobs else seq.complete_prompt_logprobs
        state.sent_prompt_logprobs |= prompt_logprobs is not None
        self._batch.add(
            seq.request_id,
            new,
            logprobs,
            finish_reason=seq.status.finish_reason,
            stop_token_id=stop if isinstance(stop, int) else None,
            num_cached_tokens=seq.num_cached_tokens or 0,
            scheduled_time=state.metrics.first_scheduled_time,
            num_preemptions=seq.num_preemptions,
            prompt_logprobs=prompt_logprobs,
        )
        state.sent_tokens = seq.num_output_tokens
        state.logprobs = []
        return None

    def take(self) -> StepOutputs:
        """What was recorded since the last call."""
        batch, self._batch = self._batch, StepOutputs()
        return batch
