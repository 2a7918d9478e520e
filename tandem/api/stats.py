"""EngineStats: the snapshot of an engine's queues, KV pool and counters.

Read by the pods' metrics and GetStats, sent to the router as ``PodStats``; here, torch-free,
because the front processes read it without the engine.
"""

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class EngineStats:
    """A snapshot of the engine's queues, KV pool and counters (token counters are cumulative)."""

    num_running: int
    num_waiting: int
    num_waiting_for_kv: int
    num_queued_prefill_tokens: int
    num_free_blocks: int
    num_total_blocks: int
    num_cached_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    """Prompt tokens of requests whose prefill completed here (cached tokens included, as vLLM)."""
    generation_tokens: int
    """Tokens sampled here."""
