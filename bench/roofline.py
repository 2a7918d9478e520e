"""A per-step roofline floor for a run of engine steps: how fast could these exact steps go?

Each step that ran is recorded as a ``StepRecord`` (per row: the first position computed and the
number of new tokens; how many rows sample). Its floor is the larger of its bytes over the copy
rate and its FLOPs over the matmul rate (both measured in the same run):

    bytes = weights + KV read + KV written
        weights:    every weight the forward reads once a step (``ModelCost.weight_bytes``)
        KV read:    per layer, each row's cached keys its queries can see (before ``start``,
                    clipped to the layer's window); a chunk's own new K/V is not read back
        KV written: every new token's K and V, all layers
    FLOPs = 2 x linear params x tokens + 2 x LM-head params x sampled rows
            + 4 x head_dim x q_heads x visible keys (QK^T and PV; per layer, causal, windowed)

Activations, the embedding rows and the sampler are left out: it is a lower bound. Summed over a
run's steps it is the time no engine can beat for the same schedule (the same steps and batch
sizes); output tokens over that sum is the throughput ceiling for the workload on that GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True, frozen=True)
class ModelCost:
    """What a model moves and computes per token (from the loaded model)."""

    weight_bytes: float
    """Bytes of weights one forward reads (all but an untied embedding table)."""
    linear_params: int
    """Parameters of the linear layers every token goes through (no embedding, no LM head)."""
    lm_head_params: int
    """vocab x hidden: the LM head, run for sampled rows only."""
    kv_bytes_per_token: float
    """K and V bytes of one token over all layers."""
    q_heads: int
    head_dim: int
    windows: tuple[int | None, ...]
    """Per layer: attention window in tokens (query included), or None for full attention."""

    @property
    def layers(self) -> int:
        return len(self.windows)


@dataclass(slots=True, frozen=True)
class StepRecord:
    """One engine step as it ran: per scheduled row, its ``start`` and ``num_new_tokens``."""

    starts: np.ndarray
    new_tokens: np.ndarray
    sampled: int
    """Rows that sampled a token (their LM-head rows)."""
    prefill_rows: int
    """Rows computing prompt tokens (a step with any is a prefill-containing step)."""
    seconds: float
    """Measured: device time of the step (CUDA events) or its launch-to-tokens time (CPU)."""

    @property
    def seqs(self) -> int:
        return len(self.starts)

    @property
    def tokens(self) -> int:
        return int(self.new_tokens.sum())


@dataclass(slots=True, frozen=True)
class StepFloor:
    memory_s: float
    """Bytes moved over the copy rate."""
    compute_s: float
    """FLOPs over the matmul rate."""

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def compute_bound(self) -> bool:
        return self.compute_s >= self.memory_s


def _causal_visible(m: np.ndarray, window: int | None) -> np.ndarray:
    """sum_{k=1..m} min(k, window): keys seen by the queries at positions 0..m-1."""
    m = m.astype(np.float64)
    if window is None:
        return m * (m + 1) / 2
    w = float(window)
    return np.where(m <= w, m * (m + 1) / 2, w * (w + 1) / 2 + (m - w) * w)


def step_work(model: ModelCost, starts, new_tokens, sampled: int) -> tuple[float, float]:
    """(bytes, FLOPs) of one step whose rows compute positions [start, start + new)."""
    starts = np.asarray(starts, dtype=np.int64)
    new = np.asarray(new_tokens, dtype=np.int64)
    tokens = float(new.sum())
    kv_layer = model.kv_bytes_per_token / model.layers
    kv_read_tokens = 0.0
    visible = 0.0
    for window, layers in Counter(model.windows).items():  # layers alike computed once
        cached = starts if window is None else np.minimum(starts, window - 1)
        seen = _causal_visible(starts + new, window) - _causal_visible(starts, window)
        kv_read_tokens += layers * float(cached.sum())
        visible += layers * float(seen.sum())
    moved = model.weight_bytes + kv_read_tokens * kv_layer + tokens * model.kv_bytes_per_token
    flops = (
        2.0 * model.linear_params * tokens
        + 2.0 * model.lm_head_params * sampled
        + 4.0 * model.head_dim * model.q_heads * visible
    )
    return moved, flops


def step_floor(
    model: ModelCost, step: StepRecord, bandwidth: float, flops_rate: float
) -> StepFloor:
    """max(bytes / bandwidth, FLOPs / matmul rate) of one step."""
    moved, flops = step_work(model, step.starts, step.new_tokens, step.sampled)
    return StepFloor(moved / bandwidth, flops / flops_rate)


GROUPS = (
    ("prefill-containing", lambda s: s.prefill_rows > 0),
    ("decode > 256 seqs", lambda s: s.seqs > 256),
    ("decode 65-256 seqs", lambda s: 64 < s.seqs <= 256),
    ("decode <= 64 seqs (tail)", lambda s: True),
)
"""Each step goes to the first group whose test it passes (the groups partition the steps)."""


def summarize(
    model: ModelCost,
    steps: Iterable[StepRecord],
    bandwidth: float,
    flops_rate: float,
    output_tokens: int,
    wall_seconds: float,
) -> dict:
    """The run against its summed per-step floor, overall and per group of steps."""
    keys = ("measured_s", "floor_s", "memory_floor_s", "compute_floor_s", "rows", "cached")
    groups = {
        name: dict(steps=0, compute_bound_steps=0, tokens=0, **dict.fromkeys(keys, 0.0))
        for name, _ in GROUPS
    }
    for step in steps:
        floor = step_floor(model, step, bandwidth, flops_rate)
        name = next(name for name, test in GROUPS if test(step))
        g = groups[name]
        g["steps"] += 1
        g["measured_s"] += step.seconds
        g["floor_s"] += floor.seconds
        g["memory_floor_s"] += floor.memory_s
        g["compute_floor_s"] += floor.compute_s
        g["compute_bound_steps"] += floor.compute_bound
        g["tokens"] += step.tokens
        g["rows"] += step.seqs
        g["cached"] += float(step.starts.sum())
    for g in groups.values():
        g["floor_over_measured"] = g["floor_s"] / g["measured_s"] if g["measured_s"] else None
        rows, cached = g.pop("rows"), g.pop("cached")
        g["mean_seqs"] = rows / g["steps"] if g["steps"] else None
        g["mean_cached_tokens_per_seq"] = cached / rows if rows else None
    floor_s = sum(g["floor_s"] for g in groups.values())
    steps_s = sum(g["measured_s"] for g in groups.values())
    return dict(
        bandwidth_Bps=bandwidth,
        matmul_flops=flops_rate,
        wall_s=wall_seconds,
        steps_s=steps_s,
        outside_steps_s=wall_seconds - steps_s,
        floor_s=floor_s,
        floor_over_wall=floor_s / wall_seconds if wall_seconds else None,
        ceiling_output_tok_s=output_tokens / floor_s if floor_s else None,
        groups=groups,
    )


def format_summary(summary: dict) -> list[str]:
    """Lines for the console: the groups' measured time against their floors, then the total."""
    lines = [
        f"  roofline floor (copy {summary['bandwidth_Bps'] / 1e12:.3g} TB/s, matmul "
        f"{summary['matmul_flops'] / 1e12:.3g} TFLOP/s):"
    ]
    for name, g in summary["groups"].items():
        if not g["steps"]:
            continue
        lines.append(
            f"    {name:<26} {g['steps']:>5} steps, {g['mean_seqs']:.0f} seqs x "
            f"{g['mean_cached_tokens_per_seq']:.0f} cached tokens on average: "
            f"{g['measured_s']:.2f} s measured, floor {g['floor_s']:.2f} s "
            f"({g['floor_over_measured']:.2f} of measured; memory {g['memory_floor_s']:.2f} s, "
            f"compute {g['compute_floor_s']:.2f} s, {g['compute_bound_steps']} steps "
            "compute-bound)"
        )
    lines.append(f"    outside steps (host, device idle): {summary['outside_steps_s']:.2f} s")
    ratio = summary["floor_over_wall"]
    if not summary["floor_s"]:
        return lines
    lines.append(
        f"    total: {summary['wall_s']:.2f} s wall, summed floor {summary['floor_s']:.2f} s "
        f"({ratio:.2f} of wall); ceiling {summary['ceiling_output_tok_s']:,.0f} output tok/s"
    )
    return lines
