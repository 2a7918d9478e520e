"""The KV pool's sizing inputs: the profiled worst-case step (its shape, and that it runs through
the same runner path as real steps) and the batch defaults by device class."""

import pytest

from tandem.engine.config import BATCH_DEFAULTS, EngineConfig
from tandem.engine.runner import profile_batch


@pytest.mark.parametrize(
    ("tokens", "rows", "max_model_len"),
    [(8192, 256, 4096), (16384, 1024, 131072), (64, 8, 20), (40, 40, 1000), (100, 1, 50)],
)
def test_the_profiled_step_fills_the_budget_within_the_limits(tokens, rows, max_model_len):
    steps, blocks = profile_batch(tokens, rows, max_model_len, block_size=16)
    lengths = [s.num_new_tokens for s in steps]
    assert len(steps) <= rows
    assert sum(lengths) <= tokens
    assert max(lengths) <= max_model_len - 1  # no chunk longer than an admissible request
    # The budget is used up unless the row limit or the request length stops it.
    assert sum(lengths) == tokens or len(steps) == rows
    assert all(s.samples and s.start == 0 for s in steps)
    assert all(s.seq.sampling_params.logprobs == 20 for s in steps)  # the costliest sampling
    ids = [b for s in steps for b in s.block_ids.tolist()]
    assert sorted(ids) == list(range(blocks))  # disjoint, and the pool they need


def test_the_profiled_step_runs_through_the_runner(tiny_model):
    """The step the GPU pool is sized by goes through the ordinary runner path (CPU here)."""
    from tandem.engine.llm_engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_model("llama")), max_num_seqs=6, max_num_batched_tokens=90,
            num_kv_blocks=64,
        )
    )  # fmt: skip
    steps, blocks = profile_batch(90, 6, engine.limits.max_model_len, engine.config.block_size)
    assert blocks <= 64
    sampled, output = engine.runner.execute(steps)
    assert len(sampled) == len(steps) and len(output.token_ids) == len(steps)
    assert all(lp is not None and len(lp[2]) == 20 for lp in output.logprobs)


def test_batch_defaults_fill_only_what_is_unset():
    small_seqs, small_tokens = BATCH_DEFAULTS["other"]
    c = EngineConfig(model="m").with_batch_defaults()  # CPU: the small defaults
    assert (c.max_num_seqs, c.max_num_batched_tokens) == (small_seqs, small_tokens)
    c = EngineConfig(model="m", max_num_seqs=3).with_batch_defaults()
    assert (c.max_num_seqs, c.max_num_batched_tokens) == (3, small_tokens)
    c = EngineConfig(model="m", max_num_batched_tokens=100).with_batch_defaults()
    assert (c.max_num_seqs, c.max_num_batched_tokens) == (100, 100)  # a default never exceeds
    c = EngineConfig(model="m", max_num_seqs=20000).with_batch_defaults()
    assert c.max_num_batched_tokens == 20000
    with pytest.raises(ValueError, match="at least"):
        EngineConfig(model="m", max_num_seqs=10, max_num_batched_tokens=5)


def test_a_large_gpu_gets_the_large_defaults(monkeypatch):
    import torch

    from tandem.engine import config

    class Props:
        total_memory = 80 << 30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props)
    assert config.batch_defaults("cuda") == BATCH_DEFAULTS["large-gpu"]
    Props.total_memory = 40 << 30
    assert config.batch_defaults("cuda:0") == BATCH_DEFAULTS["other"]
    assert config.batch_defaults("cpu") == BATCH_DEFAULTS["other"]
