"""Structured outputs in the engine: one llguidance matcher per constrained sequence.

``StructuredOutputManager`` belongs to one engine. It builds llguidance's tokenizer once (from
the engine's Hugging Face tokenizer, on the first constrained request: about a second for a
150k-token vocabulary, so engines that never see one never pay it), compiles each distinct
constraint once into a template matcher (a bounded LRU keyed by the ``StructuredOutputs`` value)
and gives every constrained sequence its own copy. Each step the runner asks it for the bitmask
of the tokens each constrained row may sample (``bitmasks``: packed int32 words, bit ``t % 32``
of word ``t // 32`` set when token ``t`` is allowed), which the sampler applies; after the step
the engine advances the matchers by the tokens sampled (``advance``).

Invariant: a matcher has consumed a prefix of its sequence's output tokens (``_Matcher.consumed``
of them), and every path that appends output tokens catches it up from ``seq.output_token_ids``:
the step's sampled token, a migrated request's output so far (before its first mask), a decode
pod's first token sampled by the prefill pod. A matcher is created on first use, so every
sequence with ``structured_outputs`` has one (parallel samples included), and freed with the
sequence (``release``, from ``ModelRunner.release``). Preemption recomputes KV only: the
tokens, and so the matcher, stay as they are; nothing is consumed twice.

A grammar that cannot continue (``is_stopped``: the output is complete) allows only EOS, so
the sequence ends as any does on EOS, finish reason "stop" (the engine also ends it when it
consumed EOS under ``ignore_eos``; ``min_tokens`` does not hold EOS back then). A token the
matcher rejects (it cannot happen with the mask applied, but the first token of a remote prefill
or a migrated request's tokens come from elsewhere) fails that request alone; the engine goes on.

Matchers run with llguidance's logging off and terse errors: their state holds the completion,
which must not reach logs.
"""

import concurrent.futures
import logging
import threading
from collections import OrderedDict
from copy import copy
from dataclasses import dataclass

import torch

from tandem.api.errors import InvalidRequest
from tandem.api.ids import RequestId
from tandem.api.sampling_params import StructuredOutputs
from tandem.api.structured_grammar import grammar_text
from tandem.engine.sequence import Sequence
from tandem.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Matcher:
    matcher: object
    """The sequence's ``llguidance.LLMatcher``."""
    consumed: int = 0
    """Output tokens consumed so far (a prefix of the sequence's)."""
    error: str | None = None
    """Why the grammar rejected a token (then it consumes nothing more)."""


@dataclass(slots=True, frozen=True)
class GrammarProgress:
    """What advancing a sequence's matcher found."""

    stopped: bool = False
    """The grammar is complete: only EOS may follow (or it consumed EOS)."""
    error: str | None = None
    """The grammar rejected a token: the request fails with this message."""


_OK = GrammarProgress()


class StructuredOutputManager:
    """The grammar matchers of one engine's constrained sequences (see the module docstring)."""

    CACHE_SIZE = 256
    """Compiled constraints kept (template matchers, a few KB to a few MB each)."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]
    ) -> None:
        """
        Args:
            vocab_size: the width of the model's logits; masks cover at least this many tokens.
            eos_token_ids: the tokens that end a sequence; the grammar allows them once complete.
        """
        self._tokenizer = tokenizer
        self._eos = list(eos_token_ids) or (
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        )
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.num_words = -(-self.vocab_size // 32)
        self._ll_tokenizer = None
        self._executor = None
        self._tokenizer_lock = threading.Lock()
        self._templates: OrderedDict[StructuredOutputs, object] = OrderedDict()
        self._compiling: dict[StructuredOutputs, concurrent.futures.Future] = {}
        """Constraints being compiled off the engine's thread (``prepare``)."""
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="grammar-compile"
        )
        self._matchers: dict[RequestId, _Matcher] = {}

    # ---- compiling --------------------------------------------------------------------------

    def _tokenizer_for_llg(self):
        with self._tokenizer_lock:  # compile threads and the engine's
            return self._tokenizer_for_llg_locked()

    def _tokenizer_for_llg_locked(self):
        if self._ll_tokenizer is None:
            import llguidance

            backend = copy(self._tokenizer.backend)  # as llguidance.hf: no padding/truncation
            backend.no_padding()
            backend.no_truncation()
            try:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos or None
                )
            except (ValueError, RuntimeError) as exc:  # a tokenizer llguidance cannot read
                raise InvalidRequest(
                    f"structured outputs are unavailable with this model's tokenizer: {exc}",
                    param="structured_outputs",
                ) from exc
            self._executor = llguidance.LLExecutor()
        return self._ll_tokenizer

    def prepare(self, so: StructuredOutputs) -> concurrent.futures.Future | None:
        """Start compiling a constraint on a compile thread unless it is compiled: None when its
        template is ready, else the compile's future.

        Compiling runs without the GIL (llguidance), so a large schema (thousands of
        properties: seconds) delays only its own request, never the engine's steps: the engine
        holds the request out of the scheduler until ``compiled`` says so (as vLLM's
        WAITING_FOR_FSM).
        """
        if so in self._templates:
            return None
        future = self._compiling.get(so)
        if future is None:
            future = self._compiling[so] = self._pool.submit(self._compile, so)
        return future

    def compiled(self, so: StructuredOutputs) -> bool:
        """Whether a constraint's template is ready (after ``prepare``; starts it if not).

        Raises:
            InvalidRequest: its compile failed (every caller asking until ``forget_failed``
                gets the same error).
        """
        if so in self._templates:
            self._templates.move_to_end(so)
            return True
        future = self.prepare(so)
        if future is None or not future.done():
            return future is None
        self._store(so, future.result())  # raises the compile's InvalidRequest
        del self._compiling[so]
        return True

    def forget_failed(self) -> None:
        """Drop the failed compiles (their requests were told, ``compiled``)."""
        for so, future in list(self._compiling.items()):
            if future.done() and future.exception() is not None:
                del self._compiling[so]

    def wait_for_compile(self, timeout_s: float) -> None:
        """Block until a compile finishes or ``timeout_s`` passes (an engine with nothing else
        to do waits here instead of spinning)."""
        if self._compiling:
            concurrent.futures.wait(
                self._compiling.values(),
                timeout=timeout_s,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def _template(self, so: StructuredOutputs):
        """The compiled (never advanced) matcher of a constraint, from the LRU cache; waits for
        (or runs) its compile if it is not there (a decode pod's request whose first token came
        from the prefill pod before its compile ended; an evicted template).

        Raises:
            InvalidRequest: the schema, regex or grammar is invalid.
        """
        template = self._templates.get(so)
        if template is not None:
            self._templates.move_to_end(so)
            return template
        future = self.prepare(so)
        try:
            template = future.result()
        finally:
            self._compiling.pop(so, None)
        self._store(so, template)
        return template

    def _store(self, so: StructuredOutputs, template) -> None:
        self._templates[so] = template
        if len(self._templates) > self.CACHE_SIZE:
            self._templates.popitem(last=False)

    def _compile(self, so: StructuredOutputs):
        """A constraint's template (on a compile thread).

        Raises:
            InvalidRequest: the schema, regex or grammar is invalid, or allows no output.
        """
        import llguidance

        # Not validated first (``check_structured_outputs``): the router did, and the matcher
        # reports the same errors; validating again would add a third to the compile time.
        tokenizer = self._tokenizer_for_llg()
        template = llguidance.LLMatcher(
            tokenizer,
            grammar_text(so),
            log_level=0,
            limits=llguidance.LLParserLimits(verbose_errors=False),
        )
        if template.is_error():
            raise InvalidRequest(
                f"invalid {so.kind}: {template.get_error()}", param=f"structured_outputs.{so.kind}"
            )
        # A grammar whose language is empty ({"$ref": "#"}, ``start: start``) compiles, and
        # validates without a tokenizer, but fails at its first mask: fail the request before
        # it runs. One mask, on a copy.
        probe = template.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            raise InvalidRequest(
                f"invalid {so.kind}: the grammar allows no output",
                param=f"structured_outputs.{so.kind}",
            )
        return template

    # ---- sequences --------------------------------------------------------------------------

    def advance(self, seq: Sequence) -> GrammarProgress:
        """Consume the sequence's output tokens its matcher has not seen yet."""
        state = self._matchers.get(seq.request_id)
        if state is None:
            if seq.sampling_params.structured_outputs is None:
                return _OK
            # Created on first use (the engine ran the request once its constraint compiled,
            # ``compiled``); a migrated request's output so far is consumed right below.
            try:
                template = self._template(seq.sampling_params.structured_outputs)
            except InvalidRequest as exc:  # a decode pod's request whose compile failed
                return GrammarProgress(error=str(exc))
            state = self._matchers[seq.request_id] = _Matcher(template.deep_copy())
        m = state.matcher
        new = seq.token_ids[seq.num_prompt_tokens + state.consumed :]
        if new and state.error is None:
            taken = 0
            for t in new:
                # EOS after a complete grammar is taken (its state stays complete).
                if not (t in self._eos and m.is_stopped()) and not m.consume_token(t):
                    break
                taken += 1
            if taken < len(new):
                # The token id only: the matcher's own message quotes the completion's text.
                state.error = (
                    f"output token {state.consumed + taken} (id {new[taken]}) does not follow "
                    "the structured_outputs grammar"
                )
            state.consumed += len(new)
        if state.error is None and m.is_error():
            state.error = "the structured_outputs grammar failed (llguidance error)"
            logger.warning("grammar matcher of %s failed", seq.request_id)
        if state.error is not None:
            return GrammarProgress(error=state.error)
        return GrammarProgress(stopped=m.is_stopped())

    def bitmasks(self, seqs: list[Sequence]) -> list[torch.Tensor | None]:
        """Per sequence, the packed mask of the tokens it may sample next (int32 words on the
        host), or None for an unconstrained one. Masks of all rows are computed in parallel
        (llguidance's executor, without the GIL)."""
        rows = [i for i, s in enumerate(seqs) if s.sampling_params.structured_outputs is not None]
        out: list[torch.Tensor | None] = [None] * len(seqs)
        if not rows:
            return out
        masks = torch.zeros((len(rows), self.num_words), dtype=torch.int32)
        jobs = []
        for k, i in enumerate(rows):
            progress = self.advance(seqs[i])  # normally a no-op: caught up after each step
            if progress.error is None and not progress.stopped:
                jobs.append((self._matchers[seqs[i].request_id].matcher, k))
            else:
                # Only EOS: the sequence ends, and ``advance`` after the step reports it.
                for t in self._eos:
                    masks[k, t // 32] |= _bit(t % 32)
        if jobs:
            self._executor.unsafe_compute_mask_ptr(
                jobs, masks.data_ptr(), self.num_words * 4, len(rows)
            )
        for k, i in enumerate(rows):
            out[i] = masks[k]
        return out

    def is_complete(self, seq: Sequence) -> bool:
        """Whether the sequence's grammar is complete: only EOS may follow."""
        state = self._matchers.get(seq.request_id)
        return state is not None and state.error is None and state.matcher.is_stopped()

    def release(self, request_id: RequestId) -> None:
        """Forget a finished or aborted sequence's matcher."""
        self._matchers.pop(request_id, None)

    @property
    def num_matchers(self) -> int:
        return len(self._matchers)


def _bit(i: int) -> int:
    """Bit ``i`` of an int32 word, as the signed value torch stores."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i
