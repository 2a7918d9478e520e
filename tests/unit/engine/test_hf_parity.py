"""Greedy outputs and logits match Hugging Face transformers on the same weights (float32, CPU)."""

import random

import pytest
import torch

from tandem.api.ids import RequestId
from tandem.engine import LLM, SamplingParams
from tandem.engine.scheduler import ScheduledSequence
from tandem.engine.sequence import Sequence

ARCHS = ["llama", "llama-tied-rope3", "mistral-swa", "qwen2", "qwen3"]
MAX_NEW = 24
PROMPT_LENS = [1, 5, 16, 17, 33, 50, 64, 97, 130]


def random_prompts(vocab: int, lens: list[int], seed: int = 0, prefix: list[int] | None = None):
    rng = random.Random(seed)
    # Ids from 3 up: 0-2 are the special tokens of generated models.
    return [(prefix or []) + [rng.randrange(3, vocab) for _ in range(n)] for n in lens]


@pytest.fixture(scope="module")
def hf_refs(tiny_model, hf_reference):
    refs = {}

    def get(name):
        if name not in refs:
            refs[name] = hf_reference(tiny_model(name), MAX_NEW)
        return refs[name]

    return get


def assert_same_as_hf(outputs, prompts, ref):
    assert len(outputs) == len(prompts)
    for out, prompt in zip(outputs, prompts, strict=True):
        assert out.prompt_token_ids == prompt
        expected = ref.generate(prompt)
        assert out.outputs[0].token_ids == expected, f"prompt of {len(prompt)} tokens diverged"
        reason = "length" if len(expected) == MAX_NEW and expected[-1] not in (0, 2) else "stop"
        assert out.outputs[0].finish_reason == reason


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_settings(arch, tiny_model, hf_refs):
    llm = LLM(tiny_model(arch), num_kv_blocks=512)
    prompts = random_prompts(llm.engine.model_config.vocab_size, PROMPT_LENS)
    assert_same_as_hf(llm.generate(prompts, GREEDY), prompts, hf_refs(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill(arch, tiny_model, hf_refs):
    # A 20-token budget splits every prompt over 16 tokens across several steps.
    llm = LLM(tiny_model(arch), num_kv_blocks=512, max_num_batched_tokens=20, max_num_seqs=16)
    prompts = random_prompts(llm.engine.model_config.vocab_size, PROMPT_LENS, seed=1)
    assert_same_as_hf(llm.generate(prompts, GREEDY), prompts, hf_refs(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_hits(arch, tiny_model, hf_refs):
    llm = LLM(tiny_model(arch), num_kv_blocks=512, max_num_seqs=3)
    vocab = llm.engine.model_config.vocab_size
    shared = random_prompts(vocab, [70], seed=2)[0]
    prompts = random_prompts(vocab, [3, 9, 16, 20, 31, 40, 1, 12], seed=3, prefix=shared)
    outs = llm.generate(prompts, GREEDY)
    assert_same_as_hf(outs, prompts, hf_refs(arch))
    # max_num_seqs=3 admits later prompts after earlier ones cached the shared 64 tokens.
    cached = [o.num_cached_tokens for o in outs]
    assert cached[:3] == [0, 0, 0]
    assert all(c == 64 for c in cached[3:]), cached
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hits == sum(cached)
    # A second call hits from the start.
    again = llm.generate(prompts[:2], GREEDY)
    assert [o.num_cached_tokens for o in again] == [64, 64]
    assert_same_as_hf(again, prompts[:2], hf_refs(arch))


@pytest.mark.parametrize("arch, block_size", [("llama-tied-rope3", 8), ("mistral-swa", 32)])
def test_other_block_size_with_chunked_prefill_and_prefix_hits(
    arch, block_size, tiny_model, hf_refs, monkeypatch
):
    """Block sizes other than 16 end to end: chunked prefill, prefix hits, HF's tokens."""
    llm = LLM(
        tiny_model(arch),
        block_size=block_size,
        num_kv_blocks=4096 // block_size,
        max_num_batched_tokens=20,
        max_num_seqs=3,
    )
    assert llm.engine.block_manager.block_size == block_size
    chunks: dict[str, int] = {}  # request id -> prompt chunks scheduled
    schedule = llm.engine.scheduler.schedule

    def counting_schedule():
        out = schedule()
        for s in out.scheduled:
            if s.start < s.seq.num_prompt_tokens:
                chunks[s.seq.request_id] = chunks.get(s.seq.request_id, 0) + 1
        return out

    monkeypatch.setattr(llm.engine.scheduler, "schedule", counting_schedule)
    vocab = llm.engine.model_config.vocab_size
    shared = random_prompts(vocab, [75], seed=7)[0]
    prompts = random_prompts(vocab, [3, 9, 16, 20, 31, 40, 1, 12], seed=8, prefix=shared)
    outs = llm.generate(prompts, GREEDY)
    assert_same_as_hf(outs, prompts, hf_refs(arch))
    assert max(chunks.values()) >= 4  # a 78-token prompt without hits, 20 tokens per step
    # Hits cover whole blocks of the shared 75 tokens: 72 with blocks of 8, 64 with blocks of 32.
    full = 75 // block_size * block_size
    cached = [o.num_cached_tokens for o in outs]
    assert set(cached) <= set(range(0, full + 1, block_size)) and cached.count(full) >= 5, cached
    assert llm.engine.get_stats().prefix_cache_hits == sum(cached)
    # Run again, each prompt hits its own earlier blocks: every full block but the last token's.
    again = llm.generate(prompts[:2], GREEDY)
    expected = [(len(p) - 1) // block_size * block_size for p in prompts[:2]]
    assert [o.num_cached_tokens for o in again] == expected
    assert_same_as_hf(again, prompts[:2], hf_refs(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption(arch, tiny_model, hf_refs):
    # 13 blocks of 16 tokens: the largest request (130 + 24 tokens) fits alone, the batch does not.
    llm = LLM(tiny_model(arch), num_kv_blocks=13, max_num_seqs=8)
    prompts = random_prompts(llm.engine.model_config.vocab_size, PROMPT_LENS, seed=4)
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.get_stats().num_preemptions > 0
    assert_same_as_hf(outs, prompts, hf_refs(arch))
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    # Token counters (vllm:prompt_tokens / vllm:generation_tokens) count recomputed work once.
    assert stats.prompt_tokens == sum(len(p) for p in prompts)
    assert stats.generation_tokens == sum(len(o.outputs[0].token_ids) for o in outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_logits_match(arch, tiny_model, hf_refs):
    """One flat forward of three prompts gives every position's logits within 1e-4 of HF."""
    llm = LLM(tiny_model(arch), num_kv_blocks=64)
    engine = llm.engine
    prompts = random_prompts(engine.model_config.vocab_size, [7, 40, 19], seed=5)
    scheduled = []
    for i, p in enumerate(prompts):
        rid = RequestId(f"r{i}")
        seq = Sequence(rid, p, GREEDY, arrival_time=0.0, arrival_index=i)
        assert engine.block_manager.allocate(rid, len(p))
        scheduled.append(
            ScheduledSequence(seq, 0, len(p), engine.block_manager.block_ids(rid), True)
        )
    runner = engine.runner
    batch = runner.prepare(scheduled)
    with torch.inference_mode():
        hidden = runner.model(batch.input_ids, batch.positions, runner.kv_cache.tensor, batch.attn)
        logits = runner.model.compute_logits(hidden)
    qsl = batch.attn.query_start_loc_cpu
    for i, s in enumerate(batch.order):
        ours = logits[qsl[i] : qsl[i + 1]]
        theirs = hf_refs(arch).logits(s.seq.prompt_token_ids)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logprobs_match_hf_scores(arch, tiny_model, hf_refs):
    """Top-5 logprobs of every generated step (prefill and decode paths) match HF within 1e-4."""
    llm = LLM(tiny_model(arch), num_kv_blocks=128)
    prompt = random_prompts(llm.engine.model_config.vocab_size, [21], seed=6)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=5))[0]
    ref = hf_refs(arch)
    tokens = prompt + out.outputs[0].token_ids
    hf_lp = ref.logits(tokens).log_softmax(-1)
    for i, lp in enumerate(out.outputs[0].logprobs):
        row = hf_lp[len(prompt) - 1 + i]
        assert lp.token_id == out.outputs[0].token_ids[i]
        assert lp.rank == 1
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
        ids, vals = zip(*lp.top, strict=True)
        hf_vals, hf_ids = row.topk(5)
        assert list(ids) == hf_ids.tolist()
        torch.testing.assert_close(torch.tensor(vals), hf_vals, atol=1e-4, rtol=0)
