"""The prefix-cache index interface, shared by the in-memory and the Redis implementations.

Model:
- A **block entry** is one chained block hash (``tandem.kv.hashing``) in one namespace (the
  model fingerprint), with the set of pods that hold it. ``capacity`` bounds the number of
  entries; past it the least recently used (by lookup or add) are evicted. Within one call,
  earlier blocks of a chain count as more recently used than later ones, so a prompt's deep
  blocks go before the prefix it shares with others (as the engine's own eviction does).
- A **pod** holds entries under its current *generation*: its incarnation (new at every process
  start) plus an epoch bumped by "cache cleared". Only entries of a pod's current generation
  count, and only while its lease (renewed by heartbeats) is alive: a restarted, cleared or
  silent pod stops counting at once, whatever events were lost. Dead entries are removed lazily
  (``sweep``) and by LRU eviction.
"""

from dataclasses import dataclass
from typing import Protocol

from tandem.ids import PodId
from tandem.kv.hashing import BlockHash


@dataclass(slots=True, frozen=True)
class IndexStats:
    num_entries: int
    capacity: int
    lookups: int
    hit_blocks: int
    evictions: int
    live_pods: int


@dataclass(slots=True, frozen=True)
class Registration:
    """The outcome of a heartbeat."""

    known: bool
    """False when the index had no state for this pod incarnation (first contact, a restart of
    the pod, or the index lost its data): the pod should send its whole cache again."""


class Index(Protocol):
    async def heartbeat(self, pod: PodId, incarnation: str, lease_s: float, now: float) -> Registration:
        """Register or renew a pod's lease; a new incarnation retires the old one's entries."""
        ...

    async def lookup(self, namespace: str, hashes: list[BlockHash], now: float) -> dict[PodId, int]:
        """Per live pod, how many leading blocks of the chain it holds (pods with 0 omitted).

        Stops at the first block that no pod holding every earlier block also holds.
        """
        ...

    async def add(self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash], now: float) -> bool:
        """Record that the pod holds these blocks. False (nothing recorded) for a stale incarnation."""
        ...

    async def remove(self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash]) -> bool:
        """Record that the pod no longer holds these blocks. False for a stale incarnation."""
        ...

    async def clear_pod(self, pod: PodId, incarnation: str) -> bool:
        """Forget everything the pod holds, in one step. False for a stale incarnation."""
        ...

    async def sweep(self, now: float, max_entries: int) -> int:
        """Delete up to ``max_entries`` of the oldest entries that no live pod holds; returns how many."""
        ...

    async def stats(self, now: float) -> IndexStats: ...
