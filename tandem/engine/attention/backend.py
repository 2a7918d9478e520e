"""The attention backend interface and the batch metadata every backend receives.

A step's tokens are laid out flat: sequence ``i`` owns rows ``query_start_loc[i] :
query_start_loc[i+1]`` of q/k/v. Sequences with a single new token (decodes) come first, so a
backend can treat rows ``[0, num_decodes)`` as one decode batch and the rest as prefills.
"""

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where a step's tokens go in the cache and what each sequence attends to."""

    slot_mapping: torch.Tensor
    """[num_tokens] int64: flat cache slot (block_id * block_size + offset) of each new token."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks] int64, padded with 0: each sequence's block ids."""
    seq_lens: torch.Tensor
    """[num_seqs] int64: tokens in the cache for each sequence after this step."""
    query_start_loc: torch.Tensor
    """[num_seqs + 1] int64: row offsets of each sequence's new tokens."""
    num_decodes: int
    """Leading sequences with exactly one new token."""
    seq_lens_cpu: list[int]
    query_start_loc_cpu: list[int]
    block_size: int
    scratch: dict[Any, Any] = field(default_factory=dict)
    """The backend's per-step workspace: what every layer would otherwise rebuild (masks)."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    """Writes this step's K/V into the cache, then attends each query over its sequence."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache: [2, blocks, block_size, Hkv, D] -> [T, Hq,
        D].

        ``kv_stored``: the caller already wrote k and v into their slots (a kernel fused with
        rotary did); the backend must not write them again.
        """
        ...
