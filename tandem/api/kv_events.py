"""KV-cache events: what an engine's block manager reports when its prefix cache changes.

Prefill pods forward these to kvstore so the router knows which pod holds which prefix blocks.
"""

from dataclasses import dataclass

from tandem.api.ids import BlockHash


@dataclass(slots=True, frozen=True)
class BlocksStored:
    """Full blocks became reusable cache entries (in chain order within one request)."""

    block_hashes: tuple[BlockHash, ...]


@dataclass(slots=True, frozen=True)
class BlocksRemoved:
    """Cached blocks were evicted and their hashes no longer resolve on this engine."""

    block_hashes: tuple[BlockHash, ...]


@dataclass(slots=True, frozen=True)
class CacheCleared:
    """Every cached block of this engine was dropped at once."""


KVEvent = BlocksStored | BlocksRemoved | CacheCleared
