"""Block manager: exact block ids, ref counts, eviction order, hit lengths, invariants."""

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tandem.api.hashing import BlockHasher
from tandem.api.ids import RequestId
from tandem.api.kv_events import BlocksRemoved, BlocksStored, CacheCleared
from tandem.engine.block_manager import BlockManager

BS = 4
HASHER = BlockHasher("test-model", BS)


def admit(bm: BlockManager, rid: str, tokens: list[int]) -> tuple[list[int], int]:
    """Look up, allocate and fully 'compute' a prompt, as the scheduler would."""
    hashes = HASHER.hash_prompt(tokens)
    prefix = bm.find_cached_prefix(hashes, len(tokens))
    assert bm.allocate(RequestId(rid), len(tokens), prefix, record_stats=True)
    bm.cache_full_blocks(RequestId(rid), hashes, len(tokens))
    return bm.block_ids(RequestId(rid)).tolist(), prefix.num_tokens


def ref_counts(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm._blocks]


def check_invariants(bm: BlockManager) -> None:
    free_ids = [b.block_id for b in bm._free]
    evictable_ids = list(bm._evictable)
    owners: dict[int, int] = {}
    for table in bm._tables.values():
        for b in table:
            owners[b.block_id] = owners.get(b.block_id, 0) + 1
    assert len(set(free_ids)) == len(free_ids)
    assert not set(free_ids) & set(evictable_ids), "a block is both free and evictable"
    assert not (set(free_ids) | set(evictable_ids)) & set(owners), "a block is both free and owned"
    assert len(free_ids) + len(evictable_ids) + len(owners) == bm.num_total_blocks
    for rid, table in bm._tables.items():
        assert bm.block_ids(rid).tolist() == [b.block_id for b in table], (
            "the id array mirrors the table"
        )
    for b in bm._blocks:
        assert b.ref_count >= 0
        assert b.ref_count == owners.get(b.block_id, 0)
        if b.block_id in evictable_ids:
            assert b.block_hash is not None and bm._cached[b.block_hash] is b
        if b.block_id in free_ids:
            assert b.block_hash is None
    for h, b in bm._cached.items():
        assert b.block_hash == h


def test_fresh_allocation_hands_out_ids_in_order():
    bm = BlockManager(8, BS)
    assert admit(bm, "a", list(range(10)))[0] == [0, 1, 2]
    assert admit(bm, "b", list(range(100, 105)))[0] == [3, 4]
    assert ref_counts(bm) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert bm.num_free_blocks == 3
    check_invariants(bm)


def test_allocation_is_all_or_nothing():
    bm = BlockManager(3, BS)
    assert not bm.allocate(RequestId("a"), 13)  # needs 4 blocks
    assert bm.num_free_blocks == 3 and not bm.holds(RequestId("a"))
    assert bm.allocate(RequestId("a"), 12)
    assert not bm.allocate(RequestId("a"), 13)
    assert bm.block_ids(RequestId("a")).tolist() == [0, 1, 2]


def test_block_tables_are_append_only():
    bm = BlockManager(8, BS)
    assert bm.allocate(RequestId("a"), 3)
    assert bm.block_ids(RequestId("a")).tolist() == [0]
    assert bm.allocate(RequestId("b"), 4)
    assert bm.allocate(RequestId("a"), 9)
    assert bm.block_ids(RequestId("a")).tolist() == [0, 2, 3]


def test_block_ids_are_read_only_snapshots_that_growth_does_not_change():
    bm = BlockManager(64, BS)
    assert bm.block_ids(RequestId("a")).tolist() == []
    assert bm.allocate(RequestId("a"), 3)
    first = bm.block_ids(RequestId("a"))
    with pytest.raises(ValueError):
        first[0] = 5  # callers get a view of the manager's array: it must not be writable
    assert bm.allocate(RequestId("b"), 4)
    assert bm.allocate(RequestId("a"), 4 * 40)  # grows past the array's first capacity (16)
    assert first.tolist() == [0]
    grown = bm.block_ids(RequestId("a"))
    assert grown.tolist() == [0] + list(range(2, 41)) and grown.dtype == np.int64
    bm.free(RequestId("a"))
    assert grown.tolist() == [0] + list(range(2, 41))  # a snapshot outlives the table
    assert bm.block_ids(RequestId("a")).tolist() == []
    assert bm.allocate(RequestId("a"), 5)
    assert len(bm.block_ids(RequestId("a"))) == 2
    check_invariants(bm)


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(8, BS)
    prompt = list(range(12))
    ids_a, cached_a = admit(bm, "a", prompt)
    ids_b, cached_b = admit(bm, "b", prompt[:8] + [99, 98, 97])
    assert cached_a == 0
    assert cached_b == 8
    assert ids_b[:2] == ids_a[:2] == [0, 1]
    assert ids_b[2] == 3
    assert ref_counts(bm)[:4] == [2, 2, 1, 1]
    assert (bm.stats.queries, bm.stats.hits) == (12 + 11, 8)
    check_invariants(bm)


def test_hit_never_covers_the_last_prompt_token():
    bm = BlockManager(8, BS)
    prompt = list(range(8))
    admit(bm, "a", prompt)
    bm.free(RequestId("a"))
    # Both blocks are cached, but the second holds the last token: only the first is reused.
    hashes = HASHER.hash_prompt(prompt)
    assert bm.find_cached_prefix(hashes, 8).num_tokens == 4
    assert bm.find_cached_prefix(hashes, 9).num_tokens == 8


def test_hit_stops_at_first_miss_and_respects_salt():
    bm = BlockManager(8, BS)
    prompt = list(range(12))
    admit(bm, "a", prompt)
    changed = prompt[:4] + [0] + prompt[5:] + [1]
    assert bm.find_cached_prefix(HASHER.hash_prompt(changed), 13).num_tokens == 4
    salted = HASHER.hash_prompt(prompt + [1], cache_salt="tenant-b")
    assert bm.find_cached_prefix(salted, 13).num_tokens == 0


def test_free_keeps_cached_blocks_and_evicts_tail_first():
    bm = BlockManager(4, BS)
    admit(bm, "a", list(range(12)))  # blocks 0, 1, 2 cached
    bm.free(RequestId("a"))
    assert ref_counts(bm) == [0, 0, 0, 0]
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == 4
    # Never-cached block 3 goes first; then cached blocks, deepest (2) first, shared head last.
    assert bm.allocate(RequestId("b"), 4)
    assert bm.block_ids(RequestId("b")).tolist() == [3]
    assert bm.allocate(RequestId("c"), 4)
    assert bm.block_ids(RequestId("c")).tolist() == [2]
    assert bm.allocate(RequestId("d"), 4)
    assert bm.block_ids(RequestId("d")).tolist() == [1]
    assert bm.num_cached_blocks == 1
    check_invariants(bm)


def test_lru_order_follows_release_time():
    bm = BlockManager(4, BS)
    admit(bm, "a", list(range(4)) + [7])  # block 0 cached (a's 2nd block is partial)
    admit(bm, "b", list(range(100, 104)) + [7])  # block 2 cached
    bm.free(RequestId("b"))
    bm.free(RequestId("a"))
    # Uncached partial blocks 3, 1 are reused first, then LRU: b's block 2 before a's block 0.
    order = []
    for i in range(4):
        assert bm.allocate(RequestId(f"x{i}"), 1)
        order += bm.block_ids(RequestId(f"x{i}")).tolist()
    assert order == [3, 1, 2, 0]


def test_reusing_an_evictable_block_removes_it_from_the_free_count():
    bm = BlockManager(3, BS)
    prompt = list(range(9))
    admit(bm, "a", prompt)
    bm.free(RequestId("a"))
    assert bm.num_free_blocks == 3
    ids, cached = admit(bm, "b", prompt)
    assert cached == 8 and ids == [0, 1, 2]
    assert bm.num_free_blocks == 0
    check_invariants(bm)


def test_allocation_counts_idle_prefix_blocks_as_taken():
    bm = BlockManager(3, BS)
    prompt = list(range(9))
    admit(bm, "a", prompt)
    bm.free(RequestId("a"))
    hashes = HASHER.hash_prompt(prompt)
    prefix = bm.find_cached_prefix(hashes, 9)
    assert prefix.num_tokens == 8
    # 2 idle prefix blocks + 2 new ones > 3 free: refused without side effects.
    assert not bm.allocate(RequestId("b"), 16, prefix)
    assert bm.num_free_blocks == 3 and ref_counts(bm) == [0, 0, 0]
    check_invariants(bm)


def test_duplicate_content_stays_private():
    bm = BlockManager(8, BS)
    prompt = list(range(8)) + [5]
    hashes = HASHER.hash_prompt(prompt)
    # Both admitted before either computed anything: no hit for the second.
    assert bm.allocate(RequestId("a"), 9, bm.find_cached_prefix(hashes, 9))
    assert bm.allocate(RequestId("b"), 9, bm.find_cached_prefix(hashes, 9))
    bm.cache_full_blocks(RequestId("a"), hashes, 9)
    bm.cache_full_blocks(RequestId("b"), hashes, 9)
    assert bm.num_cached_blocks == 2
    bm.free(RequestId("b"))
    assert [b.block_id for b in bm._free][-3:] == [5, 4, 3]  # b's blocks went back uncached
    check_invariants(bm)


def test_only_computed_blocks_are_cached():
    bm = BlockManager(8, BS)
    tokens = list(range(12))
    hashes = HASHER.hash_prompt(tokens)
    assert bm.allocate(RequestId("a"), 6)
    bm.cache_full_blocks(RequestId("a"), hashes, 6)
    assert bm.num_cached_blocks == 1
    assert bm.allocate(RequestId("a"), 12)
    bm.cache_full_blocks(RequestId("a"), hashes, 12)
    assert bm.num_cached_blocks == 3


def test_events_report_stores_evictions_and_clears():
    bm = BlockManager(2, BS, enable_kv_events=True)
    h = HASHER.hash_prompt(list(range(8)))
    admit(bm, "a", list(range(8)))
    assert bm.take_events() == [BlocksStored(tuple(h))]
    bm.free(RequestId("a"))
    assert bm.allocate(RequestId("b"), 4)
    assert bm.take_events() == [BlocksRemoved((h[1],))]
    assert not bm.reset_prefix_cache()  # b holds a block
    bm.free(RequestId("b"))
    assert bm.reset_prefix_cache()
    assert bm.take_events() == [CacheCleared()]
    assert bm.num_cached_blocks == 0 and bm.take_events() == []


def test_events_off_by_default():
    bm = BlockManager(2, BS)
    admit(bm, "a", list(range(8)))
    assert bm.take_events() == []


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    admit(bm, "a", list(range(9)))
    bm.free(RequestId("a"))
    _, cached = admit(bm, "b", list(range(9)))
    assert cached == 0 and bm.num_cached_blocks == 0


def test_fork_shares_every_block_and_the_first_write_copies_the_shared_one():
    bm = BlockManager(8, BS)
    lead, sample = RequestId("lead"), RequestId("sample")
    table, _ = admit(bm, "lead", list(range(10)))  # 2 full blocks and 2 tokens
    bm.fork(lead, sample, 10)
    assert bm.block_ids(sample).tolist() == table
    assert [bm._blocks[b].ref_count for b in table] == [2, 2, 2]
    assert bm.num_free_blocks == 5
    # The sample recomputes token 9, in the shared partial block: it gets a copy first.
    assert bm.would_copy(sample, 9) and bm.would_copy(lead, 10) and not bm.would_copy(lead, 12)
    assert bm.allocate(sample, 10, write_from=9)
    copy = bm.block_ids(sample).tolist()[2]
    assert copy not in table and bm.take_copies() == [(table[2], copy)]
    assert [bm._blocks[b].ref_count for b in table] == [2, 2, 1]
    assert not bm.would_copy(lead, 10)
    # The lead writes last into the original: no copy, and nothing more shared is written.
    assert bm.allocate(lead, 11, write_from=10)
    assert bm.block_ids(lead).tolist() == table and bm.take_copies() == []
    check_invariants(bm)
    bm.free(lead)
    bm.free(sample)
    assert bm.num_free_blocks == 8
    check_invariants(bm)


def test_block_ids_handed_out_before_a_copy_do_not_change():
    bm = BlockManager(8, BS)
    admit(bm, "lead", list(range(6)))
    bm.fork(RequestId("lead"), RequestId("sample"), 6)
    before = bm.block_ids(RequestId("sample"))
    assert bm.allocate(RequestId("sample"), 6, write_from=5)
    assert before.tolist() != bm.block_ids(RequestId("sample")).tolist()
    assert before.tolist() == bm.block_ids(RequestId("lead")).tolist()


def test_a_cached_full_block_is_copied_before_a_sample_rewrites_its_last_token():
    bm = BlockManager(8, BS)
    table, _ = admit(bm, "lead", list(range(8)))  # 2 full blocks, both cached
    bm.fork(RequestId("lead"), RequestId("sample"), 8)
    bm.free(RequestId("lead"))  # the sample holds them alone now, but the cache serves them
    assert bm.allocate(RequestId("sample"), 8, write_from=7)
    new = bm.block_ids(RequestId("sample")).tolist()
    assert new[0] == table[0] and new[1] != table[1]
    assert bm.take_copies() == [(table[1], new[1])]
    assert table[1] in bm._evictable  # still served to the next prompt that starts the same
    check_invariants(bm)


def test_a_copy_needs_a_free_block_and_takes_nothing_without_one():
    bm = BlockManager(3, BS)
    table, _ = admit(bm, "lead", list(range(10)))
    bm.fork(RequestId("lead"), RequestId("sample"), 10)
    assert not bm.allocate(RequestId("sample"), 10, write_from=9)
    assert bm.block_ids(RequestId("sample")).tolist() == table and bm.take_copies() == []
    check_invariants(bm)


def test_a_copy_into_a_block_freed_before_its_step_is_dropped():
    bm = BlockManager(8, BS)
    admit(bm, "lead", list(range(6)))
    bm.fork(RequestId("lead"), RequestId("sample"), 6)
    assert bm.allocate(RequestId("sample"), 6, write_from=5)
    bm.free(RequestId("sample"))  # preempted in the same schedule
    assert bm.take_copies() == []
    check_invariants(bm)


class AllocatorMachine(RuleBasedStateMachine):
    """Random admissions, partial computes, growth and frees keep every invariant.

    A shadow map records which tokens each block held when it was cached, so a hit that hands
    out a block with other content, or caching a block before its tokens are computed, fails.
    """

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(12, BS, enable_kv_events=True)
        self.live: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.content: dict[int, tuple[int, ...]] = {}
        self.n = 0

    @rule(
        prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
        extra=st.integers(1, 12),
    )
    def admit(self, prefix, extra):
        rid = f"r{self.n}"
        self.n += 1
        tokens = prefix + [self.n * 100 + i for i in range(extra)]
        hashes = HASHER.hash_prompt(tokens)
        cached = self.bm.find_cached_prefix(hashes, len(tokens))
        for i, block in enumerate(cached.blocks):
            assert self.content[block.block_id] == tuple(tokens[i * BS : (i + 1) * BS])
        assert cached.num_tokens < len(tokens)
        if self.bm.allocate(RequestId(rid), len(tokens), cached):
            self.live[rid] = tokens
            self.computed[rid] = cached.num_tokens

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        tokens = self.live[rid]
        upto = data.draw(st.integers(self.computed[rid], len(tokens)))
        self.computed[rid] = upto
        before = {b.block_id: b.block_hash for b in self.bm._tables[RequestId(rid)]}
        self.bm.cache_full_blocks(RequestId(rid), HASHER.hash_prompt(tokens), upto)
        for i, block in enumerate(self.bm._tables[RequestId(rid)]):
            if block.block_hash is not None and before[block.block_id] is None:
                assert i < upto // BS, "a block was cached before all its tokens were computed"
                self.content[block.block_id] = tuple(tokens[i * BS : (i + 1) * BS])

    @precondition(lambda self: self.live)
    @rule(data=st.data(), more=st.integers(1, 6))
    def grow(self, data, more):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        start = self.computed[rid]
        end = len(self.live[rid]) + more
        if self.bm.allocate(RequestId(rid), end, write_from=start):
            self.live[rid] = self.live[rid] + [7] * more
            # Copy-on-write: every block the coming writes touch is this request's alone.
            table = self.bm._tables[RequestId(rid)]
            for block in table[start // BS : self.bm.blocks_needed(end)]:
                assert block.ref_count == 1 and block.block_hash is None, "a shared write"
            for src, dst in self.bm.take_copies():
                if src in self.content:
                    self.content[dst] = self.content[src]  # what the runner's copy carries

    @precondition(lambda self: any(self.computed[r] == len(t) for r, t in self.live.items()))
    @rule(data=st.data())
    def fork(self, data):
        """A sample takes a computed prompt's blocks and will recompute its last token."""
        done = sorted(r for r, t in self.live.items() if self.computed[r] == len(t))
        parent = data.draw(st.sampled_from(done))
        child = f"r{self.n}"
        self.n += 1
        tokens = self.live[parent]
        self.bm.fork(RequestId(parent), RequestId(child), len(tokens))
        self.live[child] = list(tokens)
        self.computed[child] = len(tokens) - 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.bm.free(RequestId(rid))
        del self.live[rid]

    @invariant()
    def consistent(self):
        check_invariants(self.bm)

    def teardown(self):
        for rid in list(self.live):
            self.bm.free(RequestId(rid))
        assert not self.bm.take_copies(), "a copy into a freed block outlived it"
        assert self.bm.num_free_blocks == self.bm.num_total_blocks
        check_invariants(self.bm)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
