"""Routing policy: which decode pod admits a request, which prefill pod computes its prompt.

Decode: the healthy pod with the most free KV blocks (what admission needs). Prefill: the
healthy pod with the fewest queued prompt tokens. Pods already tried for the request are
skipped. Ties go to the pod with fewer of this router's requests in flight.
"""

from services.router.pods import Pod


def pick_decode(pods: list[Pod], exclude: set[str]) -> Pod | None:
    candidates = [p for p in pods if p.address not in exclude]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.free_blocks, -p.inflight))


def pick_prefill(pods: list[Pod], exclude: set[str]) -> Pod | None:
    candidates = [p for p in pods if p.address not in exclude]
    if not candidates:
        return None
    return min(candidates, key=lambda p: (p.queued_tokens, p.inflight))
