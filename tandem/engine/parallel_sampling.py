"""Parallel sampling: one request's ``n`` (or ``best_of``) samples as sibling sequences.

A request with ``n`` or ``best_of`` above 1 (a *parent*) runs as ``best_of or n`` sequences
(its *samples*), each with its own id (``sample_id``), sampling parameters (``sample_params``)
and blocks. Sample 0, the *lead*, is admitted as any request; the others wait until the lead's
prompt is computed (its prefill ran here, or its KV arrived from a prefill pod) and are then
queued behind it, holding the lead's prompt blocks by reference (``BlockManager.fork``), its
partial last block included: the prompt is prefilled once. Each sample computes only the
prompt's last token (a decode pod has no logits row for a remotely prefilled prompt: the
prefill pod sampled the lead's first token from it), which writes into the shared partial
block, so that block is copied first (copy-on-write; the runner copies it before the step).
Whichever of the lead and the samples writes last keeps the original: ``n`` samples make at
most ``n - 1`` copies. A sample preempted later, or one released after its lead already ended
(its first token finished it), takes the prompt's full blocks from the prefix cache and
recomputes the rest, like any sequence. Without prefix caching the fork still shares the
prompt's blocks (it needs no cache lookup); only a preempted sample recomputes its prompt.

Per-sample seeds: a seeded request's sample ``i`` uses ``seed + i`` (wrapped to 64 bits), so
sample 0 is what the same request with ``n=1`` returns and every sample is reproducible.

``ParentRequest`` turns the samples' outputs into the request's: each sample's completion under
its ``index``; with ``best_of > n`` only the ``n`` of highest cumulative logprob, once every
sample finished, re-indexed from 0 (their logprobs -- always computed then -- are dropped
unless the request asked for them). The engine and a pod's front process (which detokenizes
an engine core's samples) both use it.
"""

import dataclasses

from tandem.api.outputs import CompletionOutput, OutputKind, RequestOutput
from tandem.api.sampling_params import SamplingParams

SAMPLE_SEPARATOR = "#s"
"""Sample ids are ``<parent id>#s<index>``. Pods' engine cores only see ids ending in
``#<digits>`` (``EngineCoreClient``) or these, so the two never collide; an offline engine
refuses a request id already in use, sample ids included."""

_INT64 = 1 << 64


def num_samples(params: SamplingParams) -> int:
    """Sequences a request runs: ``best_of`` if set, else ``n``."""
    return params.best_of if params.best_of is not None else params.n


def is_parallel(params: SamplingParams) -> bool:
    return num_samples(params) > 1


def sample_id(parent_id: str, index: int) -> str:
    return f"{parent_id}{SAMPLE_SEPARATOR}{index}"


def sample_seed(seed: int | None, index: int) -> int | None:
    """Sample ``index``'s seed: ``seed + index`` as a signed 64-bit integer."""
    if seed is None:
        return None
    return (seed + index + (1 << 63)) % _INT64 - (1 << 63)


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample ``index``'s parameters: one completion, its own seed, logprobs of the sampled
    token at least when ``best_of`` must rank the samples, prompt logprobs on the lead only."""
    ranked = params.best_of is not None and params.best_of > params.n
    return dataclasses.replace(
        params,
        n=1,
        best_of=None,
        seed=sample_seed(params.seed, index),
        logprobs=0 if ranked and params.logprobs is None else params.logprobs,
        prompt_logprobs=params.prompt_logprobs if index == 0 else None,
    )


def prefill_params(params: SamplingParams) -> SamplingParams:
    """What a prefill pod runs for a request: its lead sample only (one prefill, one first
    token; a decode pod runs the other samples)."""
    return sample_params(params, 0) if is_parallel(params) else params


class ParentRequest:
    """The samples of one request and the request's outputs built from theirs."""

    __slots__ = (
        "request_id",
        "params",
        "kind",
        "sample_ids",
        "_finished",
        "_final",
        "_first",
        "_prompt_logprobs",
        "_num_cached_tokens",
    )

    def __init__(self, request_id: str, params: SamplingParams, kind: OutputKind) -> None:
        self.request_id = request_id
        self.params = params
        self.kind = kind
        self.sample_ids = [sample_id(request_id, i) for i in range(num_samples(params))]
        self._finished: set[int] = set()
        self._final: dict[int, CompletionOutput] = {}
        """Completions kept until every sample finished (FINAL_ONLY, best_of ranking)."""
        self._first = True
        self._prompt_logprobs = None
        """The lead's prompt logprobs, until the request's first output carries them."""
        self._num_cached_tokens: int | None = None
        """The lead's: the request's prompt ran once, as the lead (the other samples took its
        blocks)."""

    @property
    def ranked(self) -> bool:
        """Whether the n best of more samples are returned (only once all finished)."""
        return len(self.sample_ids) > self.params.n

    def sample_kind(self) -> OutputKind:
        """The output kind each sample's state is built with: the request's."""
        return self.kind

    def sample_params(self, index: int) -> SamplingParams:
        return sample_params(self.params, index)

    @property
    def finished(self) -> bool:
        return len(self._finished) == len(self.sample_ids)

    def on_output(self, index: int, out: RequestOutput) -> RequestOutput | None:
        """Sample ``index``'s output in, the request's output to emit out (None: nothing yet).

        Streams (DELTA, CUMULATIVE) get each sample's output under its index. Otherwise the
        samples' completions are kept until all finished and come in one output; a ranked
        DELTA request sends an empty one first, when its first token exists (a decode pod's
        stream learns that its remotely computed prompt arrived).
        """
        comp = dataclasses.replace(out.outputs[0], index=index)
        if index == 0 or self._num_cached_tokens is None:
            self._num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None and self._first:
            self._prompt_logprobs = out.prompt_logprobs
        if comp.finish_reason is not None:
            self._finished.add(index)
        if self.ranked or self.kind is OutputKind.FINAL_ONLY:
            kept = self._final.get(index)
            delta = kept is not None and self.kind is OutputKind.DELTA
            self._final[index] = _append(kept, comp) if delta else comp
            if not self.finished:
                if not (self._first and self.kind is OutputKind.DELTA):
                    return None
                comps = [CompletionOutput(index=0, text="", token_ids=[])]
            else:
                comps = self._best() if self.ranked else sorted(self._final.values(), key=_index)
        else:
            comps = [comp]
        prompt_logprobs, self._prompt_logprobs = self._prompt_logprobs, None
        self._first = False
        return dataclasses.replace(
            out,
            request_id=self.request_id,
            outputs=comps,
            finished=self.finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=self._num_cached_tokens,
        )

    def _best(self) -> list[CompletionOutput]:
        """The n completions of highest cumulative logprob, as indices 0..n-1 (ties: lower
        sample index first)."""
        order = sorted(self._final.values(), key=lambda c: (-cumulative_logprob(c), c.index))
        keep = self.params.logprobs is not None
        return [
            dataclasses.replace(c, index=i, logprobs=c.logprobs if keep else None)
            for i, c in enumerate(order[: self.params.n])
        ]


def cumulative_logprob(comp: CompletionOutput) -> float:
    """Sum of the sampled tokens' logprobs (every token of a finished, ranked sample)."""
    return sum(lp.logprob for lp in comp.logprobs or ())


def _append(kept: CompletionOutput, delta: CompletionOutput) -> CompletionOutput:
    """A sample's completion so far followed by its next delta."""
    logprobs = None
    if kept.logprobs is not None or delta.logprobs is not None:
        logprobs = [*(kept.logprobs or ()), *(delta.logprobs or ())]
    return CompletionOutput(
        index=kept.index,
        text=kept.text + delta.text,
        token_ids=[*kept.token_ids, *delta.token_ids],
        finish_reason=delta.finish_reason,
        stop_reason=delta.stop_reason,
        logprobs=logprobs,
    )


def _index(comp: CompletionOutput) -> int:
    return comp.index
