"""The prefix-cache index interface, shared by the in-memory and the Redis implementations.

Model:
- A **block entry** is one chained block hash (``tandem.api.hashing``) in one namespace (the
  model fingerprint), with the set of pods that hold it. ``capacity`` bounds the number of
  entries; past it the least recently used (by lookup or add) are evicted. Within one call,
  earlier blocks of a chain count as more recently used than later ones, so a prompt's deep
  blocks go before the prefix it shares with others (as the engine's own eviction does).
- A **pod** holds entries under its current *generation*: its incarnation (new at every process
  start) plus a serial number that is new at every registration and every "cache cleared" (so a
  generation is never reused). Only entries of a pod's current generation count, and only while
  its lease (renewed by heartbeats) is alive: a restarted, cleared or silent pod stops counting
  at once, whatever events were lost.
- **Incarnations are ordered** as strings (byte order): a process started later must sort higher
  (``tandem.serving.settings`` puts the start time first, fixed width). While a pod's lease is
  alive, a heartbeat from an older incarnation is refused (``superseded``), so a late heartbeat
  of a replaced process cannot take the pod back and two live processes cannot flap.
  NOTE: the order binds only while the registered incarnation's lease is alive; once it lapsed,
  any incarnation may register, so a restarted pod whose clock runs behind (its start time sorts
  lower) waits at most one lease instead of never registering.
- **Cleanup**: every generation keeps the set of entries it holds. A restart, a clear, or a lease
  found expired by ``sweep`` *retires* the generation (and, on expiry, deletes the pod's record:
  its next heartbeat is unknown and it resends its cache); ``sweep`` then drains retired
  generations' sets in bounded batches, wherever their entries sit in LRU order. A block that a
  pod stores again under its new generation leaves the retired one's set, so all sets together
  never hold more than one member per (block, holder): a pod that resyncs often cannot outrun
  the drain. Per-pod state therefore lives only as long as the pod does.
- Incarnations are opaque strings compared whole: they may contain ':' (the generation's serial
  is what follows its last ':').
"""

from dataclasses import dataclass
from typing import Protocol

from tandem.api.ids import BlockHash, PodId


@dataclass(slots=True, frozen=True)
class IndexStats:
    num_entries: int
    capacity: int
    lookups: int
    hit_blocks: int
    evictions: int
    live_pods: int
    retired_generations: int = 0
    """Retired generations whose entries ``sweep`` has still to drain (the sweep's backlog)."""


@dataclass(slots=True, frozen=True)
class Registration:
    """The outcome of a heartbeat."""

    known: bool
    """False when the index had no state for this pod incarnation (first contact, a restart of
    the pod, a lease that expired and was swept, or the index lost its data): the pod should
    send its whole cache again."""
    superseded: bool = False
    """True when a newer incarnation of the pod holds a live lease: nothing was renewed, and this
    process's events are ignored until that lease lapses."""


class Index(Protocol):
    async def heartbeat(
        self, pod: PodId, incarnation: str, lease_s: float, now: float
    ) -> Registration:
        """Register or renew a pod's lease; a newer incarnation retires the old one's entries.

        An incarnation older than the registered one is refused while the registered lease is
        alive; once it lapsed, any incarnation may register.
        """
        ...

    async def lookup(self, namespace: str, hashes: list[BlockHash], now: float) -> dict[PodId, int]:
        """Per live pod, how many leading blocks of the chain it holds (pods with 0 omitted).

        Stops at the first block that no pod holding every earlier block also holds.
        """
        ...

    async def add(
        self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash], now: float
    ) -> bool:
        """Record that the pod holds these blocks. False (nothing recorded) for a stale
        incarnation."""
        ...

    async def remove(
        self, namespace: str, pod: PodId, incarnation: str, hashes: list[BlockHash]
    ) -> bool:
        """Record that the pod no longer holds these blocks. False for a stale incarnation."""
        ...

    async def clear_pod(self, pod: PodId, incarnation: str) -> bool:
        """Forget everything the pod holds, in one step. False for a stale incarnation."""
        ...

    async def sweep(self, now: float, max_entries: int) -> int:
        """Retire pods whose lease expired, then drain retired generations' entries.

        At most ``max_entries`` pods are retired and ``max_entries`` holdings examined per call
        (one bounded step; call it periodically). Returns how many entries were deleted (an
        entry still held by another pod loses only the dead holder).
        """
        ...

    async def stats(self, now: float) -> IndexStats: ...
