"""The engine at ``tensor_parallel_size=2`` on CPU (gloo): one follower process beside the test's,
each rank holding half of every layer and of the KV pool.

Its tokens must be those of the one-rank engine and of Hugging Face ``transformers`` on the same
weights, through chunked prefill, prefix-cache hits, copy-on-write forks (n > 1), seeded sampling
with logprobs and async scheduling (tokens broadcast from rank 0's device); and its failures must
be clear errors: a model that does not split fails before any process starts, and a rank that
dies mid-run fails the step instead of hanging it.
"""

import os
import signal
import time

import pytest

from tandem.api.errors import TandemError
from tandem.engine import LLM, SamplingParams
from tandem.engine.parallel import ShardingError

from .test_hf_parity import ARCHS, GREEDY, MAX_NEW, assert_same_as_hf, random_prompts

PROMPT_LENS = [1, 5, 17, 33, 64, 97]
SAMPLED = SamplingParams(
    temperature=0.9, top_p=0.9, seed=7, max_tokens=12, logprobs=3, prompt_logprobs=2
)
FORKED = SamplingParams(temperature=1.0, seed=11, n=2, max_tokens=10)


def _run(llm: LLM, prompts) -> tuple[list, list[float], list]:
    """Greedy, seeded-with-logprobs and n=2 runs: (their tokens and logprob ranks and top ids,
    the logprob values, the greedy outputs)."""
    greedy = llm.generate(prompts, GREEDY)
    sampled = llm.generate(prompts[:3], SAMPLED)
    forked = llm.generate(prompts[2:4], FORKED)
    # Prompt logprobs too: their logits are computed slice by slice (every rank, in one order).
    logprobs = [lp for o in sampled for lp in o.outputs[0].logprobs + o.prompt_logprobs]
    exact = [
        [o.outputs[0].token_ids for o in greedy],
        [o.outputs[0].token_ids for o in sampled],
        [(lp.token_id, lp.rank, sorted(t for t, _ in lp.top)) for lp in logprobs],
        [[c.token_ids for c in o.outputs] for o in forked],
    ]
    return exact, [lp.logprob for lp in logprobs], greedy


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_matches_one_rank_and_transformers(arch, tiny_model, hf_reference):
    model = tiny_model(arch)
    # A 24-token budget chunks the longer prompts; the shared prefix hits the cache.
    options = dict(num_kv_blocks=256, max_num_batched_tokens=24, max_num_seqs=4)
    with LLM(model, **options) as one:
        vocab = one.engine.model_config.vocab_size
        shared = random_prompts(vocab, [40], seed=5)[0]
        prompts = random_prompts(vocab, PROMPT_LENS, seed=6)
        prompts += random_prompts(vocab, [3, 9], seed=7, prefix=shared)
        expected, expected_logprobs, _ = _run(one, prompts)
    with LLM(model, tensor_parallel_size=2, **options) as two:
        assert two.engine.runner.shard.num_heads * 2 == two.engine.model_config.num_heads
        got, logprobs, greedy = _run(two, prompts)
        assert greedy[-1].num_cached_tokens > 0  # the shared prefix came from the cache
    assert got == expected
    # Row-parallel layers sum two partial products where one rank sums one: float32 rounding.
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    assert_same_as_hf(greedy, prompts, hf_reference(model, MAX_NEW))


def test_a_vocabulary_that_does_not_split_evenly_is_padded(tmp_path, hf_reference):
    """333 tokens over 2 ranks: rank 1 holds 166 rows and one zero row of padding, whose logit
    is cut off before sampling (it never wins, never shows in logprobs)."""
    from tandem.model_gen import ModelGenOptions, generate_model_dir

    model = generate_model_dir(ModelGenOptions(out=tmp_path / "m", arch="llama", vocab=333))
    options = dict(num_kv_blocks=128, max_num_batched_tokens=24, max_num_seqs=4)
    prompts = random_prompts(333, [5, 30, 50, 7], seed=12)
    with LLM(model, **options) as one:
        expected, expected_logprobs, _ = _run(one, prompts)
    with LLM(model, tensor_parallel_size=2, **options) as two:
        assert two.engine.runner.model.lm_head.weight.shape[0] == 167
        got, logprobs, greedy = _run(two, prompts)
    assert got == expected
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    assert_same_as_hf(greedy, prompts, hf_reference(model, MAX_NEW))


def test_async_scheduling_broadcasts_device_tokens(llama_dir):
    """Async scheduling launches decode steps with tokens rank 0 has only on its device: they
    reach the other rank by broadcast, and the tokens stay those of the synchronous engine."""
    options = dict(num_kv_blocks=128, max_num_seqs=4)
    with LLM(llama_dir, **options) as one:
        prompts = random_prompts(one.engine.model_config.vocab_size, [4, 11, 30], seed=9)
        expected = [o.outputs[0].token_ids for o in one.generate(prompts, GREEDY)]
    with LLM(llama_dir, tensor_parallel_size=2, async_scheduling="on", **options) as two:
        assert two.engine.async_scheduling
        got = [o.outputs[0].token_ids for o in two.generate(prompts, GREEDY)]
    assert got == expected


def test_a_model_that_does_not_split_fails_before_starting_ranks(llama_dir):
    with pytest.raises(ShardingError, match="tensor-parallel size 3"):
        LLM(llama_dir, num_kv_blocks=64, tensor_parallel_size=3)


def test_a_rank_that_dies_fails_the_step_instead_of_hanging(llama_dir):
    with LLM(llama_dir, num_kv_blocks=64, tensor_parallel_size=2) as llm:
        prompt = random_prompts(llm.engine.model_config.vocab_size, [8], seed=1)
        assert llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
        follower = llm.engine._followers._procs[0]
        os.kill(follower.pid, signal.SIGKILL)
        follower.wait(10)
        started = time.monotonic()
        with pytest.raises(TandemError):
            llm.generate(prompt, GREEDY)
        assert time.monotonic() - started < 60


def test_a_rank_that_fails_at_start_is_reported_at_once(llama_dir, tmp_path, monkeypatch):
    """A follower that dies before joining (here: at interpreter start) is reported with rank 0
    still outside the group: no wait for the rendezvous timeout, no group, no temp dir left."""
    import tempfile

    import torch

    from tandem.api.errors import ModelLoadError

    broken = tmp_path / "site"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text("import os\nos._exit(7)\n")
    monkeypatch.setenv("PYTHONPATH", f"{broken}:{os.environ.get('PYTHONPATH', '')}")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="rank 1 exited with status 7"):
        LLM(llama_dir, num_kv_blocks=64, tensor_parallel_size=2)
    assert time.monotonic() - started < 60
    assert not torch.distributed.is_initialized()
    assert list(temp.iterdir()) == []


def test_a_failure_of_rank_0_inside_a_step_ends_the_group(llama_dir, monkeypatch):
    """Rank 0 failing between sending a step and finishing its forward leaves the others inside
    that step's collectives: they are ended, and later steps fail at once instead of pairing
    their collectives with the wrong step."""
    from tandem.engine.runner import TPGroupBroken

    with LLM(llama_dir, num_kv_blocks=64, tensor_parallel_size=2) as llm:
        prompt = random_prompts(llm.engine.model_config.vocab_size, [8], seed=2)
        model = llm.engine.runner.model

        def fail(*args, **kwargs):
            raise RuntimeError("injected forward failure")

        monkeypatch.setattr(model, "forward", fail)
        with pytest.raises(TandemError):
            llm.generate(prompt, GREEDY)
        follower = llm.engine._followers._procs[0]
        assert follower.wait(10) is not None  # ended, not left waiting in a collective
        assert "rank 0 failed during a step" in llm.engine.rank_failure()
        monkeypatch.undo()
        with pytest.raises(TandemError) as failed:
            llm.generate(prompt, GREEDY)
        assert isinstance(failed.value.__cause__, TPGroupBroken)


@pytest.mark.timeout(180)
def test_a_failure_of_rank_0_between_the_logits_gathers_ends_the_group(llama_dir, monkeypatch):
    """The vocabulary-parallel head's gathers come after the forward (prompt logprobs' slices,
    then the sampling rows): rank 0 failing between two of them leaves the follower waiting in
    the next one. It is ended too, and the next step fails at once instead of hanging."""
    from tandem.engine import prompt_logprobs
    from tandem.engine.runner import TPGroupBroken

    with LLM(llama_dir, num_kv_blocks=64, tensor_parallel_size=2) as llm:
        prompt = random_prompts(llm.engine.model_config.vocab_size, [30], seed=3)
        scored = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)

        def fail(*args, **kwargs):
            raise MemoryError("injected between the logits gathers")

        monkeypatch.setattr(prompt_logprobs, "_entries", fail)
        with pytest.raises(TandemError):
            llm.generate(prompt, scored)
        monkeypatch.undo()
        follower = llm.engine._followers._procs[0]
        assert follower.wait(10) is not None  # ended, not left waiting in a gather
        started = time.monotonic()
        with pytest.raises(TandemError) as failed:
            llm.generate(prompt, GREEDY)
        assert isinstance(failed.value.__cause__, TPGroupBroken)
        assert time.monotonic() - started < 30


def test_a_step_travels_as_int32_and_arrives_as_rank_0_built_it():
    import pickle

    import numpy as np

    from tandem.engine.runner import StepPlan
    from tandem.engine.tp_ranks import _narrow, _widen

    # Block ids of a large pool (2**20 blocks): their slots still fit int32.
    tables = np.arange(6 * 400, dtype=np.int64).reshape(6, 400) * 7_919 % (1 << 20)
    plan = StepPlan(
        input_ids=None,  # on rank 0's device (async scheduling): broadcast, not sent
        positions=np.array([7, 300, 5, 0, 1, 2], dtype=np.int64),
        slot_mapping=tables[:, 0] * 16 + 3,
        block_tables=tables,
        seq_lens=np.array([8, 301, 6, 1, 2, 3], dtype=np.int64),
        query_start_loc=np.arange(7, dtype=np.int64),
        num_decodes=6,
        block_size=16,
    )
    wire = _narrow(plan)
    assert wire.block_tables.dtype == np.int32
    assert len(pickle.dumps(wire)) < 0.6 * len(pickle.dumps(plan))
    back = _widen(pickle.loads(pickle.dumps(wire)))
    assert back.input_ids is None and back.num_decodes == 6 and back.block_size == 16
    for name in ("positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
        got, want = getattr(back, name), getattr(plan, name)
        assert got.dtype == np.int64 and np.array_equal(got, want), name
