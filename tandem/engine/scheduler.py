"""Scheduler: iteration-level (continuous) batching under a per-step token budget.

Every step it decides how many tokens each sequence computes: one for a decoding sequence, a
chunk of the prompt for a prefilling one (chunked prefill: a prompt longer than the remaining
budget spans several steps). The step policy decides who is served first: running sequences
(``decode-first``, as vLLM) or waiting prompts (``prefill-first``). Waiting sequences are admitted
in the scheduling policy's order, reusing cached prefix blocks.

When a running sequence needs a block and none is free, the worst sequence by policy order
(lowest priority, then latest arrival) that holds blocks is preempted by recompute: its blocks
are freed and it goes back to the waiting queue, to be prefilled again later (mostly from the
prefix cache). Memory never runs out; a request that could never fit is refused at admission by
the engine.

Invariant (liveness): every block is held by a sequence that will release it on its own (a
running one, which finishes or preempts itself) or that can be preempted (a waiting sequence
holding blocks: remote-prefilled, queued for decode), except blocks reserved for a prompt's KV in
flight (``waiting_for_kv``), which the transfer completes or aborts. So a queue whose head cannot
be admitted while nothing runs releases the blocks of the worst waiting holders until it can:
otherwise nothing would ever free them (pinned by tests/unit/engine/test_remote_admission.py).
"""

import logging
from dataclasses import dataclass, field

import numpy as np

from tandem.api.hashing import BlockHasher
from tandem.api.ids import BlockId, RequestId
from tandem.engine.block_manager import BlockManager
from tandem.engine.config import SchedulerConfig
from tandem.engine.scheduling_policy import WaitingQueue, get_scheduling_policy
from tandem.engine.sequence import Sequence, SequenceStatus
from tandem.engine.stopping import token_stop_status

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step: tokens ``[start, start + num_new_tokens)``."""

    seq: Sequence
    start: int
    num_new_tokens: int
    block_ids: np.ndarray | list[BlockId]
    """The sequence's block table (the block manager's read-only snapshot; lists in
    tests/benchmarks)."""
    samples: bool
    """This step computes the sequence's last token, so a new token is sampled."""
    ahead: int = 0
    """Tokens already sampled for the sequence by a step still in flight and not appended to it
    yet (async scheduling: 1 for a step scheduled before the previous one's tokens were read)."""


@dataclass(slots=True)
class SchedulerOutput:
    """One step's batch (what runs) and the sequences preempted to make room for it."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[RequestId] = field(default_factory=list)
    block_copies: list[tuple[BlockId, BlockId]] = field(default_factory=list)
    """Copy-on-write: (source, destination) blocks the runner copies before the forward."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class _Budget:
    __slots__ = ("tokens",)

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens


class Scheduler:
    """Owns the waiting queue and the running batch; the block manager owns the memory."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        hasher: BlockHasher | None,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self._hasher = hasher if config.enable_prefix_caching else None
        self._eos = frozenset(eos_token_ids)
        self.policy = get_scheduling_policy(config.scheduling_policy)
        self.waiting = WaitingQueue(self.policy)
        self.running: list[Sequence] = []
        self.waiting_for_kv: dict[RequestId, Sequence] = {}
        """Sequences holding reserved blocks while their prompt's KV arrives (decode role)."""
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a validated sequence (the engine checks that it can ever fit)."""
        self.waiting.push(seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End a sequence (stop string, abort, ...) and free its blocks. Idempotent."""
        assert status.is_finished
        if seq.is_finished:
            return
        if seq.request_id in self.waiting:
            self.waiting.remove(seq.request_id)
        elif self.waiting_for_kv.pop(seq.request_id, None) is None and seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq.request_id)
        seq.status = status

    @property
    def has_unfinished(self) -> bool:
        """Whether a step has work; sequences waiting for remote KV need no step."""
        return bool(self.running) or len(self.waiting) > 0

    @property
    def num_queued_prefill_tokens(self) -> int:
        """Prompt tokens admitted or waiting but not computed yet (a prefill pod's load)."""
        queued = sum(s.num_uncomputed_tokens for s in self.waiting.unordered())
        return queued + sum(
            s.num_prompt_tokens - s.num_computed_tokens
            for s in self.running
            if s.num_computed_tokens < s.num_prompt_tokens
        )

    # ---- remote prefill (decode role) -------------------------------------------------------

    def reserve(self, seq: Sequence, *, keep_free: int) -> bool:
        """Hold blocks for ``seq``'s whole prompt now, reusing this engine's own cached prefix.

        The caller pushes the remaining KV into ``block_manager.block_ids(seq)`` and then calls
        ``complete_remote_prefill``. Returns False, holding nothing, if the pool is too full.
        """
        if self._hasher is not None:
            self._hasher.extend(seq.block_hashes, seq.token_ids, seq.cache_salt)
        prefix = self.block_manager.find_cached_prefix(seq.block_hashes, seq.num_tokens)
        if not self.block_manager.allocate(
            seq.request_id, seq.num_tokens, prefix, keep_free=keep_free, record_stats=True
        ):
            return False
        seq.num_computed_tokens = prefix.num_tokens
        seq.status = SequenceStatus.WAITING_FOR_KV
        self.waiting_for_kv[seq.request_id] = seq
        return True

    def complete_remote_prefill(self, seq: Sequence, first_token: int) -> None:
        """The prompt's KV is in place and its first token sampled remotely: queue for decode."""
        del self.waiting_for_kv[seq.request_id]
        seq.num_computed_tokens = seq.num_tokens  # a migrated request's output so far included
        seq.token_ids.append(first_token)
        if self._hasher is not None:
            self._hasher.extend(seq.block_hashes, seq.token_ids, seq.cache_salt)
            self.block_manager.cache_full_blocks(
                seq.request_id, seq.block_hashes, seq.num_computed_tokens
            )
        status = token_stop_status(seq, self._eos, self.config.max_model_len)
        if status is not None:  # the first token already ends it (EOS, max_tokens=1, ...)
            self.block_manager.free(seq.request_id)
            seq.status = status
            return
        seq.status = SequenceStatus.WAITING
        self.waiting.push(seq)

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose this step's batch, admitting and preempting sequences as needed."""
        budget = _Budget(self.config.max_num_batched_tokens)
        out = SchedulerOutput()
        if self.config.step_policy == "decode-first":
            self._schedule_running(budget, out)
            # A step that had to preempt admits nothing new: the victims would come straight
            # back into the blocks they just released (thrash), as vLLM also avoids.
            if not out.preempted:
                self._schedule_waiting(budget, out, keep_free=0)
        else:
            # Admissions leave one block per running sequence, so that the decodes scheduled
            # after them can grow without preempting what was just admitted.
            self._schedule_waiting(budget, out, keep_free=self.num_growing)
            self._schedule_running(budget, out)
        out.block_copies = self.block_manager.take_copies()
        return out

    @property
    def num_growing(self) -> int:
        """Sequences that hold blocks and may need one more soon (admission headroom): running
        ones, waiting ones that hold blocks, and reservations whose prompt fills its last block,
        which need one as soon as their KV lands (their first token starts a new block). Other
        reservations need none before they decode; were they counted, a burst would be refused
        a quarter of the pool for 3-block prompts. Headroom only spares preemptions: liveness
        comes from preempting waiting holders (``_schedule_waiting``)."""
        bs = self.block_manager.block_size
        landing = sum(1 for s in self.waiting_for_kv.values() if s.num_tokens % bs == 0)
        return len(self.running) + self.num_held_waiting + landing

    @property
    def num_held_waiting(self) -> int:
        """Waiting sequences that already hold blocks (remote-prefilled, queued for decode)."""
        return sum(1 for s in self.waiting.unordered() if self.block_manager.holds(s.request_id))

    @property
    def reservation_headroom(self) -> int:
        """Blocks a new reservation must leave free: one per growing sequence, plus what the
        waiting queue's head needs if it holds none (a preempted sequence). Reservations bypass
        the queue, so without the latter a stream of them could take every freed block from a
        sequence waiting to be readmitted, forever."""
        head = self.waiting.peek()
        need = 0
        if head is not None and not self.block_manager.holds(head.request_id):
            need = self.block_manager.blocks_needed(head.num_tokens)
        return self.num_growing + need

    def _schedule_running(self, budget: _Budget, out: SchedulerOutput) -> None:
        scheduled = {s.seq.request_id for s in out.scheduled}
        for seq in list(self.running):
            if budget.tokens == 0:
                break
            if seq.status != SequenceStatus.RUNNING or seq.request_id in scheduled:
                continue  # preempted earlier in this loop, or admitted in this step already
            num_new = min(seq.num_uncomputed_tokens, budget.tokens)
            while not self.block_manager.allocate(
                seq.request_id,
                seq.num_computed_tokens + num_new,
                write_from=seq.num_computed_tokens,
            ):
                victim = max([*self.running, *self._held_waiting()], key=self.policy.sort_key)
                self._preempt(victim, budget, out)
                if victim is seq:
                    break
            else:
                self._add_scheduled(seq, num_new, budget, out)

    def _schedule_waiting(self, budget: _Budget, out: SchedulerOutput, *, keep_free: int) -> None:
        while budget.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.peek()
            if seq is None:
                break
            num_new = self._allocate_waiting(seq, budget, keep_free)
            # With nothing running, no step frees a block: the worse sequences waiting with
            # blocks give theirs up (recompute later), or the head waits forever.
            while num_new is None and not self.running:
                victim = max(
                    (s for s in self._held_waiting() if s is not seq),
                    key=self.policy.sort_key,
                    default=None,
                )
                if victim is None:
                    break  # the rest is reserved for KV in flight: its transfer ends that
                self._preempt(victim, budget, out)
                keep_free = max(0, keep_free - 1)  # the victim no longer grows
                num_new = self._allocate_waiting(seq, budget, keep_free)
            if num_new is None:
                break  # head-of-line: later sequences wait too, so order is kept
            self.waiting.pop()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_scheduled(seq, num_new, budget, out)

    def _allocate_waiting(self, seq: Sequence, budget: _Budget, keep_free: int) -> int | None:
        """Give the queue's head the blocks for its next tokens; their number, or None (nothing
        taken) if they do not fit."""
        bm = self.block_manager
        if bm.holds(seq.request_id):
            # Its prompt's KV came from a prefill pod: the blocks are held, only decode is left.
            num_new = min(seq.num_uncomputed_tokens, budget.tokens)
            if not bm.allocate(
                seq.request_id,
                seq.num_computed_tokens + num_new,
                write_from=seq.num_computed_tokens,
            ):
                return None
            return num_new
        if self._hasher is not None:
            self._hasher.extend(seq.block_hashes, seq.token_ids, seq.cache_salt)
        # A sequence that wants prompt logprobs reads nothing from the prefix cache: cached
        # positions have no hidden states to score (as vLLM V1). Its blocks are still cached.
        hashes = () if seq.needs_prompt_logprobs else seq.block_hashes
        prefix = bm.find_cached_prefix(hashes, seq.num_tokens)
        num_new = min(seq.num_tokens - prefix.num_tokens, budget.tokens)
        first_admission = seq.num_cached_tokens is None
        if not bm.allocate(
            seq.request_id,
            prefix.num_tokens + num_new,
            prefix,
            keep_free=keep_free,
            record_stats=first_admission,
        ):
            return None
        seq.num_computed_tokens = prefix.num_tokens
        if first_admission:
            seq.num_cached_tokens = prefix.num_tokens
        return num_new

    def _held_waiting(self) -> list[Sequence]:
        """Waiting sequences that hold blocks: preemptible like running ones."""
        return [s for s in self.waiting.unordered() if self.block_manager.holds(s.request_id)]

    def _add_scheduled(
        self, seq: Sequence, num_new: int, budget: _Budget, out: SchedulerOutput
    ) -> None:
        block_ids = self.block_manager.block_ids(seq.request_id)
        start = seq.num_computed_tokens
        samples = start + num_new == seq.num_tokens
        out.scheduled.append(ScheduledSequence(seq, start, num_new, block_ids, samples))
        budget.tokens -= num_new

    def _preempt(self, victim: Sequence, budget: _Budget, out: SchedulerOutput) -> None:
        """Free the victim's blocks; it is recomputed from the waiting queue later. A victim is
        running, or waiting with blocks (already queued: it keeps its place)."""
        requeue = victim.status == SequenceStatus.RUNNING
        if requeue:
            self.running.remove(victim)
            for i, s in enumerate(out.scheduled):
                if s.seq is victim:
                    budget.tokens += s.num_new_tokens
                    del out.scheduled[i]
                    break
        self.block_manager.free(victim.request_id)
        victim.status = SequenceStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        if requeue:
            self.waiting.push(victim)
        out.preempted.append(victim.request_id)
        logger.debug("preempted %s (recompute later)", victim.request_id)

    def schedule_next_decode(
        self, prev: SchedulerOutput
    ) -> tuple[SchedulerOutput, list[int]] | None:
        """The step after ``prev``, scheduled before ``prev``'s tokens are known (async scheduling).

        Only the steady state qualifies: ``prev`` decoded every running sequence (one token each)
        and nothing waits, so the next step is the same sequences one position further. A
        sequence that ``prev``'s token ends by length is left out; one that an EOS, stop token
        or stop string ends is computed once more and its token dropped (``update`` skips
        finished sequences). Rows with penalties need the full output history, so they stop
        it, and so do rows with a grammar (``structured_outputs``): their next mask needs the
        pending token consumed by their matcher first, so while one runs, steps are synchronous.
        Nothing is preempted and no shared block is copied (``BlockManager.fork``): if a block
        cannot be had, or one would have to be copied first, there is no such step (None).

        Returns the step and, for each of its sequences, the row of ``prev`` whose sampled
        token is its input.
        """
        # Sequences finished since ``prev`` was scheduled drop out; nothing joins ``running``
        # while a step is in flight, so anyone else running means ``prev`` did not cover the batch.
        live = sum(1 for s in prev.scheduled if s.seq.status == SequenceStatus.RUNNING)
        if len(self.waiting) or not prev.scheduled or len(self.running) != live:
            return None
        out, rows = SchedulerOutput(), []
        for i, s in enumerate(prev.scheduled):
            seq, params = s.seq, s.seq.sampling_params
            if (
                s.num_new_tokens != 1
                or not s.samples
                or params.has_penalties
                or params.structured_outputs is not None
            ):
                return None
            if seq.status != SequenceStatus.RUNNING or seq.num_computed_tokens != s.start:
                continue  # aborted since (or not the pending step)
            if (
                seq.num_output_tokens + 1 >= params.max_tokens
                or seq.num_tokens + 1 >= self.config.max_model_len
            ):
                continue  # the pending token is its last
            if self.block_manager.would_copy(seq.request_id, s.start + 1):
                return None  # copies run only in steps scheduled once the tokens are known
            if not self.block_manager.allocate(seq.request_id, s.start + 2):
                return None
            block_ids = self.block_manager.block_ids(seq.request_id)
            out.scheduled.append(ScheduledSequence(seq, s.start + 1, 1, block_ids, True, ahead=1))
            rows.append(i)
        return (out, rows) if out.scheduled else None

    # ---- after the forward ------------------------------------------------------------------

    def update(self, out: SchedulerOutput, sampled: dict[RequestId, int]) -> list[Sequence]:
        """Advance the scheduled sequences by their computed tokens and append sampled tokens.

        Returns the sequences that received a token, finished ones included (their blocks are
        already freed).
        """
        progressed = []
        bs = self.block_manager.block_size
        for s in out.scheduled:
            seq = s.seq
            if seq.is_finished:
                continue  # aborted while the step ran
            seq.num_computed_tokens += s.num_new_tokens
            token = sampled.get(seq.request_id)
            if token is not None:
                seq.token_ids.append(token)
            # A one-token step fills a block only when a count reaches a block boundary; other
            # steps have nothing new to hash or cache (the common decode step skips both calls).
            boundary = (
                s.num_new_tokens > 1
                or seq.num_computed_tokens % bs == 0
                or len(seq.token_ids) % bs == 0
            )
            if self._hasher is not None and boundary:
                self._hasher.extend(seq.block_hashes, seq.token_ids, seq.cache_salt)
                self.block_manager.cache_full_blocks(
                    seq.request_id, seq.block_hashes, seq.num_computed_tokens
                )
            if token is None:
                continue
            progressed.append(seq)
            status = token_stop_status(seq, self._eos, self.config.max_model_len)
            if status is not None:
                self.finish(seq, status)
        return progressed
