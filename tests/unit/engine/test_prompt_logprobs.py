"""Prompt logprobs (``SamplingParams.prompt_logprobs``) equal Hugging Face's log-softmax at every
prompt position (float32, CPU), through chunked prefill, a prefix cache that already holds the
prompt, preemption and the remote-prefill path; each prompt position is scored exactly once."""

import random

import pytest
import torch

from tandem.api.ids import RequestId
from tandem.api.outputs import OutputKind, TokenLogprob
from tandem.engine import LLM, SamplingParams
from tandem.engine import prompt_logprobs as pl
from tandem.engine.scheduler import ScheduledSequence, SchedulerOutput, _Budget
from tandem.engine.sequence import Sequence

K = 5
PARAMS = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K)


def prompts(vocab: int, lens: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


@pytest.fixture(scope="module")
def ref(llama_dir, hf_reference):
    return hf_reference(llama_dir, 2)


def assert_matches_hf(entries: list[TokenLogprob], prompt: list[int], ref, k: int = K) -> None:
    """One entry per prompt token from the second on: HF's logprob of that token at the position
    before it (1e-4), its rank, and the top-k alternatives."""
    assert entries is not None and len(entries) == len(prompt) - 1
    lsm = torch.log_softmax(ref.logits(prompt).float(), dim=-1)
    for i, e in enumerate(entries):
        row, token = lsm[i], prompt[i + 1]
        want = row[token].item()
        assert e.token_id == token
        assert e.logprob == pytest.approx(want, abs=1e-4), i
        # Rank: 1 + tokens scored higher (a bracket, for near-ties within float noise).
        assert int((row > want + 1e-4).sum()) + 1 <= e.rank <= int((row > want - 1e-4).sum()) + 1
        top_lp, top_ids = row.topk(k)
        assert len(e.top) == k
        assert [v for _, v in e.top] == pytest.approx(top_lp.tolist(), abs=1e-4)
        for t, v in e.top:
            assert row[t].item() == pytest.approx(v, abs=1e-4)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_chunked_prefill_matches_hf(llama_dir, ref, mode):
    # A 16-token budget splits the longer prompts over several steps (and batches them); "on":
    # outputs built during the next step, decode steps launched ahead.
    llm = LLM(
        llama_dir,
        num_kv_blocks=256,
        max_num_batched_tokens=16,
        max_num_seqs=8,
        async_output_processing=mode,
        async_scheduling=mode,
    )
    ps = prompts(llm.engine.model_config.vocab_size, [1, 2, 5, 16, 17, 50, 97], seed=0)
    outs = llm.generate(ps, PARAMS)
    for out, prompt in zip(outs, ps, strict=True):
        assert_matches_hf(out.prompt_logprobs, prompt, ref)
        assert out.outputs[0].token_ids == ref.generate(prompt)


def test_prompt_logprobs_zero_gives_the_token_alone(llama_dir, ref):
    llm = LLM(llama_dir, num_kv_blocks=128)
    prompt = prompts(llm.engine.model_config.vocab_size, [20], seed=1)[0]
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    assert_matches_hf(out.prompt_logprobs, prompt, ref, k=0)
    (plain,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    assert plain.prompt_logprobs is None


def test_a_cached_prompt_is_computed_whole(llama_dir, ref):
    llm = LLM(llama_dir, num_kv_blocks=128, max_num_batched_tokens=24)
    prompt = prompts(llm.engine.model_config.vocab_size, [70], seed=2)[0]
    (first,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))
    (again,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))
    assert again.num_cached_tokens == 64  # the prompt is in the prefix cache
    hits = llm.engine.get_stats().prefix_cache_hits
    (scored,) = llm.generate([prompt], PARAMS)
    assert scored.num_cached_tokens == 0  # the cache was bypassed: every position was run
    assert llm.engine.get_stats().prefix_cache_hits == hits
    assert_matches_hf(scored.prompt_logprobs, prompt, ref)
    assert scored.outputs[0].token_ids == first.outputs[0].token_ids
    # Its blocks still serve the next request.
    (after,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))
    assert after.num_cached_tokens == 64


def test_preempted_mid_prefill_scores_each_position_once(llama_dir, ref):
    engine = LLM(llama_dir, num_kv_blocks=128, max_num_batched_tokens=16).engine
    prompt = prompts(engine.model_config.vocab_size, [60], seed=3)[0]
    engine.add_request("r", prompt, PARAMS, output_kind=OutputKind.FINAL_ONLY)
    engine.step()
    engine.step()  # 32 of 60 positions computed
    seq = engine._states[RequestId("r")].seq
    assert len(seq.prompt_logprobs) == 32 and seq.needs_prompt_logprobs
    engine.scheduler._preempt(seq, _Budget(0), SchedulerOutput())  # as a full pool would
    assert seq.num_computed_tokens == 0 and len(seq.prompt_logprobs) == 32
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    (out,) = outs
    assert seq.num_preemptions == 1
    assert_matches_hf(out.prompt_logprobs, prompt, ref)


def test_plan_scores_only_missing_prompt_positions(llama_dir):
    seq = Sequence(RequestId("s"), list(range(3, 23)), PARAMS, arrival_time=0.0, arrival_index=0)
    seq.prompt_logprobs = [None] * 10  # positions 0-9 scored before a preemption
    chunk = ScheduledSequence(seq, 0, 16, [0, 1], samples=False)
    other = Sequence(RequestId("o"), [5] * 8, SamplingParams(), arrival_time=0.0, arrival_index=1)
    rows = pl.plan([ScheduledSequence(other, 0, 8, [2], True), chunk], [0, 8, 24])
    (row,) = rows
    assert (row.first, row.hidden_start) == (10, 18)
    assert row.targets == seq.token_ids[11:17]
    # The last chunk stops one short of the prompt's end (the last position scores an output).
    seq.prompt_logprobs = [None] * 16
    (row,) = pl.plan([ScheduledSequence(seq, 16, 4, [0, 1], True)], [0, 4])
    assert (row.first, row.targets) == (16, seq.token_ids[17:20])
    # A gap (positions before this chunk never scored) or a sequence with output: nothing.
    seq.prompt_logprobs = [None] * 4
    assert pl.plan([ScheduledSequence(seq, 16, 4, [0, 1], True)], [0, 4]) == []
    seq.prompt_logprobs = []
    seq.token_ids.append(7)
    assert not seq.needs_prompt_logprobs
    assert pl.plan([ScheduledSequence(seq, 0, 20, [0, 1], False)], [0, 20]) == []


def test_migrated_request_does_not_score_its_prompt_again(llama_dir):
    engine = LLM(llama_dir, num_kv_blocks=64).engine
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=K)
    engine.add_request("m", [11, 42, 7, 300, 5, 19], params, num_output_tokens=2)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs and all(o.prompt_logprobs is None for o in outs)


def test_remote_prefill_carries_the_prefill_pods_logprobs(llama_dir):
    engine = LLM(llama_dir, num_kv_blocks=64).engine
    prompt = [11, 42, 7, 300, 5]
    given = [TokenLogprob(t, -1.0 - i, i + 1, ()) for i, t in enumerate(prompt[1:])]
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0)
    engine.reserve_remote_prefill("d", prompt, params)
    (first,) = engine.complete_remote_prefill("d", 9, prompt_logprobs=given)
    assert first.prompt_logprobs == given
    rest = []
    while engine.has_unfinished_requests():
        rest += engine.step()
    assert rest and all(o.prompt_logprobs is None for o in rest)  # once, on the first output
    # Decoding never scored the prompt itself.
    assert engine._states == {}
