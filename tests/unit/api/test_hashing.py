"""Chained block hashes: equal exactly when prefix, salt and model are equal."""

from hypothesis import given
from hypothesis import strategies as st

from tandem.api.hashing import BlockHasher, hash_block, root_hash

H = BlockHasher("model-a", 4)


def test_only_full_blocks_are_hashed():
    assert H.hash_prompt([1, 2, 3]) == []
    assert len(H.hash_prompt(list(range(11)))) == 2


def test_chain_matches_hash_block():
    tokens = list(range(8))
    h0 = hash_block(root_hash("model-a"), tokens[:4])
    h1 = hash_block(h0, tokens[4:])
    assert H.hash_prompt(tokens) == [h0, h1]
    assert len(h0) == 16


def test_a_block_hash_covers_its_whole_prefix():
    a = H.hash_prompt([1, 2, 3, 4, 5, 6, 7, 8])
    b = H.hash_prompt([9, 2, 3, 4, 5, 6, 7, 8])
    assert a[1] != b[1]  # same second block, different first block
    assert H.hash_prompt([1, 2, 3, 4, 0, 0, 0, 0])[0] == a[0]


def test_salt_and_model_separate_chains():
    tokens = list(range(8))
    plain = H.hash_prompt(tokens)
    salted = H.hash_prompt(tokens, cache_salt="tenant")
    assert plain[0] != salted[0] and plain[1] != salted[1]
    assert H.hash_prompt(tokens, cache_salt="tenant") == salted
    assert BlockHasher("model-b", 4).hash_prompt(tokens) != plain
    assert hash_block(root_hash("model-a"), tokens[:4], ["tenant"]) == salted[0]


@given(st.lists(st.integers(0, 2**32 - 1), max_size=60), st.integers(0, 60))
def test_incremental_extension_equals_one_shot(tokens, cut):
    hashes = H.extend([], tokens[:cut])
    assert H.extend(hashes, tokens) == H.hash_prompt(tokens)
