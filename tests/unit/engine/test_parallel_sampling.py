"""Parallel sampling (n, best_of): samples share the prompt's blocks, seeds per sample, best_of
ranking, abort, preemption, prefix caching off, remote prefill (tandem/engine/parallel_sampling)."""

import pytest
import torch

from tandem.api.errors import InvalidRequest
from tandem.api.ids import RequestId
from tandem.api.outputs import CompletionOutput, RequestOutput, TokenLogprob
from tandem.engine import LLM, LLMEngine, OutputKind, SamplingParams
from tandem.engine.parallel_sampling import ParentRequest, sample_seed

BLOCK = 16
PROMPT = [10 + (i * 7) % 300 for i in range(5 * BLOCK + 5)]  # 5 full blocks and 5 tokens


def sampled(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "max_tokens": 12, "ignore_eos": True, **kw})


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, num_kv_blocks=128, max_model_len=512)


def assert_clean(engine: LLMEngine):
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    assert not engine.has_unfinished_requests()
    assert engine._states == {} and engine._parents == {}
    assert engine._samples == {} and engine._held_samples == {}


def seqs_of(engine: LLMEngine, rid: str):
    return [engine._states[RequestId(f"{rid}#s{i}")].seq for i in range(3)]


def test_n_samples_share_the_prompts_blocks_and_copy_the_partial_one_on_write(llama_dir):
    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine
    bm = engine.block_manager
    engine.add_request("r", PROMPT, sampled(n=3, seed=1))
    lead, *others = seqs_of(engine, "r")
    engine.step()  # the lead's prefill; the other samples were held back until it is computed
    assert lead.num_output_tokens == 1
    # Then they hold the lead's 6 blocks by reference, its partial last block included.
    tables = [bm.block_ids(s.request_id).tolist() for s in (lead, *others)]
    assert tables[1] == tables[2] == tables[0] and len(tables[0]) == 6
    assert {bm._blocks[b].ref_count for b in tables[0]} == {3}
    assert bm.num_total_blocks - bm.num_free_blocks == 6
    partial = tables[0][5]
    kv = engine.runner.kv_cache.tensor
    before = kv[:, :, partial, :5].clone()
    engine.step()  # each writes into the partial block: the first two copy it first
    assert engine.last_step_num_tokens == 3  # the samples computed the prompt's last token only
    assert all(s.num_cached_tokens == len(PROMPT) - 1 for s in others)
    tables = [bm.block_ids(s.request_id).tolist() for s in (lead, *others)]
    assert all(t[:5] == tables[0][:5] for t in tables)
    assert {bm._blocks[b].ref_count for b in tables[0][:5]} == {3}
    assert len({t[5] for t in tables}) == 3 and partial in {t[5] for t in tables}
    assert bm.num_total_blocks - bm.num_free_blocks == 5 + 3  # not 3 * 6
    for t in tables:  # every copy holds the prompt's KV (its last token recomputed: allclose)
        torch.testing.assert_close(kv[:, :, t[5], :4], before[:, :, :4], rtol=0, atol=0)
        torch.testing.assert_close(kv[:, :, t[5], 4], before[:, :, 4])
    while engine.has_unfinished_requests():
        engine.step()
    assert_clean(engine)


def test_copied_blocks_carry_the_prompt_into_every_sample(llama_dir, llm):
    """Without the copy a sample would attend to an empty partial block: other tokens."""
    params = sampled(n=3, seed=11)
    want = [
        llm.generate([PROMPT], sampled(seed=sample_seed(11, i)))[0].outputs[0].token_ids
        for i in range(3)
    ]
    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine
    engine.add_request("r", PROMPT, params, output_kind=OutputKind.FINAL_ONLY)
    done = []
    while engine.has_unfinished_requests():
        done += engine.step()
    assert [c.token_ids for c in done[-1].outputs] == want
    assert_clean(engine)


def test_a_lead_ended_by_its_first_token_leaves_the_samples_the_prefix_cache(llama_dir, llm):
    params = sampled(n=2, seed=5, max_tokens=1)
    want = [c.token_ids for c in llm.generate([PROMPT], params)[0].outputs]
    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine
    engine.add_request("r", PROMPT, params, output_kind=OutputKind.FINAL_ONLY)
    lead, other = (engine._states[RequestId(f"r#s{i}")].seq for i in range(2))
    engine.step()
    assert lead.is_finished and not engine.block_manager.holds(other.request_id)
    done = []
    while engine.has_unfinished_requests():
        done += engine.step()
    assert other.num_cached_tokens == 5 * BLOCK  # its full blocks from the cache
    assert [c.token_ids for c in done[-1].outputs] == want
    assert_clean(engine)


def test_each_sample_is_a_separate_request_with_the_derived_seed(llm):
    out = llm.generate([PROMPT], sampled(n=3, seed=11))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    samples = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in samples}) == 3  # random samples differ
    for i, tokens in enumerate(samples):
        alone = llm.generate([PROMPT], sampled(seed=11 + i))[0].outputs[0]
        assert alone.token_ids == tokens, i
    assert out.num_cached_tokens == 0 or out.num_cached_tokens % BLOCK == 0
    assert_clean(llm.engine)


def test_sample_seed_wraps_to_64_bits():
    assert sample_seed(None, 3) is None
    assert sample_seed(5, 2) == 7
    assert sample_seed(2**63 - 1, 1) == -(2**63)


def test_best_of_returns_the_n_of_highest_cumulative_logprob(llm):
    params = sampled(n=2, best_of=4, seed=5)
    out = llm.generate([PROMPT], params)[0]
    assert [c.index for c in out.outputs] == [0, 1]
    assert all(c.logprobs is None for c in out.outputs)  # computed to rank, not asked for
    scored = []
    for i in range(4):
        c = llm.generate([PROMPT], sampled(seed=5 + i, logprobs=0))[0].outputs[0]
        scored.append((sum(lp.logprob for lp in c.logprobs), c.token_ids))
    best = sorted(scored, key=lambda s: -s[0])[:2]
    assert [c.token_ids for c in out.outputs] == [t for _, t in best]
    asked = llm.generate([PROMPT], sampled(n=2, best_of=4, seed=5, logprobs=1))[0]
    assert [c.token_ids for c in asked.outputs] == [t for _, t in best]
    assert all(len(c.logprobs) == 12 for c in asked.outputs)


def test_greedy_samples_are_identical(llm):
    out = llm.generate([PROMPT], SamplingParams(temperature=0, n=2, max_tokens=8))[0]
    assert len(out.outputs) == 2 and out.outputs[0].token_ids == out.outputs[1].token_ids
    assert out.outputs[0].text == out.outputs[1].text


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
def test_abort_stops_every_sample_and_frees_every_block(llama_dir, steps):
    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine
    engine.add_request("r", PROMPT, sampled(n=3, max_tokens=40))
    for _ in range(steps):
        engine.step()
    final = engine.abort_request("r")
    assert final is not None and final.finished and final.request_id == "r"
    assert {c.finish_reason for c in final.outputs} == {"abort"}
    assert sorted(c.index for c in final.outputs) == [0, 1, 2]
    assert engine.abort_request("r") is None
    assert_clean(engine)


def test_streamed_outputs_carry_each_samples_index(llama_dir):
    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine
    engine.add_request("r", PROMPT, sampled(n=3, max_tokens=5), output_kind=OutputKind.DELTA)
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    finals = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "r"
            for c in out.outputs:
                tokens[c.index] += c.token_ids
                if c.finish_reason is not None:
                    finals.append(c.index)
            if out.finished:
                assert sorted(finals) == [0, 1, 2]
    assert [len(t) for t in tokens.values()] == [5, 5, 5]
    assert_clean(engine)


def test_preempted_samples_recompute_the_same_tokens(llama_dir, llm):
    params = sampled(n=3, seed=21, max_tokens=40)
    expected = [c.token_ids for c in llm.generate([PROMPT[:40]], params)[0].outputs]
    # 3 samples of up to 80 tokens (5 blocks each, 2 shared) do not fit in 8 blocks.
    small = LLM(llama_dir, num_kv_blocks=8, max_model_len=128)
    out = small.generate([PROMPT[:40]], params)[0]
    assert small.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in out.outputs] == expected
    assert_clean(small.engine)


def test_without_prefix_caching_samples_still_share_the_prompts_blocks(llama_dir, llm):
    params = sampled(n=3, seed=4)
    expected = [c.token_ids for c in llm.generate([PROMPT], params)[0].outputs]
    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512, enable_prefix_caching=False)
    e = engine.engine
    e.add_request("r", PROMPT, params, output_kind=OutputKind.FINAL_ONLY)
    e.step()
    e.step()
    tables = [e.block_manager.block_ids(s.request_id).tolist() for s in seqs_of(e, "r")]
    assert len({b for t in tables for b in t}) == 5 + 3  # the fork needs no cache lookup
    done = []
    while e.has_unfinished_requests():
        done += e.step()
    assert [c.token_ids for c in done[-1].outputs] == expected
    assert_clean(e)


def test_remote_prefill_reserves_the_lead_and_shares_its_blocks(llama_dir):
    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine
    bm = engine.block_manager
    res = engine.reserve_remote_prefill("r", PROMPT, sampled(n=2, max_tokens=4))
    assert res.request_id == "r" and len(res.block_ids) == 6
    assert engine.is_waiting_for_kv("r")
    assert bm.num_total_blocks - bm.num_free_blocks == 6  # the prompt's blocks, once
    outs = engine.complete_remote_prefill("r", 42)
    assert outs[0].outputs[0].token_ids == [42] and outs[0].outputs[0].index == 0
    engine.step()
    lead, other = (engine._states[RequestId(f"r#s{i}")].seq for i in range(2))
    assert bm.block_ids(other.request_id).tolist()[:5] == list(res.block_ids[:5])
    assert other.num_cached_tokens == len(PROMPT) - 1  # it computed the last token only
    assert bm.num_total_blocks - bm.num_free_blocks == 5 + 2
    while engine.has_unfinished_requests():
        engine.step()
    assert_clean(engine)


def test_bad_parallel_requests_are_refused(llama_dir):
    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine
    with pytest.raises(InvalidRequest) as e:
        engine.add_request("m", PROMPT, sampled(n=2), num_output_tokens=3)
    assert e.value.param == "num_output_tokens"
    engine.add_request("x", PROMPT, sampled(n=2))
    for taken in ("x", "x#s1"):  # the request's id and its samples' are in use
        with pytest.raises(InvalidRequest, match="already in use"):
            engine.add_request(taken, PROMPT, sampled())
    engine.abort_request("x")
    assert_clean(engine)


def test_ranked_stream_sends_a_marker_then_the_best_completion():
    parent = ParentRequest("r", SamplingParams(n=1, best_of=2), OutputKind.DELTA)
    assert parent.ranked and parent.sample_params(1).logprobs == 0
    assert parent.sample_params(1).n == 1 and parent.sample_params(1).best_of is None

    def delta(sid, text, token, lp, finish=None):
        comp = CompletionOutput(0, text, [token], finish, None, [TokenLogprob(token, lp, 1, ())])
        return RequestOutput(sid, [1, 2], [comp], finished=finish is not None)

    marker = parent.on_output(0, delta("r#s0", "a", 5, -1.0))
    assert marker.request_id == "r" and not marker.finished
    assert [(c.index, c.token_ids) for c in marker.outputs] == [(0, [])]
    assert parent.on_output(1, delta("r#s1", "b", 6, -0.5, "length")) is None
    final = parent.on_output(0, delta("r#s0", "c", 7, -0.1, "length"))
    assert final.finished and len(final.outputs) == 1
    best = final.outputs[0]  # sample 1: -0.5 beats sample 0's -1.1
    assert (best.index, best.text, best.token_ids, best.logprobs) == (0, "b", [6], None)


def test_a_failed_sample_fails_the_whole_request(llama_dir, monkeypatch):
    from tandem.engine.llm_engine import EngineStepError

    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine
    engine.add_request("r", PROMPT, sampled(n=3, max_tokens=40))
    engine.step()
    engine.step()

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "launch", broken)
    with pytest.raises(EngineStepError) as e:
        engine.step()
    assert e.value.request_ids == ["r"]  # the request's id, once, not its samples'
    assert_clean(engine)


def test_a_failed_block_copy_fails_only_the_steps_requests(llama_dir, monkeypatch):
    """A copy-on-write that fails (device out of memory, ...) fails the step's requests, as a
    failed forward does (not every request of the engine), and the engine goes on."""
    from tandem.engine.llm_engine import EngineStepError

    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine
    engine.add_request("r", PROMPT, sampled(n=3, max_tokens=40))
    engine.step()  # the lead's prefill; the other samples fork its blocks after it
    copy_blocks = engine.runner.copy_blocks

    def broken(copies):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(engine.runner, "copy_blocks", broken)
    with pytest.raises(EngineStepError) as e:
        engine.step()  # the samples' first writes into the shared partial block
    assert e.value.request_ids == ["r"]
    assert_clean(engine)
    monkeypatch.setattr(engine.runner, "copy_blocks", copy_blocks)
    engine.add_request("solo", PROMPT, sampled(n=2, max_tokens=4))
    done = []
    while engine.has_unfinished_requests():
        done += engine.step()
    assert [o.request_id for o in done if o.finished] == ["solo"]
    assert_clean(engine)


def test_prompt_logprobs_come_once_with_the_request_even_when_ranked(llm):
    out = llm.generate([PROMPT], sampled(n=2, best_of=3, prompt_logprobs=0))[0]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(PROMPT) - 1
    alone = llm.generate([PROMPT], sampled(prompt_logprobs=0))[0].prompt_logprobs
    assert [lp.token_id for lp in out.prompt_logprobs] == [lp.token_id for lp in alone]
