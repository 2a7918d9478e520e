"""Paged KV cache: one tensor holding every layer's K and V pages.

Layout ``[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]``: a block id
indexes the same page in every layer, so a request's pages for a group of layers are one
gather (``tensor[l0:l1, :, block_ids]``), which the KV sender relies on.
"""

from dataclasses import dataclass

import torch

from tandem.model_dir import ModelConfig


@dataclass(slots=True, frozen=True)
class KVCacheSpec:
    """Shape of one KV page across all layers."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def for_model(cls, config: ModelConfig, block_size: int, dtype: torch.dtype) -> "KVCacheSpec":
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block id across all layers, K and V."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize


class PagedKVCache:
    """The KV pool of one engine, indexed by block id."""

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int,
        device: torch.device,
        *,
        path: str | None = None,
    ) -> None:
        """``path`` (CPU only): allocate the pool in this file, shared with any process that
        maps it (``torch.from_file``; a new file reads as zeros)."""
        self.spec = spec
        self.num_blocks = num_blocks
        """Blocks requests can hold (ids ``0 .. num_blocks - 1``)."""
        self.scratch_slot = num_blocks * spec.block_size
        """A slot of one extra block no request owns: padding rows of a CUDA-graph batch write
        there."""
        shape = (
            spec.num_layers,
            2,
            num_blocks + 1,
            spec.block_size,
            spec.num_kv_heads,
            spec.head_dim,
        )
        self.path = path if device.type == "cpu" else None
        if self.path is not None:
            numel = 1
            for n in shape:
                numel *= n
            with open(self.path, "wb"):  # a fresh, empty file: from_file grows it with zeros
                pass
            self.tensor = torch.from_file(self.path, shared=True, size=numel, dtype=spec.dtype)
            self.tensor = self.tensor.view(shape)
        else:
            # Zeros, not empty: attention multiplies masked-out V rows by 0, and 0 * NaN is NaN.
            self.tensor = torch.zeros(shape, dtype=spec.dtype, device=device)

    def layer(self, index: int) -> torch.Tensor:
        """``[2, num_blocks, block_size, num_kv_heads, head_dim]`` view of one layer."""
        return self.tensor[index]
