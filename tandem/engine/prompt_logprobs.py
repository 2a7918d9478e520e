"""Prompt logprobs: the logprob of every prompt token given the tokens before it, computed
during prefill (vLLM's ``prompt_logprobs``; what ``echo`` + ``logprobs`` and evaluation
harnesses' loglikelihood tasks read).

A prompt chunk's hidden states hold what the model predicts at each of its positions: position
``p``'s logits score token ``p + 1``. For every row of a step that asks (``Sequence.
needs_prompt_logprobs``) the runner hands this module the chunk's hidden states; here they
become logits a slice of rows at a time (``ROWS_PER_SLICE``: memory stays bounded however long
the chunk, a [rows, vocab] float32 block at most), then a log-softmax per row in float32, the
actual next token's logprob and rank, and the top ``k`` alternatives.

Invariants:

- Entry ``i`` of ``Sequence.prompt_logprobs`` is prompt token ``i + 1``'s, so the list is
  complete at ``num_prompt_tokens - 1`` entries (the first token is predicted from nothing).
- Positions below ``len(seq.prompt_logprobs)`` are never computed again: a sequence preempted
  mid-prefill recomputes its prompt, but adds only the entries it lacks (``plan``).
- A sequence that needs them reads nothing from the prefix cache (``Scheduler``): cached
  positions were never run through the model here, so they have no hidden states. That is
  vLLM V1's rule too; the blocks it computes are still cached for later requests.
"""

from dataclasses import dataclass

import torch

from tandem.api.outputs import TokenLogprob
from tandem.engine.scheduler import ScheduledSequence
from tandem.engine.sequence import Sequence

ROWS_PER_SLICE = 256
"""Prompt positions turned into logits at once (bounds the [rows, vocab] float32 blocks)."""


@dataclass(slots=True, frozen=True)
class PromptLogprobsRow:
    """One sequence's prompt positions in a step whose logprobs are computed."""

    seq: Sequence
    first: int
    """The first entry of ``seq.prompt_logprobs`` these fill (position ``first`` scores prompt
    token ``first + 1``)."""
    hidden_start: int
    """Row of the step's flat hidden states that holds position ``first``."""
    targets: list[int]
    """The prompt tokens scored, one per position: ``token_ids[first + 1 : ...]``."""


def plan(order: list[ScheduledSequence], query_start_loc: list[int]) -> list[PromptLogprobsRow]:
    """The prompt positions of a step (sequences in batch ``order``, their tokens starting at
    ``query_start_loc``) whose logprobs are due: for each sequence that needs them, its chunk's
    positions from the first entry it lacks up to the last prompt token but one."""
    rows = []
    for i, s in enumerate(order):
        seq = s.seq
        if seq.prompt_logprobs is None or not seq.needs_prompt_logprobs:
            continue
        done = len(seq.prompt_logprobs)
        lo = max(s.start, done)
        hi = min(s.start + s.num_new_tokens, seq.num_prompt_tokens - 1)
        # lo > done would leave a gap (positions never computed): the scheduler's prefix-cache
        # bypass rules it out, so such a chunk has nothing to add here.
        if lo >= hi or lo != done:
            continue
        rows.append(
            PromptLogprobsRow(
                seq, lo, query_start_loc[i] + lo - s.start, seq.token_ids[lo + 1 : hi + 1]
            )
        )
    return rows


def compute(
    hidden: torch.Tensor, rows: list[PromptLogprobsRow], compute_logits
) -> list[tuple[PromptLogprobsRow, list[TokenLogprob]]]:
    """Each row's entries: the target token's logprob and rank, and the top ``k`` alternatives
    (``k`` = the request's ``prompt_logprobs``), from float32 log-softmax of the logits.

    Args:
        hidden: the step's flat hidden states.
        compute_logits: the model's hidden-states -> logits head.
    """
    out = []
    for row in rows:
        k = row.seq.sampling_params.prompt_logprobs or 0
        entries: list[TokenLogprob] = []
        for a, (start, stop) in _row_slices(row):
            logits = compute_logits(hidden[start:stop])
            entries += _entries(logits, row.targets[a : a + stop - start], k)
        out.append((row, entries))
    return out


def slices(rows: list[PromptLogprobsRow]) -> list[tuple[int, int]]:
    """The hidden-state rows ``[start, stop)`` whose logits ``compute`` asks for, in its order
    (the other ranks of a tensor-parallel engine compute their part of the same logits)."""
    return [bounds for row in rows for _, bounds in _row_slices(row)]


def _row_slices(row: PromptLogprobsRow):
    """(first target, hidden rows [start, stop)) of each slice of at most ``ROWS_PER_SLICE``."""
    for a in range(0, len(row.targets), ROWS_PER_SLICE):
        start = row.hidden_start + a
        yield a, (start, start + min(ROWS_PER_SLICE, len(row.targets) - a))


def _entries(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    logprobs = logits.float().log_softmax(dim=-1)
    ids = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, ids[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], ids[:, None][:, :0])
    chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    return [
        TokenLogprob(t, chosen_l[i], ranks_l[i], tuple(zip(top_ids_l[i], top_lp_l[i], strict=True)))
        for i, t in enumerate(targets)
    ]


def apply(computed: list[tuple[PromptLogprobsRow, list[TokenLogprob]]]) -> None:
    """Append a finished step's entries to their sequences (the engine, after the step).

    A sequence aborted meanwhile, or whose list moved on, takes nothing: entries are added in
    position order exactly once."""
    for row, entries in computed:
        seq = row.seq
        if seq.is_finished or seq.prompt_logprobs is None:
            continue
        if len(seq.prompt_logprobs) == row.first:
            seq.prompt_logprobs.extend(entries)
