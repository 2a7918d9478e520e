"""In-memory Index: the reference implementation (one process, tests, Redis-less set-ups)."""

import heapq
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass

from services.kvstore.index import IndexStats, Registration
from tandem.api.ids import BlockHash, PodId

_Key = tuple[str, BlockHash]
"""(namespace, block hash): one block entry."""


@dataclass(slots=True)
class _Pod:
    incarnation: str
    generation: str
    """Generation id "<incarnation>:<serial>"; the serial is new at every registration and clear."""
    expiry: float


class MemoryIndex:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # (namespace, hash) -> {pod: generation}, in LRU order (least recently used first).
        self._entries: OrderedDict[_Key, dict[PodId, str]] = OrderedDict()
        self._pods: dict[PodId, _Pod] = {}
        self._held: dict[tuple[PodId, str], set[_Key]] = {}
        """(pod, generation) -> the entries it holds. Invariant: ``key in _held[(p, g)]`` exactly
        when ``_entries[key][p] == g``; empty sets are deleted."""
        self._dead: deque[tuple[PodId, str]] = deque()
        """Retired generations whose entries ``sweep`` has still to drain, oldest first."""
        self._serials = itertools.count(1)
        self._counters = {"lookups": 0, "hit_blocks": 0, "evictions": 0}

    def _generation(self, pod: PodId, now: float) -> str | None:
        state = self._pods.get(pod)
        if state is None or state.expiry <= now:
            return None
        return state.generation

    def _current(self, pod: PodId, incarnation: str) -> _Pod | None:
        state = self._pods.get(pod)
        return state if state is not None and state.incarnation == incarnation else None

    def _new_generation(self, incarnation: str) -> str:
        return f"{incarnation}:{next(self._serials)}"

    def _retire(self, pod: PodId, generation: str) -> None:
        if (pod, generation) in self._held:
            self._dead.append((pod, generation))

    async def heartbeat(
        self, pod: PodId, incarnation: str, lease_s: float, now: float
    ) -> Registration:
        state = self._pods.get(pod)
        if state is not None and state.incarnation == incarnation:
            state.expiry = now + lease_s
            return Registration(known=True)
        if state is not None:
            if state.expiry > now and incarnation < state.incarnation:
                return Registration(known=False, superseded=True)
            self._retire(pod, state.generation)
        self._pods[pod] = _Pod(incarnation, self._new_generation(incarnation), now + lease_s)
        return Registration(known=False)

    def _touch(self, keys: list[_Key]) -> None:
        # Later blocks of the chain first, so the chain's head ends up most recent.
        for key in reversed(keys):
            self._entries.move_to_end(key)

    async def lookup(self, namespace: str, hashes: list[BlockHash], now: float) -> dict[PodId, int]:
        self._counters["lookups"] += 1
        counts: dict[PodId, int] = {}
        active: set[PodId] | None = None
        touched = []
        for i, h in enumerate(hashes):
            holders = self._entries.get((namespace, h), {})
            live = {p for p, gen in holders.items() if self._generation(p, now) == gen}
            active = live if active is None else active & live
            if not active:
                break
            touched.append((namespace, h))
            for p in active:
                counts[p] = i + 1
        self._touch(touched)
        self._counters["hit_blocks"] += max(counts.values(), default=0)
        return counts

    def _forget_holding(self, key: _Key, pod: PodId, generation: str) -> None:
        held = self._held.get((pod, generation))
        if held is not None:
            held.discard(key)
            if not held:  # a retired one may stay queued in _dead: the drain skips it
                del self._held[(pod, generation)]

    async def add(
        self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash], now: float
    ) -> bool:
        state = self._current(pod, incarnation)
        if state is None:
            return False
        if not hashes:
            return True
        keys = [(namespace, h) for h in hashes]
        held = self._held.setdefault((pod, state.generation), set())
        for key in keys:
            holders = self._entries.setdefault(key, {})
            old = holders.get(pod)
            if old is not None and old != state.generation:  # stored again after a clear or restart
                self._forget_holding(key, pod, old)
            holders[pod] = state.generation
            held.add(key)
        self._touch(keys)
        while len(self._entries) > self.capacity:
            key, holders = self._entries.popitem(last=False)
            for p, gen in holders.items():
                self._forget_holding(key, p, gen)
            self._counters["evictions"] += 1
        return True

    async def remove(
        self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash]
    ) -> bool:
        if self._current(pod, incarnation) is None:
            return False
        for h in hashes:
            key = (namespace, h)
            holders = self._entries.get(key)
            if holders is None or pod not in holders:
                continue
            self._forget_holding(key, pod, holders.pop(pod))
            if not holders:
                del self._entries[key]
        return True

    async def clear_pod(self, pod: PodId, incarnation: str) -> bool:
        state = self._current(pod, incarnation)
        if state is None:
            return False
        self._retire(pod, state.generation)
        state.generation = self._new_generation(incarnation)
        return True

    async def sweep(self, now: float, max_entries: int) -> int:
        # Soonest expired first, as the Redis index takes them from its lease sorted set.
        expired = heapq.nsmallest(
            max_entries, ((s.expiry, p) for p, s in self._pods.items() if s.expiry <= now)
        )
        for _, pod in expired:
            self._retire(pod, self._pods.pop(pod).generation)
        deleted, budget = 0, max_entries
        while budget > 0 and self._dead:
            pod, gen = self._dead[0]
            held = self._held.get((pod, gen), set())
            batch = [held.pop() for _ in range(min(budget, len(held)))]
            for key in batch:
                holders = self._entries.get(key)
                if holders is not None and holders.get(pod) == gen:
                    del holders[pod]
                    if not holders:
                        del self._entries[key]
                        deleted += 1
            budget -= max(len(batch), 1)
            if not held:
                self._held.pop((pod, gen), None)
                self._dead.popleft()
        return deleted

    async def stats(self, now: float) -> IndexStats:
        live = sum(1 for p in self._pods if self._generation(p, now) is not None)
        return IndexStats(
            len(self._entries),
            self.capacity,
            live_pods=live,
            retired_generations=len(self._dead),
            **self._counters,
        )
