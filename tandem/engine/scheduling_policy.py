"""Scheduling policies: the order of the waiting queue and the choice of preemption victims.

A policy maps a sequence to a sort key; a smaller key is served first and preempted last. Policies
are registered by name so that configs and requests can name them::

    class LongestWaitFirst:
        name = "longest-wait-first"
        def sort_key(self, seq): return (seq.arrival_time, seq.arrival_index)

    register_scheduling_policy(LongestWaitFirst())
    LLM(model, scheduling_policy="longest-wait-first")
"""

import heapq
from collections.abc import Iterator
from typing import Any, Protocol

from tandem.api.ids import RequestId
from tandem.engine.sequence import Sequence


class SchedulingPolicy(Protocol):
    name: str

    def sort_key(self, seq: Sequence) -> tuple[Any, ...]:
        """Smaller keys are scheduled first and preempted last. Must be fixed for a sequence."""
        ...


class FCFS:
    """First come, first served."""

    name = "fcfs"

    def sort_key(self, seq: Sequence) -> tuple[Any, ...]:
        return (seq.arrival_index,)


class Priority:
    """By the request's ``priority`` (lower value first, as vLLM), then arrival."""

    name = "priority"

    def sort_key(self, seq: Sequence) -> tuple[Any, ...]:
        return (seq.priority, seq.arrival_index)


class ShortestPromptFirst:
    """Shortest prompt first (minimises mean waiting time), then arrival."""

    name = "shortest-prompt-first"

    def sort_key(self, seq: Sequence) -> tuple[Any, ...]:
        return (seq.num_prompt_tokens, seq.arrival_index)


_REGISTRY: dict[str, SchedulingPolicy] = {}


def register_scheduling_policy(policy: SchedulingPolicy) -> None:
    """Make ``policy`` available under ``policy.name`` (replacing any policy of that name)."""
    if not getattr(policy, "name", None) or not callable(getattr(policy, "sort_key", None)):
        raise TypeError("a scheduling policy needs a `name` and a `sort_key(seq)` method")
    _REGISTRY[policy.name] = policy


def get_scheduling_policy(name: str) -> SchedulingPolicy:
    """The registered policy called ``name`` (ValueError listing the known ones otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown scheduling policy {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


for _policy in (FCFS(), Priority(), ShortestPromptFirst()):
    register_scheduling_policy(_policy)


class WaitingQueue:
    """Sequences waiting for admission, served in policy order.

    A heap with lazy deletion: ``remove`` marks an entry dead; dead entries are dropped when
    they reach the top.
    """

    def __init__(self, policy: SchedulingPolicy) -> None:
        self._policy = policy
        self._heap: list[tuple[tuple[Any, ...], int, Sequence]] = []
        self._live: dict[RequestId, Sequence] = {}

    def push(self, seq: Sequence) -> None:
        """Queue ``seq`` at its policy position."""
        self._live[seq.request_id] = seq
        heapq.heappush(self._heap, (self._policy.sort_key(seq), seq.arrival_index, seq))

    def peek(self) -> Sequence | None:
        """The next sequence to admit, left in the queue."""
        self._drop_dead()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> Sequence:
        """Remove and return the next sequence to admit."""
        self._drop_dead()
        seq = heapq.heappop(self._heap)[2]
        del self._live[seq.request_id]
        return seq

    def remove(self, request_id: RequestId) -> Sequence | None:
        """Take a sequence out wherever it is (lazily deleted from the heap)."""
        return self._live.pop(request_id, None)

    def _drop_dead(self) -> None:
        heap = self._heap
        while heap and self._live.get(heap[0][2].request_id) is not heap[0][2]:
            heapq.heappop(heap)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._live

    def unordered(self) -> Iterator[Sequence]:
        """Live sequences in no particular order (cheap)."""
        return iter(self._live.values())

    def __iter__(self) -> Iterator[Sequence]:
        """Live sequences in policy order (a sorted copy; for inspection, not the hot path)."""
        return iter(
            sorted(self._live.values(), key=lambda s: (self._policy.sort_key(s), s.arrival_index))
        )
