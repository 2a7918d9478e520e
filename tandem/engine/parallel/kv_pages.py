"""A tensor-parallel engine's KV pages as one model's pages: which rank's pool holds which of the
model's kv heads, and how pages move between the two views.

Each rank's pool holds only its kv heads (``sharding.kv_heads``: an even share, or one head
replicated over several ranks when there are fewer kv heads than ranks). A KV transfer between
pods carries every kv head of the model (``wire.PageLayout`` of the full model), so pods of
different tensor-parallel sizes exchange pages:

- a tensor-parallel prefill engine **gathers** a step's exported pages onto rank 0 at each
  layer-group boundary (``gather_pages``: every rank takes part, rank 0 gets all heads);
- a tensor-parallel decode pod's receiver **splits** a pushed page's heads into each rank's
  pool (``rank_heads``).
"""

import torch

from tandem.engine.parallel.group import TPGroup
from tandem.engine.parallel.sharding import kv_heads


def rank_heads(num_kv_heads: int, tp_size: int) -> list[range]:
    """The model kv heads each rank's pool holds, by rank (rank 0 first)."""
    return [kv_heads(num_kv_heads, tp_size, rank) for rank in range(tp_size)]


def head_sources(num_kv_heads: int, tp_size: int) -> list[int]:
    """The ranks whose pages, concatenated along the head axis in this order, are every kv head
    of the model once: the first holder of each distinct head range (replicas are skipped)."""
    sources: list[int] = []
    seen: set[range] = set()
    for rank, heads in enumerate(rank_heads(num_kv_heads, tp_size)):
        if heads not in seen:
            seen.add(heads)
            sources.append(rank)
    return sources


def layer_group(num_layers_done: int, num_layers: int, layers_per_group: int) -> range | None:
    """The layers whose KV leaves after ``num_layers_done`` layers computed, or None when that
    is not a group boundary (groups of ``layers_per_group``, the last one possibly shorter)."""
    if num_layers_done % layers_per_group and num_layers_done != num_layers:
        return None
    first = ((num_layers_done - 1) // layers_per_group) * layers_per_group
    return range(first, num_layers_done)


def gather_pages(
    group: TPGroup, kv: torch.Tensor, layers: range, block_ids: torch.Tensor, num_kv_heads: int
) -> torch.Tensor | None:
    """Blocks ``block_ids`` of layers ``layers`` with every kv head of the model, on rank 0.

    Every rank of ``group`` must call it at the same point of the same step (it is one
    collective). ``kv`` is this rank's pool ``[layers, 2, blocks, block_size, heads, head_dim]``.
    Returns ``[len(layers), 2, len(block_ids), block_size, num_kv_heads, head_dim]`` on rank 0,
    None on the others.
    """
    part = kv[layers.start : layers.stop].index_select(2, block_ids)
    parts = group.gather(part, dst=0)
    if parts is None:
        return None
    sources = head_sources(num_kv_heads, group.world_size)
    if len(sources) == 1:
        return parts[sources[0]]
    return torch.cat([parts[r] for r in sources], dim=-2)
