"""Block manager: allocation of KV blocks, reference counts, prefix caching, eviction order.

Each request owns a block table (a list of blocks, append-only while the request lives), mirrored
as an int64 array of block ids that the runner gathers into a step's table in one write. A full
block whose KV has been computed is registered under its chained hash; another request whose
prompt starts with the same tokens reuses it (reference count > 1). When the last owner lets go,
a registered block is not wiped: it stays in an LRU set of *evictable* blocks and is handed out
again only when no never-cached block is free.

Invariants (pinned by tests/unit/engine/test_block_manager.py):
- every block is in exactly one place: free (uncached), evictable (cached, ref 0), or owned
  (ref > 0); a block's ref count equals the number of requests whose table holds it;
- a hash maps to at most one block, and that block carries the hash;
- a cache hit never covers a prompt's last token (its logits must be computed);
- freeing walks the block table in reverse, so a finished request's deepest blocks are evicted
  before its shared prefix;
- a request never writes into a block another request holds, nor into a cached one: ``fork``
  shares a request's blocks with another, partial last block included, and the first write
  into that block copies it first (copy-on-write; ``take_copies`` hands the copies to the
  runner, which makes them before the step's forward).
"""

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tandem.api.ids import BlockHash, BlockId, RequestId
from tandem.api.kv_events import BlocksRemoved, BlocksStored, CacheCleared, KVEvent

_NO_BLOCKS = np.empty(0, dtype=np.int64)
_NO_BLOCKS.flags.writeable = False


@dataclass(slots=True, eq=False)
class KVBlock:
    """One physical block: its id, how many requests hold it, and its hash once cached."""

    block_id: BlockId
    ref_count: int = 0
    block_hash: BlockHash | None = None


@dataclass(slots=True, frozen=True)
class CachedPrefix:
    """The cached leading blocks of a sequence, found by ``find_cached_prefix``."""

    blocks: tuple[KVBlock, ...]
    num_tokens: int
    """Tokens covered by ``blocks``."""
    num_query_tokens: int
    """Tokens of the sequence that was looked up (for hit-rate counters)."""


@dataclass(slots=True)
class PrefixCacheStats:
    """Counters in tokens, as vLLM's ``prefix_cache_queries`` / ``prefix_cache_hits``."""

    queries: int = 0
    hits: int = 0


class BlockManager:
    """Owns the pool of KV blocks of one engine (block ids index the KV cache tensors)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        enable_kv_events: bool = False,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._enable_kv_events = enable_kv_events
        self._blocks = [KVBlock(BlockId(i)) for i in range(num_blocks)]
        self._free: deque[KVBlock] = deque(self._blocks)
        self._evictable: OrderedDict[BlockId, KVBlock] = OrderedDict()
        """Cached blocks no request holds, least recently released first."""
        self._cached: dict[BlockHash, KVBlock] = {}
        self._tables: dict[RequestId, list[KVBlock]] = {}
        self._ids: dict[RequestId, np.ndarray] = {}
        """Each table's block ids (a buffer with spare room at the end; the first len(table)
        count)."""
        self._num_hashed: dict[RequestId, int] = {}
        """How many leading blocks of a request's table have been offered to the cache."""
        self._events: list[KVEvent] = []
        self.stats = PrefixCacheStats()
        self._forked: dict[RequestId, int] = {}
        """Requests whose table shares a block they may still write (``fork``): the block's
        index in the table, checked for copy-on-write when a write starts in it."""
        self._copies: list[tuple[BlockId, BlockId]] = []
        """(source, destination) block copies due before the next step's forward."""

    # ---- pool state -------------------------------------------------------------------------

    @property
    def num_total_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: never-cached ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vLLM's kv_cache_usage_perc, as a fraction)."""
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return math.ceil(num_tokens / self.block_size)

    def block_ids(self, request_id: RequestId) -> np.ndarray:
        """The request's block ids in token order: a read-only int64 array (empty if it holds none).

        A snapshot: the table only grows at its end, so later allocations never change it.
        """
        table = self._tables.get(request_id)
        if not table:
            return _NO_BLOCKS
        ids = self._ids[request_id][: len(table)]
        ids.flags.writeable = False
        return ids

    def holds(self, request_id: RequestId) -> bool:
        """Whether the request currently owns a block table."""
        return request_id in self._tables

    # ---- prefix cache -----------------------------------------------------------------------

    def find_cached_prefix(
        self, block_hashes: Sequence[BlockHash], num_tokens: int
    ) -> CachedPrefix:
        """Longest run of leading blocks whose hashes are cached, leaving the last token uncached.

        Changes nothing; pass the result to ``allocate`` in the same step to take the blocks.
        """
        found: list[KVBlock] = []
        if self.enable_prefix_caching:
            # The last token must be computed to produce logits, so a hit stops one token short.
            max_blocks = (num_tokens - 1) // self.block_size
            for h in block_hashes[:max_blocks]:
                block = self._cached.get(h)
                if block is None:
                    break
                found.append(block)
        return CachedPrefix(tuple(found), len(found) * self.block_size, num_tokens)

    def cache_full_blocks(
        self, request_id: RequestId, block_hashes: Sequence[BlockHash], num_computed_tokens: int
    ) -> None:
        """Register the request's blocks that became full and computed under their hashes.

        A block whose hash is already cached elsewhere (two requests computed the same prefix at
        once) stays private to its request and is freed as an ordinary block.
        """
        if not self.enable_prefix_caching:
            return
        table = self._tables[request_id]
        start = self._num_hashed[request_id]
        end = min(num_computed_tokens // self.block_size, len(block_hashes), len(table))
        stored = []
        for i in range(start, end):
            block, h = table[i], block_hashes[i]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = block
                stored.append(h)
        if end > start:
            self._num_hashed[request_id] = end
        if stored and self._enable_kv_events:
            self._events.append(BlocksStored(tuple(stored)))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Only possible while no request holds blocks."""
        if self.num_free_blocks != self.num_total_blocks:
            return False
        for block in self._evictable.values():
            block.block_hash = None
            self._free.append(block)
        self._evictable.clear()
        self._cached.clear()
        if self._enable_kv_events:
            self._events.append(CacheCleared())
        return True

    def cached_hashes(self) -> list[BlockHash]:
        """Every block hash the cache can serve now (for a full resync of an external index)."""
        return list(self._cached)

    def take_events(self) -> list[KVEvent]:
        """KV events since the last call (recorded only with ``enable_kv_events``)."""
        events, self._events = self._events, []
        return events

    # ---- allocation -------------------------------------------------------------------------

    def allocate(
        self,
        request_id: RequestId,
        num_tokens: int,
        cached_prefix: CachedPrefix | None = None,
        *,
        keep_free: int = 0,
        record_stats: bool = False,
        write_from: int | None = None,
    ) -> bool:
        """Grow the request's block table to hold ``num_tokens`` tokens; all or nothing.

        ``cached_prefix`` is given on a request's first allocation only: its blocks become the
        head of the table (shared, ref count + 1). ``record_stats`` counts the lookup toward the
        hit rate (once per request: re-admissions after preemption would inflate it).
        ``keep_free`` blocks must remain free afterwards (admission headroom). ``write_from``:
        the first position the coming step writes; a shared block written from there is
        copied first (copy-on-write, one more block).

        Returns:
            False, changing nothing, when too few blocks are free.
        """
        table = self._tables.get(request_id)
        cow = None
        if write_from is not None and request_id in self._forked:
            cow = self._shared_write(request_id, write_from)
        if table and cached_prefix is None and cow is None and keep_free <= self.num_free_blocks:
            # The common case, a running sequence that still has room in its last block.
            if self.blocks_needed(num_tokens) <= len(table):
                return True
        prefix = cached_prefix.blocks if cached_prefix is not None else ()
        assert not (table and prefix), (
            "a cached prefix is only taken at a request's first allocation"
        )
        have = len(table) if table else len(prefix)
        need = max(0, self.blocks_needed(num_tokens) - have)
        copies = 1 if cow is not None else 0
        # Idle prefix blocks sit in the evictable set: taking them makes them unavailable too.
        idle_prefix = sum(1 for b in prefix if b.ref_count == 0)
        if need + copies + idle_prefix + keep_free > self.num_free_blocks:
            return False
        if cow is not None:
            self._copy_on_write(request_id, cow)
            table = self._tables[request_id]
        if table is None:
            table = self._tables[request_id] = []
            self._num_hashed[request_id] = len(prefix)
            if cached_prefix is not None and record_stats:
                self.stats.queries += cached_prefix.num_query_tokens
                self.stats.hits += cached_prefix.num_tokens
        start = len(table)
        for block in prefix:
            if block.ref_count == 0:
                del self._evictable[block.block_id]
            block.ref_count += 1
            table.append(block)
        for _ in range(need):
            table.append(self._take_free_block())
        self._record_ids(request_id, table, start)
        return True

    def fork(
        self,
        parent_id: RequestId,
        child_id: RequestId,
        num_tokens: int,
        *,
        record_stats: bool = False,
    ) -> None:
        """Give ``child_id`` the blocks holding ``parent_id``'s first ``num_tokens`` tokens, by
        reference (a parallel-sampling request's samples share the prompt's KV, its partial
        last block included). Whichever of the two later writes into a block they share copies
        it first (``allocate(write_from=...)``). ``child_id`` must hold no blocks yet.
        ``record_stats`` counts the fork as a prefix-cache query whose tokens all hit but the
        last (which the child computes for its logits): reuse the hit rate should show (with
        prefix caching on; off, nothing counts as a hit)."""
        assert child_id not in self._tables, "a fork creates the child's table"
        if record_stats and self.enable_prefix_caching:
            self.stats.queries += num_tokens
            self.stats.hits += num_tokens - 1
        table = self._tables[parent_id][: self.blocks_needed(num_tokens)]
        for block in table:
            block.ref_count += 1
        self._tables[child_id] = list(table)
        self._num_hashed[child_id] = min(self._num_hashed[parent_id], len(table))
        self._record_ids(child_id, self._tables[child_id], 0)
        if table:
            last = len(table) - 1
            self._forked[child_id] = last
            self._forked.setdefault(parent_id, last)

    def would_copy(self, request_id: RequestId, write_from: int) -> bool:
        """Whether writing from ``write_from`` would copy a shared block first (changes
        nothing)."""
        if request_id not in self._forked:
            return False
        index = self._forked[request_id]
        if write_from // self.block_size != index:
            return False
        block = self._tables[request_id][index]
        return block.ref_count > 1 or block.block_hash is not None

    def _shared_write(self, request_id: RequestId, write_from: int) -> int | None:
        """The index of a block the request must copy before writing from ``write_from``, if
        any: its forked block, while another request holds it or the prefix cache serves it."""
        index = self._forked[request_id]
        if write_from // self.block_size > index:
            del self._forked[request_id]  # writes are past the shared block for good
            return None
        return index if self.would_copy(request_id, write_from) else None

    def _copy_on_write(self, request_id: RequestId, index: int) -> None:
        """Replace the request's shared block ``index`` by a private copy (made by the runner
        before the next forward: ``take_copies``)."""
        table = self._tables[request_id]
        shared = table[index]
        shared.ref_count -= 1
        if shared.ref_count == 0:  # a cached block nobody else holds
            if shared.block_hash is not None:
                self._evictable[shared.block_id] = shared
            else:
                self._free.append(shared)
        copy = self._take_free_block()
        table[index] = copy
        self._copies.append((shared.block_id, copy.block_id))
        del self._forked[request_id]
        # A fresh id array: snapshots handed to steps still in flight must not change.
        ids = self._ids[request_id]
        self._ids[request_id] = ids.copy()
        self._ids[request_id][index] = copy.block_id

    def take_copies(self) -> list[tuple[BlockId, BlockId]]:
        """Copy-on-write copies (source, destination) due before the next step's forward."""
        copies, self._copies = self._copies, []
        return copies

    def _record_ids(self, request_id: RequestId, table: list[KVBlock], start: int) -> None:
        """Mirror ``table[start:]`` into the request's id array, growing it by doubling."""
        ids = self._ids.get(request_id)
        if ids is None or len(ids) < len(table):
            grown = np.empty(
                max(16, len(table), 2 * (len(ids) if ids is not None else 0)), dtype=np.int64
            )
            if ids is not None:
                grown[:start] = ids[:start]
            ids = self._ids[request_id] = grown  # views handed out earlier keep the old buffer
        ids[start : len(table)] = [b.block_id for b in table[start:]]

    def free(self, request_id: RequestId) -> None:
        """Release all of the request's blocks (no-op if it holds none).

        Walks the table in reverse so that, among the released cached blocks, the deepest ones
        are least recently used and evicted first while the shared head stays longest.
        """
        table = self._tables.pop(request_id, None)
        self._ids.pop(request_id, None)
        self._num_hashed.pop(request_id, None)
        self._forked.pop(request_id, None)
        if self._copies and table:  # a copy into a block freed before its step ran: not needed
            held = {b.block_id for b in table}
            self._copies = [c for c in self._copies if c[1] not in held]
        for block in reversed(table or ()):
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._evictable[block.block_id] = block
                else:
                    self._free.append(block)

    def _take_free_block(self) -> KVBlock:
        if self._free:
            block = self._free.popleft()
        else:
            _, block = self._evictable.popitem(last=False)
            del self._cached[block.block_hash]
            if self._enable_kv_events:
                self._events.append(BlocksRemoved((block.block_hash,)))
            block.block_hash = None
        block.ref_count = 1
        return block
