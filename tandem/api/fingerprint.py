"""Model fingerprint: what must match for two engines to share KV pages or prefix hashes.

The prefix-hash chain is seeded with it (two models never share cache entries), and every KV
page stream carries it (a decode pod refuses pages computed by another model, dtype or layout).
"""

from dataclasses import dataclass

import xxhash


@dataclass(slots=True, frozen=True)
class ModelFingerprint:
    architecture: str
    weights_digest: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int

    def digest(self) -> str:
        """A short stable hex string naming this fingerprint."""
        text = "|".join(
            str(v)
            for v in (
                self.architecture,
                self.weights_digest,
                self.num_layers,
                self.num_kv_heads,
                self.head_dim,
                self.dtype,
                self.block_size,
            )
        )
        return xxhash.xxh3_64_hexdigest(text.encode())
