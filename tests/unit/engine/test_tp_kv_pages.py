"""Which rank's pool holds which of the model's kv heads, and which ranks a gather reads: the
rules a tensor-parallel pod's KV transfers rely on (a page carries every kv head)."""

import pytest

from tandem.engine.parallel.kv_pages import head_sources, layer_group, rank_heads


def test_an_even_split_gives_each_rank_its_share_and_every_rank_is_a_source():
    assert rank_heads(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert head_sources(8, 4) == [0, 1, 2, 3]
    assert rank_heads(2, 1) == [range(0, 2)] and head_sources(2, 1) == [0]


def test_replicated_heads_are_read_once_from_their_first_holder():
    # 2 kv heads over 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1.
    assert rank_heads(2, 4) == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert head_sources(2, 4) == [0, 2]
    assert head_sources(1, 8) == [0]


@pytest.mark.parametrize("heads,tp", [(8, 2), (8, 8), (4, 8), (1, 2), (2, 4)])
def test_the_sources_cover_every_head_once_in_order(heads, tp):
    ranges = rank_heads(heads, tp)
    covered = [h for r in head_sources(heads, tp) for h in ranges[r]]
    assert covered == list(range(heads))


def test_layer_groups_end_at_multiples_of_the_group_and_at_the_last_layer():
    seen = [layer_group(n, 10, 4) for n in range(1, 11)]
    assert [g for g in seen if g is not None] == [range(0, 4), range(4, 8), range(8, 10)]
    assert layer_group(3, 10, 4) is None
    assert layer_group(2, 2, 4) == range(0, 2)  # a group larger than the model: one, at the end
