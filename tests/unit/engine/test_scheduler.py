"""Scheduler: chunked prefill, step policies, queue policies, preemption, exact batches."""

import pytest

from tandem.api.hashing import BlockHasher
from tandem.api.ids import RequestId
from tandem.api.sampling_params import SamplingParams
from tandem.engine.block_manager import BlockManager
from tandem.engine.config import SchedulerConfig
from tandem.engine.scheduler import Scheduler
from tandem.engine.scheduling_policy import get_scheduling_policy, register_scheduling_policy
from tandem.engine.sequence import Sequence, SequenceStatus

BS = 4
EOS = 0


def make_scheduler(
    *, blocks=64, budget=64, max_seqs=8, policy="fcfs", step="decode-first", caching=True
):
    cfg = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_model_len=1024,
        enable_prefix_caching=caching,
        scheduling_policy=policy,
        step_policy=step,
    )
    bm = BlockManager(blocks, BS, enable_prefix_caching=caching)
    return Scheduler(cfg, bm, BlockHasher("m", BS), (EOS,))


_count = iter(range(10**6))


def seq(rid, n_prompt, *, max_tokens=4, priority=0, base=1):
    i = next(_count)
    return Sequence(
        RequestId(rid),
        [base + (j % 50) for j in range(n_prompt)],
        SamplingParams(max_tokens=max_tokens, temperature=0),
        arrival_time=float(i),
        arrival_index=i,
        priority=priority,
    )


def step(sched, token=7):
    """One schedule + update; every sampling sequence gets ``token``. Returns {id: new tokens}."""
    out = sched.schedule()
    sampled = {s.seq.request_id: token for s in out.scheduled if s.samples}
    sched.update(out, sampled)
    return {s.seq.request_id: s.num_new_tokens for s in out.scheduled}, out


def test_chunked_prefill_spans_steps():
    sched = make_scheduler(budget=8)
    s = seq("a", 20)
    sched.add(s)
    assert step(sched)[0] == {"a": 8}
    assert s.num_computed_tokens == 8 and s.num_output_tokens == 0
    assert step(sched)[0] == {"a": 8}
    batch, out = step(sched)
    assert batch == {"a": 4} and out.scheduled[0].samples
    assert s.num_output_tokens == 1 and s.num_computed_tokens == 20
    assert step(sched)[0] == {"a": 1}  # decode


def test_decode_first_serves_running_before_waiting():
    sched = make_scheduler(budget=4)
    a = seq("a", 3)
    sched.add(a)
    step(sched)  # a prefilled, now decoding
    sched.add(seq("b", 10))
    batch, out = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["a", "b"]
    assert batch == {"a": 1, "b": 3}


def test_prefill_first_serves_waiting_before_running():
    sched = make_scheduler(budget=4, step="prefill-first")
    a = seq("a", 3)
    sched.add(a)
    step(sched)
    sched.add(seq("b", 10))
    batch, out = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["b"]
    assert batch == {"b": 4}
    # b's continuing chunk is a running sequence now, so a shares the budget in arrival order.
    batch, out = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["a", "b"]
    assert batch == {"a": 1, "b": 3}


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(max_seqs=2)
    for r in "abc":
        sched.add(seq(r, 4))
    batch, _ = step(sched)
    assert set(batch) == {"a", "b"}
    assert len(sched.waiting) == 1


@pytest.mark.parametrize(
    "policy, expected",
    [("fcfs", ["p2", "p0", "p1"]), ("priority", ["p0", "p1", "p2"])],
)
def test_queue_policy_orders_admission(policy, expected):
    sched = make_scheduler(max_seqs=1, policy=policy)
    for name, prio in (("p2", 2), ("p0", 0), ("p1", 1)):
        sched.add(seq(name, 4, max_tokens=1, priority=prio))
    admitted = []
    while sched.has_unfinished:
        batch, _ = step(sched)
        admitted += [r for r in batch if r not in admitted]
    assert admitted == expected


def test_shortest_prompt_first_policy():
    sched = make_scheduler(max_seqs=1, policy="shortest-prompt-first")
    for name, n in (("long", 12), ("short", 3), ("mid", 6)):
        sched.add(seq(name, n, max_tokens=1))
    admitted = []
    while sched.has_unfinished:
        batch, _ = step(sched)
        admitted += [r for r in batch if r not in admitted]
    assert admitted == ["short", "mid", "long"]


def test_custom_registered_policy_takes_effect(clean_registry):
    class LongestPromptFirst:
        name = "test-longest-prompt-first"

        def sort_key(self, s):
            return (-s.num_prompt_tokens, s.arrival_index)

    register_scheduling_policy(LongestPromptFirst())
    assert get_scheduling_policy("test-longest-prompt-first").name == "test-longest-prompt-first"
    sched = make_scheduler(max_seqs=1, policy="test-longest-prompt-first")
    for name, n in (("short", 3), ("long", 12), ("mid", 6)):
        sched.add(seq(name, n, max_tokens=1))
    admitted = []
    while sched.has_unfinished:
        batch, _ = step(sched)
        admitted += [r for r in batch if r not in admitted]
    assert admitted == ["long", "mid", "short"]


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scheduling policy 'nope'"):
        get_scheduling_policy("nope")
    with pytest.raises(TypeError):
        register_scheduling_policy(object())


def test_preemption_picks_latest_arrival_and_requeues_it():
    # 4 blocks of 4 tokens. a and b each hold 2 blocks after prefill of 8 tokens;
    # a's first decode needs a 3rd block: b (latest arrival) is preempted.
    sched = make_scheduler(blocks=4, max_seqs=4, caching=False)
    a, b = seq("a", 8, max_tokens=8), seq("b", 8, max_tokens=8, base=60)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.block_manager.num_free_blocks == 0
    batch, out = step(sched)
    assert batch == {"a": 1}
    assert out.preempted == ["b"]
    assert b.status == SequenceStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert not sched.block_manager.holds(RequestId("b"))
    # b's blocks were freed tail-first (3, then 2), so a's new block is 3.
    assert sched.block_manager.block_ids(RequestId("a")).tolist() == [0, 1, 3]
    assert "b" in sched.waiting
    # b's recompute covers its prompt and its first output token.
    while not a.is_finished:
        step(sched)
    batch, _ = step(sched)
    assert batch == {"b": 9}


def test_preemption_victim_is_lowest_priority():
    sched = make_scheduler(blocks=6, max_seqs=4, policy="priority", caching=False)
    hi, lo, mid = (
        seq("hi", 8, priority=0),
        seq("lo", 4, priority=5, base=20),
        seq("mid", 8, priority=1, base=40),
    )
    for s in (hi, lo, mid):
        sched.add(s)
    step(sched)  # hi: 2 blocks, lo: 1, mid: 2 (+1 free)
    assert sched.block_manager.num_free_blocks == 1
    batch, out = step(sched)  # hi takes the free block; mid needs one: lo (priority 5) goes
    assert out.preempted == ["lo"]
    assert batch == {"hi": 1, "mid": 1}


def test_running_sequence_preempts_itself_when_it_is_the_worst():
    sched = make_scheduler(blocks=4, max_seqs=4, caching=False)
    a, b = seq("a", 8, max_tokens=8), seq("b", 8, max_tokens=8, base=60)
    sched.add(a)
    sched.add(b)
    step(sched)
    # Put b first in the running list so that it asks for a block before a does.
    sched.running.reverse()
    batch, out = step(sched)
    assert out.preempted == ["b"] and batch == {"a": 1}


def test_prefix_cache_hit_on_admission_sets_cached_tokens():
    sched = make_scheduler()
    a = seq("a", 10, max_tokens=1)
    sched.add(a)
    step(sched)
    assert a.is_finished and a.num_cached_tokens == 0
    b = seq("b", 10, max_tokens=1)
    sched.add(b)
    batch, _ = step(sched)
    assert b.num_cached_tokens == 8 and batch == {"b": 2}


def test_finish_frees_blocks_from_any_state():
    sched = make_scheduler(budget=4)
    a, b = seq("a", 10), seq("b", 10)
    sched.add(a)
    sched.add(b)
    step(sched)  # a: chunk of 4, b waiting
    sched.finish(a, SequenceStatus.FINISHED_ABORTED)
    sched.finish(b, SequenceStatus.FINISHED_ABORTED)
    sched.finish(b, SequenceStatus.FINISHED_ABORTED)  # idempotent
    assert not sched.has_unfinished
    assert sched.block_manager.num_free_blocks == 64


def test_stop_rules_eos_stop_tokens_and_length():
    sched = make_scheduler()
    s = seq("a", 4, max_tokens=5)
    sched.add(s)
    step(sched, token=EOS)
    assert s.status == SequenceStatus.FINISHED_STOPPED
    s2 = Sequence(
        RequestId("b"),
        [1, 2, 3],
        SamplingParams(max_tokens=5, stop_token_ids=[9], min_tokens=2),
        arrival_time=0.0,
        arrival_index=10**7,
    )
    sched.add(s2)
    step(sched, token=9)
    assert not s2.is_finished  # min_tokens holds it
    step(sched, token=9)
    assert s2.status == SequenceStatus.FINISHED_STOPPED and s2.stop_reason == 9
    s3 = Sequence(
        RequestId("c"),
        [1, 2, 3],
        SamplingParams(max_tokens=2, ignore_eos=True),
        arrival_time=0.0,
        arrival_index=10**7 + 1,
    )
    sched.add(s3)
    step(sched, token=EOS)
    step(sched, token=EOS)
    assert s3.status == SequenceStatus.FINISHED_LENGTH and s3.output_token_ids == [EOS, EOS]


def test_a_preempting_step_admits_nothing():
    """The victim must not come straight back into the blocks it just released."""
    sched = make_scheduler(blocks=10, budget=8, max_seqs=4, caching=False)
    a = seq("a", 20, max_tokens=16)
    sched.add(a)
    while a.num_computed_tokens < 20:
        step(sched)
    x = seq("x", 24, max_tokens=4, base=60)
    sched.add(x)
    preempting_steps = 0
    while not a.is_finished:
        batch, out = step(sched)
        if out.preempted:
            preempting_steps += 1
            assert not set(out.preempted) & set(batch), "a victim was scheduled in its own step"
            assert set(batch) == {"a"}
    assert preempting_steps > 0
    while sched.has_unfinished:
        step(sched)
    assert x.is_finished and sched.block_manager.num_free_blocks == 10


def test_prefill_first_leaves_headroom_for_running_sequences():
    """A waiting prompt is not admitted only to be preempted by a decode in the same step."""
    sched = make_scheduler(blocks=4, max_seqs=4, step="prefill-first")
    a = seq("a", 8, max_tokens=12)
    sched.add(a)
    step(sched)
    x = seq("x", 8, max_tokens=2, base=60)
    sched.add(x)
    for _ in range(4):
        batch, out = step(sched)
        assert batch == {"a": 1} and out.preempted == []
    assert x.num_preemptions == 0
    assert sched.block_manager.stats.queries == 8  # x was never admitted, so never counted


def test_prefix_stats_count_each_request_once():
    sched = make_scheduler(blocks=4, max_seqs=4)
    a, b = seq("a", 8, max_tokens=8), seq("b", 8, max_tokens=8, base=60)
    sched.add(a)
    sched.add(b)
    while sched.has_unfinished:
        step(sched)
    assert b.num_preemptions > 0
    assert sched.block_manager.stats.queries == 16  # re-admissions are not counted again
