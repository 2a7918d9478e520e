"""bench/roofline.py: the per-step floor against numbers worked out by hand."""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from roofline import ModelCost, StepRecord, step_floor, step_work, summarize  # noqa: E402

# 2 layers, 4 KV bytes per token and layer, 2 query heads of dim 4.
MODEL = ModelCost(
    weight_bytes=1000,
    linear_params=10,
    lm_head_params=5,
    kv_bytes_per_token=8,
    q_heads=2,
    head_dim=4,
    windows=(None, None),
)
# A decode row (position 3 after 3 cached tokens) and a 4-token prompt; both sample.
STARTS, NEW = [3, 0], [1, 4]


def step(starts, new, seconds, sampled=None, prefill_rows=0):
    return StepRecord(
        np.array(starts),
        np.array(new),
        len(starts) if sampled is None else sampled,
        prefill_rows,
        seconds,
    )


def test_step_work_counts_weights_kv_and_causal_attention():
    moved, flops = step_work(MODEL, STARTS, NEW, sampled=2)
    # weights 1000 + KV read (3 cached tokens x 2 layers x 4 B) + KV written (5 tokens x 8 B)
    assert moved == 1000 + 24 + 40
    # linear 2x10x5 + LM head 2x5x2 + attention 4 x dim 4 x 2 heads x 2 layers x (4 + 1+2+3+4)
    assert flops == 100 + 20 + 4 * 4 * 2 * 2 * 14


def test_a_window_clips_the_keys_read_and_seen():
    windowed = replace(MODEL, windows=(2, None))
    moved, flops = step_work(windowed, STARTS, NEW, sampled=2)
    # layer 0 (window 2): the decode row reads 1 cached key and sees 2; the prompt sees 1+2+2+2.
    # layer 1 (full): 3 read, 4 + 10 seen.
    assert moved == 1000 + (1 + 3) * 4 + 40
    assert flops == 100 + 20 + 4 * 4 * 2 * ((2 + 7) + (4 + 10))


def test_floor_is_the_slower_of_memory_and_compute():
    memory_bound = step_floor(MODEL, step(STARTS, NEW, 9.0), bandwidth=1000, flops_rate=1000)
    assert memory_bound.seconds == pytest.approx(1.064) and not memory_bound.compute_bound
    compute_bound = step_floor(MODEL, step(STARTS, NEW, 9.0), bandwidth=1e6, flops_rate=1000)
    assert compute_bound.seconds == pytest.approx(1.016) and compute_bound.compute_bound


def test_summary_groups_steps_and_gives_the_ceiling():
    decode = lambda n: step([10] * n, [1] * n, 1.0)  # noqa: E731
    steps = [
        step([0] * 300, [1] * 300, 2.0, prefill_rows=1),  # prefill rows first, whatever the batch
        decode(300),
        decode(257),
        decode(100),
        decode(64),
        decode(1),
    ]
    s = summarize(MODEL, steps, bandwidth=1000, flops_rate=1000, output_tokens=900, wall_seconds=8)
    g = s["groups"]
    assert [g[k]["steps"] for k in g] == [1, 2, 1, 2]
    assert [g[k]["measured_s"] for k in g] == [2.0, 2.0, 1.0, 2.0]
    # every step reads the 1000 weight bytes: memory-bound at >= 1 s each
    floors = [step_floor(MODEL, x, 1000, 1000).seconds for x in steps]
    assert g["prefill-containing"]["floor_s"] == pytest.approx(floors[0])
    assert g["decode > 256 seqs"]["floor_s"] == pytest.approx(floors[1] + floors[2])
    assert s["floor_s"] == pytest.approx(sum(floors))
    assert s["steps_s"] == 7.0 and s["outside_steps_s"] == 1.0
    assert s["ceiling_output_tok_s"] == pytest.approx(900 / sum(floors))
    assert s["floor_over_wall"] == pytest.approx(sum(floors) / 8)


def test_no_steps_gives_no_ceiling():
    s = summarize(MODEL, [], bandwidth=1, flops_rate=1, output_tokens=0, wall_seconds=0)
    assert s["floor_s"] == 0 and s["ceiling_output_tok_s"] is None
    assert all(g["floor_over_measured"] is None for g in s["groups"].values())


def test_an_8b_decode_step_of_1000_seqs_at_h100_rates():
    """Llama-3.1-8B (bf16), 1,000 sequences with 400 cached tokens each, one token each: KV reads
    (52 GB) and weights (15 GB) take 22.5 ms at 3.0 TB/s; linear layers, LM head and attention
    (15.2 TFLOP) take 19.3 ms at 790 TFLOP/s. Memory-bound on an H100, only just."""
    layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336  # q, o, k, v, MLP
    llama8b = ModelCost(
        weight_bytes=2 * (32 * layer + 128256 * 4096),  # no embedding table: the LM head's
        linear_params=32 * layer,
        lm_head_params=128256 * 4096,
        kv_bytes_per_token=32 * 2 * 8 * 128 * 2,  # layers x K/V x kv heads x dim x bf16
        q_heads=32,
        head_dim=128,
        windows=(None,) * 32,
    )
    floor = step_floor(llama8b, step([400] * 1000, [1] * 1000, 0.03), 3.0e12, 790e12)
    assert floor.memory_s == pytest.approx(22.5e-3, rel=0.01)
    assert floor.compute_s == pytest.approx(19.3e-3, rel=0.01)
    assert not floor.compute_bound and floor.seconds == floor.memory_s


def test_summary_reports_the_memory_and_compute_sides_and_mean_batch():
    steps = [step([3, 5], [1, 1], 1.0), step([7, 9, 11], [1, 1, 1], 1.0)]
    g = summarize(MODEL, steps, 1000, 1000, 5, 3.0)["groups"]["decode <= 64 seqs (tail)"]
    floors = [step_floor(MODEL, x, 1000, 1000) for x in steps]
    assert g["memory_floor_s"] == pytest.approx(sum(f.memory_s for f in floors))
    assert g["compute_floor_s"] == pytest.approx(sum(f.compute_s for f in floors))
    assert g["mean_seqs"] == 2.5 and g["mean_cached_tokens_per_seq"] == (3 + 5 + 7 + 9 + 11) / 5
