"""The engine and the KV path on a CUDA GPU (skipped where none is present)."""

import asyncio
import dataclasses
import random

import pytest
import torch

from tandem.engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu
ARCHS = ["llama", "llama-tied-rope3", "mistral-swa", "qwen2", "qwen3"]
MAX_NEW = 24


def prompts(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 7, 16, 17, 40, 97, 130, 300)]


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_greedy_is_token_identical_to_transformers(arch, tiny_model, hf_reference):
    model_dir = tiny_model(arch)
    llm = LLM(
        model_dir,
        device="cuda",
        dtype="float32",
        num_kv_blocks=256,
        max_num_batched_tokens=64,
        max_num_seqs=8,
    )
    batch = prompts(llm.engine.model_config.vocab_size)
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    ref = hf_reference(model_dir, MAX_NEW, device="cuda")
    for prompt, out in zip(batch, outs, strict=True):
        assert out.outputs[0].token_ids == ref.generate(prompt)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bfloat16_logits_within_bf16_tolerance_of_transformers(arch, tiny_model):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model(arch)
    llm = LLM(model_dir, device="cuda", dtype="bfloat16", num_kv_blocks=64)
    prompt = prompts(llm.engine.model_config.vocab_size)[5]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[
        0
    ].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float().log_softmax(-1)
    ours = torch.tensor([v for _, v in out.logprobs[0].top])
    theirs = ref[torch.tensor([t for t, _ in out.logprobs[0].top])].cpu()
    torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0.02)


def test_disaggregated_path_on_cuda_matches_the_offline_engine(tiny_model, in_process_pods):
    """Prefill and decode servers on the GPU (pinned staging, receiver stream): same tokens."""
    from services.router.flow import Route
    from tandem.api.requests import Job

    model_dir = tiny_model("qwen3")
    batch = prompts(1000, seed=3)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    # One prompt at a time, as the pods below serve them: on a GPU the kernels (and so the last
    # bits of float32 results) depend on the batch shape.
    offline = LLM(model_dir, device="cuda", num_kv_blocks=256)
    want = [offline.generate([p], params)[0].outputs[0].token_ids for p in batch]

    async def main():
        prefill = dict(kv_layers_per_group=1, kv_chunk_bytes=64 << 10)
        async with in_process_pods(
            model_dir, prefill=prefill, device="cuda", num_kv_blocks=256
        ) as (dispatcher, _, _):
            got = []
            for i, prompt in enumerate(batch):
                route = Route()
                events = [e async for e in dispatcher.generate(Job(f"g{i}", prompt, params), route)]
                assert route.mode == "disaggregated" and route.prefill_response is not None
                got.append([t for e in events for t in e.token_ids])
            return got

    assert asyncio.run(main()) == want


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_async_scheduling_on_cuda_gives_the_synchronous_tokens(
    tiny_model, monkeypatch, cuda_graphs
):
    """Steps launched ahead on a real stream (device input ids, pinned token copies behind
    events), with graphs and eagerly: the tokens of synchronous steps, for greedy, seeded and
    stop-token rows (one under min_tokens) that end at different steps."""
    model_dir = tiny_model("llama")
    batch = prompts(1000, seed=4)
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_NEW + i, ignore_eos=True) for i in range(4)
    ]
    params += [
        SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=MAX_NEW, ignore_eos=True)
        for i in range(2)
    ]
    params += [
        SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[t], min_tokens=m)
        for t, m in ((5, 0), (77, 4))
    ]  # min_tokens: the masked sampling path, launched ahead
    kw = dict(
        device="cuda", dtype="float32", num_kv_blocks=256, max_num_seqs=8, cuda_graphs=cuda_graphs
    )
    want = [
        o.outputs[0].token_ids
        for o in LLM(
            model_dir, async_scheduling="off", async_output_processing="off", **kw
        ).generate(batch, params)
    ]
    llm = LLM(model_dir, async_scheduling="on", async_output_processing="on", **kw)
    launch, ahead = llm.engine.runner.launch, []

    def recording(scheduled, input_ids=None):
        ahead.append(input_ids is not None)
        return launch(scheduled, input_ids)

    monkeypatch.setattr(llm.engine.runner, "launch", recording)
    got = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
    assert got == want
    assert sum(ahead) >= MAX_NEW // 2
    assert (llm.engine.runner.graphs is not None) == cuda_graphs


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_parallel_samples_copy_the_shared_block_on_the_device(tiny_model, cuda_graphs):
    """n=3 samples fork the lead's blocks and copy the partial one on the GPU before writing
    it (``ModelRunner.copy_blocks``), with async scheduling: each equals a lone request with
    its seed, so every copy carried the prompt's KV."""
    model_dir = tiny_model("llama")
    prompt = prompts(1000, seed=9)[4]  # 2 full blocks and 8 tokens
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=256, cuda_graphs=cuda_graphs)
    llm = LLM(model_dir, **kw)
    base = SamplingParams(temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True)
    want = [
        llm.generate([prompt], dataclasses.replace(base, seed=3 + i))[0].outputs[0].token_ids
        for i in range(3)
    ]
    copies = []
    copy_blocks = llm.engine.runner.copy_blocks

    def recording(pairs):
        copies.extend(pairs)
        copy_blocks(pairs)

    llm.engine.runner.copy_blocks = recording
    out = llm.generate([prompt], dataclasses.replace(base, seed=3, n=3))[0]
    assert [c.token_ids for c in out.outputs] == want
    assert len(set(map(tuple, want))) == 3
    assert 1 <= len(copies) <= 3


def test_a_profiled_pool_serves_a_full_budget_step_and_a_32k_prompt_with_a_prefix_hit(tmp_path):
    """Llama-3.1-8B shape (dummy weights), the pool sized by the profiled worst-case step (no
    num_kv_blocks): a step that takes the whole token budget, then a 32k-token prompt, then
    another sharing 30k of it (a prefix-cache hit, so a 2k chunk after 30k cached tokens). No
    out-of-memory anywhere."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from shapes import shape_dir

    model = shape_dir("llama-3.1-8b", tmp_path)
    llm = LLM(model, device="cuda", load_format="dummy", max_model_len=40000)
    runner, config = llm.engine.runner, llm.engine.config
    assert runner.profiled_step_bytes is not None and runner.profiled_step_bytes > 0
    rng = random.Random(0)
    vocab = llm.engine.model_config.vocab_size
    rows = config.max_num_batched_tokens // 256
    full = [[rng.randrange(3, vocab) for _ in range(256)] for _ in range(rows)]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=4, ignore_eos=True, logprobs=5)
    outs = llm.generate(full, params)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    long = [rng.randrange(3, vocab) for _ in range(32768)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate([long], greedy)[0]
    second = llm.generate([long[:30720] + [rng.randrange(3, vocab) for _ in range(2048)]], greedy)
    assert len(first.outputs[0].token_ids) == 8
    assert second[0].num_cached_tokens >= 30000
    assert len(second[0].outputs[0].token_ids) == 8
