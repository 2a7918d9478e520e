"""Routing policy: which decode pod admits a request, which prefill pod computes its prompt.

Decode: the healthy pod with the most free KV blocks (what admission needs).

Prefill: the pod where the prompt would finish prefilling soonest, measured in tokens of work:
``load_weight * queued_tokens + prefix_weight * (prompt_tokens - cached_tokens)``, where
``cached_tokens`` is the prompt's longest prefix that pod already caches (from kvstore). A pod
whose queue is far above the least loaded one (``hotspot_ratio``) gets no credit for its cache,
so a popular prefix cannot pile every request onto one pod. Ties break by rendezvous hashing of
the prompt, so every router replica sends the same prompt to the same pod.

NOTE: the issue speaks of combining the cached-prefix *fraction* with load; the cost uses the
uncached token count instead (the fraction times the prompt length), so that both terms are in
tokens of prefill work and one weight trades them without depending on the prompt's length.
"""

import logging
from dataclasses import dataclass
from typing import Protocol

import xxhash

from services.router.pods import Pod

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class PrefillCandidate:
    """One prefill pod's score breakdown for one request."""

    pod: Pod
    cached_tokens: int
    queued_tokens: int
    cost: float
    hot: bool


class PrefillScorer(Protocol):
    def rank(
        self, pods: list[Pod], prompt_tokens: int, cached: dict[str, int], tie_key: bytes
    ) -> list[PrefillCandidate]:
        """Candidates, best first. ``cached``: pod_id -> prompt tokens that pod caches."""
        ...


class PrefixLoadScorer:
    def __init__(
        self,
        prefix_weight: float = 1.0,
        load_weight: float = 1.0,
        hotspot_ratio: float = 2.0,
        hotspot_min_tokens: int = 4096,
    ) -> None:
        self.prefix_weight = prefix_weight
        self.load_weight = load_weight
        self.hotspot_ratio = hotspot_ratio
        self.hotspot_min_tokens = hotspot_min_tokens

    def rank(
        self, pods: list[Pod], prompt_tokens: int, cached: dict[str, int], tie_key: bytes
    ) -> list[PrefillCandidate]:
        if not pods:
            return []
        least = min(p.queued_tokens for p in pods)
        candidates = []
        for pod in pods:
            queued = pod.queued_tokens
            hot = queued > self.hotspot_ratio * least + self.hotspot_min_tokens
            pod_id = pod.stats.pod_id if pod.stats else pod.address
            hit = 0 if hot else min(cached.get(pod_id, 0), prompt_tokens)
            cost = self.load_weight * queued + self.prefix_weight * (prompt_tokens - hit)
            candidates.append(PrefillCandidate(pod, hit, queued, cost, hot))
        return sorted(
            candidates,
            key=lambda c: (c.cost, xxhash.xxh3_64_intdigest(tie_key + c.pod.address.encode())),
        )


def pick_decode(pods: list[Pod], exclude: set[str]) -> Pod | None:
    candidates = [p for p in pods if p.address not in exclude]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.free_blocks, -p.inflight))
