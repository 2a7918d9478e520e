"""Chained prefix-block hashes: the one definition shared by engine, router and kvstore.

A prompt is cut into full blocks of ``block_size`` tokens. Block ``i``'s hash covers its parent's
hash (block ``i-1``, or a root derived from the model fingerprint for block 0), its token ids,
and extra keys (``cache_salt`` enters block 0 only; the chain carries it to every later block).
Two prompts therefore share block ``i``'s hash exactly when they share their first
``(i + 1) * block_size`` tokens, the salt and the model: the property that prefix caching in the
engine and prefix-aware routing in the router both rely on.

Hashes are 128-bit xxh3 digests: fast, and wide enough that a collision between two cached
blocks (which would silently reuse wrong KV) is not a practical concern.
"""

from collections.abc import Sequence

import numpy as np
import xxhash

from tandem.api.ids import BlockHash

HASH_ALGORITHM = "xxh3_128"
"""Named in KV events so that a kvstore never mixes hashes from two algorithms."""


def root_hash(seed: str) -> BlockHash:
    """The parent of every chain's first block, derived from a model fingerprint."""
    return BlockHash(xxhash.xxh3_128_digest(b"tandem-root\x00" + seed.encode()))


def hash_block(
    parent: BlockHash, token_ids: Sequence[int], extra_keys: Sequence[str] = ()
) -> BlockHash:
    """Hash one block given its parent's hash, its token ids and extra keys."""
    tokens = np.asarray(token_ids, dtype="<u4").tobytes()
    return _hash_packed(parent, tokens, _pack_extra_keys(extra_keys))


def _pack_extra_keys(extra_keys: Sequence[str]) -> bytes:
    parts = []
    for key in extra_keys:
        raw = key.encode()
        parts.append(len(raw).to_bytes(4, "little") + raw)
    return b"".join(parts)


def _hash_packed(parent: bytes, tokens: bytes, extra: bytes) -> BlockHash:
    h = xxhash.xxh3_128(parent)
    h.update(len(tokens).to_bytes(4, "little"))
    h.update(tokens)
    h.update(extra)
    return BlockHash(h.digest())


class BlockHasher:
    """Hashes token sequences into chains of full-block hashes for one model and block size."""

    def __init__(self, seed: str, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.root = root_hash(seed)

    def extend(
        self,
        hashes: list[BlockHash],
        token_ids: Sequence[int],
        cache_salt: str | None = None,
    ) -> list[BlockHash]:
        """Append to ``hashes`` the hashes of the full blocks of ``token_ids`` not yet hashed.

        ``hashes`` must be the chain of ``token_ids``'s first ``len(hashes)`` blocks (for example
        an empty list, or what an earlier call returned for a shorter prefix). Returns ``hashes``.
        """
        bs = self.block_size
        start = len(hashes)
        num_full = len(token_ids) // bs
        if num_full <= start:
            return hashes
        packed = np.asarray(token_ids[start * bs : num_full * bs], dtype="<u4").tobytes()
        width = bs * 4
        parent = hashes[-1] if hashes else self.root
        for i in range(num_full - start):
            extra = _pack_extra_keys((cache_salt,)) if (start + i == 0 and cache_salt) else b""
            parent = _hash_packed(parent, packed[i * width : (i + 1) * width], extra)
            hashes.append(parent)
        return hashes

    def hash_prompt(
        self, token_ids: Sequence[int], cache_salt: str | None = None
    ) -> list[BlockHash]:
        """Hashes of every full block of ``token_ids``."""
        return self.extend([], token_ids, cache_salt)
