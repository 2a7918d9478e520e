"""In-memory Index: the reference implementation (one process, tests, Redis-less set-ups)."""

import itertools
from collections import OrderedDict

from services.kvstore.index import IndexStats, Registration
from tandem.ids import PodId
from tandem.kv.hashing import BlockHash


class MemoryIndex:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # (namespace, hash) -> {pod: generation}, in LRU order (least recently used first).
        self._entries: OrderedDict[tuple[str, BlockHash], dict[PodId, str]] = OrderedDict()
        self._pods: dict[PodId, tuple[str, int, float]] = {}
        """pod -> (incarnation, clear epoch, lease expiry)."""
        self._counters = {"lookups": 0, "hit_blocks": 0, "evictions": 0}

    def _generation(self, pod: PodId, now: float) -> str | None:
        state = self._pods.get(pod)
        if state is None or state[2] <= now:
            return None
        return f"{state[0]}:{state[1]}"

    def _current(self, pod: PodId, incarnation: str) -> bool:
        state = self._pods.get(pod)
        return state is not None and state[0] == incarnation

    async def heartbeat(self, pod: PodId, incarnation: str, lease_s: float, now: float) -> Registration:
        state = self._pods.get(pod)
        known = state is not None and state[0] == incarnation
        epoch = state[1] if known else 0
        self._pods[pod] = (incarnation, epoch, now + lease_s)
        return Registration(known=known)

    def _touch(self, keys: list[tuple[str, BlockHash]]) -> None:
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

    async def add(self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash], now: float) -> bool:
        if not self._current(pod, incarnation):
            return False
        generation = f"{incarnation}:{self._pods[pod][1]}"
        keys = [(namespace, h) for h in hashes]
        for key in keys:
            self._entries.setdefault(key, {})[pod] = generation
        self._touch(keys)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self._counters["evictions"] += 1
        return True

    async def remove(self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash]) -> bool:
        if not self._current(pod, incarnation):
            return False
        for h in hashes:
            holders = self._entries.get((namespace, h))
            if holders is not None:
                holders.pop(pod, None)
                if not holders:
                    del self._entries[(namespace, h)]
        return True

    async def clear_pod(self, pod: PodId, incarnation: str) -> bool:
        if not self._current(pod, incarnation):
            return False
        inc, epoch, expiry = self._pods[pod]
        self._pods[pod] = (inc, epoch + 1, expiry)
        return True

    async def sweep(self, now: float, max_entries: int) -> int:
        dead = 0
        for key, holders in list(itertools.islice(self._entries.items(), max_entries)):
            for pod in [p for p, gen in holders.items() if self._generation(p, now) != gen]:
                del holders[pod]
            if not holders:
                del self._entries[key]
                dead += 1
        return dead

    async def stats(self, now: float) -> IndexStats:
        live = sum(1 for p in self._pods if self._generation(p, now) is not None)
        return IndexStats(len(self._entries), self.capacity, live_pods=live, **self._counters)
