"""Output processor: detokenizes new tokens, applies stop strings, builds RequestOutputs.

Stop strings are found in the text, not in tokens, so they are checked here; a hit finishes the
sequence through the scheduler (which frees its blocks). Semantics follow vLLM:

- stop strings only match text generated after ``min_tokens`` tokens;
- the token that ended generation through EOS or ``stop_token_ids`` stays in ``token_ids`` but
  not in the text (unless ``include_stop_str_in_output``);
- while streaming, the last ``len(longest stop string) - 1`` characters are held back so that a
  stop string's beginning is never sent before it is known not to complete.
"""

import time

from tandem.api.outputs import (
    CompletionOutput,
    OutputKind,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)
from tandem.engine.sequence import Sequence, SequenceStatus
from tandem.engine.stopping import find_stop_string
from tandem.tokenizer import StreamDecoder, Tokenizer


class RequestState:
    """Per-request output state: text so far, what was already sent, logprobs."""

    __slots__ = (
        "seq",
        "kind",
        "prompt",
        "decoder",
        "text",
        "sent_chars",
        "sent_tokens",
        "logprobs",
        "sent_logprobs",
        "hold_back",
        "stop_check_start",
        "metrics",
        "sent_prompt_logprobs",
    )

    def __init__(
        self,
        seq: Sequence,
        kind: OutputKind,
        prompt: str | None,
        decoder: StreamDecoder,
        metrics: RequestMetrics,
    ) -> None:
        self.seq = seq
        self.kind = kind
        self.prompt = prompt
        self.decoder = decoder
        self.text = ""
        self.sent_chars = 0
        self.sent_tokens = 0
        self.logprobs: list[TokenLogprob] | None = (
            [] if seq.sampling_params.logprobs is not None else None
        )
        self.sent_logprobs = 0
        params = seq.sampling_params
        longest = max((len(s) for s in params.stop), default=1)
        self.hold_back = 0 if params.include_stop_str_in_output else longest - 1
        self.stop_check_start = 0
        """Stop strings may only start at or after this index (text after min_tokens tokens)."""
        self.metrics = metrics
        self.sent_prompt_logprobs = False
        """Whether an output carried the prompt logprobs (a delta stream sends them once)."""


class OutputProcessor:
    """Turns sequences' new tokens into text and RequestOutputs, per request output kind."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def new_state(
        self, seq: Sequence, kind: OutputKind, prompt: str | None, metrics: RequestMetrics
    ) -> RequestState:
        decoder = self.tokenizer.decode_stream(
            skip_special_tokens=seq.sampling_params.skip_special_tokens,
            prompt_token_ids=seq.prompt_token_ids,
        )
        state = RequestState(seq, kind, prompt, decoder, metrics)
        if seq.num_output_tokens:
            self._replay(state)
        return state

    def _replay(self, state: RequestState) -> None:
        """A migrated request's output so far (tokens it brought along): text, decoder and
        stop-string window as they were on the engine that generated it, marked as sent.

        They reached the client before the migration, so none ended the request (its end would
        have come with them): no stop string is searched here. Of their text, an uninterrupted
        stream had sent all but the hold-back (a caller that knows better sets ``sent_chars``).
        """
        seq, params = state.seq, state.seq.sampling_params
        for i, token in enumerate(seq.output_token_ids, start=1):
            piece = state.decoder.step(token)
            state.text += piece
            if piece and i <= params.min_tokens:
                state.stop_check_start = len(state.text)
        state.sent_tokens = seq.num_output_tokens
        state.sent_chars = max(0, len(state.text) - state.hold_back)

    def on_new_token(
        self, state: RequestState, logprob: TokenLogprob | None
    ) -> SequenceStatus | None:
        """Detokenize the sequence's newest token. Returns FINISHED_STOPPED if a stop string hit."""
        seq = state.seq
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = time.monotonic()
        if state.logprobs is not None and logprob is not None:
            state.logprobs.append(logprob)
        params = seq.sampling_params
        stopped_by_token = seq.status == SequenceStatus.FINISHED_STOPPED
        if stopped_by_token and not params.include_stop_str_in_output:
            return None  # the EOS / stop token ends the text without appearing in it
        piece = state.decoder.step(seq.token_ids[-1])
        state.text += piece
        if not params.stop or not piece:
            return None
        if seq.num_output_tokens <= params.min_tokens:
            state.stop_check_start = len(state.text)
            return None
        hit = find_stop_string(
            state.text, len(piece), params.stop, min_start=state.stop_check_start
        )
        if hit is None:
            return None
        idx, stop = hit
        state.text = (
            state.text[: idx + len(stop)] if params.include_stop_str_in_output else state.text[:idx]
        )
        seq.stop_reason = stop
        return SequenceStatus.FINISHED_STOPPED

    def make_output(self, state: RequestState) -> RequestOutput | None:
        """The output to emit for this request now, per its kind (None: nothing to emit)."""
        seq = state.seq
        finished = seq.is_finished
        if state.kind is OutputKind.FINAL_ONLY and not finished:
            return None
        if finished and state.metrics.finished_time is None:
            state.metrics.finished_time = time.monotonic()
        state.metrics.num_preemptions = seq.num_preemptions
        text_end = (
            len(state.text)
            if finished
            else max(state.sent_chars, len(state.text) - state.hold_back)
        )
        if state.kind is OutputKind.DELTA:
            text = state.text[state.sent_chars : text_end]
            token_ids = seq.token_ids[seq.num_prompt_tokens + state.sent_tokens :]
            logprobs = state.logprobs[state.sent_logprobs :] if state.logprobs is not None else None
        else:
            text = state.text[:text_end]
            token_ids = seq.output_token_ids
            logprobs = list(state.logprobs) if state.logprobs is not None else None
        state.sent_chars = text_end
        state.sent_tokens = seq.num_output_tokens
        state.sent_logprobs = len(state.logprobs) if state.logprobs is not None else 0
        prompt_logprobs = None
        if state.kind is not OutputKind.DELTA or not state.sent_prompt_logprobs:
            prompt_logprobs = seq.complete_prompt_logprobs
            state.sent_prompt_logprobs |= prompt_logprobs is not None
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=token_ids,
            finish_reason=seq.status.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=logprobs,
        )
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            num_cached_tokens=seq.num_cached_tokens or 0,
            prompt=state.prompt,
            prompt_logprobs=prompt_logprobs,
            metrics=state.metrics,
        )
