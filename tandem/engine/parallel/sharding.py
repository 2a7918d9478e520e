"""Which heads and MLP columns a tensor-parallel rank owns: pure functions of the shapes.

Megatron-style sharding of a Llama-family layer over ``tp_size`` ranks:

- q heads: rank ``r`` owns heads ``[r * H / tp, (r + 1) * H / tp)``; ``H % tp == 0``.
- kv heads: with ``Hkv >= tp`` rank ``r`` owns ``[r * Hkv / tp, (r + 1) * Hkv / tp)``
  (``Hkv % tp == 0``); with fewer kv heads than ranks each kv head is REPLICATED on
  ``tp / Hkv`` ranks and rank ``r`` holds the single head ``r * Hkv // tp``
  (``tp % Hkv == 0``). Either way the kv heads a rank holds are exactly those its q heads read
  under grouped-query attention.
- MLP intermediate columns: rank ``r`` owns ``[r * I / tp, (r + 1) * I / tp)``; ``I % tp == 0``.

A shape that does not divide raises ``ShardingError`` naming the numbers, at load time.
"""

from dataclasses import dataclass

from tandem.api.errors import ModelLoadError


class ShardingError(ModelLoadError):
    """The model's head counts or MLP size cannot be split over the tensor-parallel ranks."""


def _check_rank(tp_size: int, rank: int) -> None:
    if tp_size < 1:
        raise ShardingError(f"tensor-parallel size must be >= 1, got {tp_size}")
    if not 0 <= rank < tp_size:
        raise ShardingError(f"rank {rank} is outside a tensor-parallel group of {tp_size}")


def _even_share(total: int, tp_size: int, rank: int, what: str) -> range:
    """Rank ``rank``'s contiguous ``1 / tp_size`` of ``total`` units; ``what`` names them in
    the error when ``total`` does not divide."""
    if total % tp_size:
        raise ShardingError(
            f"{what} cannot be split over tensor-parallel size {tp_size} "
            f"(the count must be a multiple of it)"
        )
    n = total // tp_size
    return range(rank * n, (rank + 1) * n)


def q_heads(num_heads: int, tp_size: int, rank: int) -> range:
    """The attention (query) heads rank ``rank`` computes."""
    _check_rank(tp_size, rank)
    return _even_share(num_heads, tp_size, rank, f"{num_heads} attention heads")


def kv_heads(num_kv_heads: int, tp_size: int, rank: int) -> range:
    """The key/value heads rank ``rank`` holds (and caches): its share, or one replicated head
    when there are fewer kv heads than ranks."""
    _check_rank(tp_size, rank)
    if num_kv_heads >= tp_size:
        return _even_share(num_kv_heads, tp_size, rank, f"{num_kv_heads} key/value heads")
    if tp_size % num_kv_heads:
        raise ShardingError(
            f"{num_kv_heads} key/value heads cannot be replicated over tensor-parallel size "
            f"{tp_size} (the size must be a multiple of the kv head count)"
        )
    head = rank * num_kv_heads // tp_size
    return range(head, head + 1)


def intermediate_cols(intermediate_size: int, tp_size: int, rank: int) -> range:
    """The MLP intermediate columns (of gate, of up, and rows of down's input) rank owns."""
    _check_rank(tp_size, rank)
    return _even_share(
        intermediate_size, tp_size, rank, f"MLP intermediate size {intermediate_size}"
    )


def vocab_rows(vocab_size: int, tp_size: int, rank: int) -> tuple[range, int]:
    """Rank ``rank``'s rows of the embedding and the LM head (vocabulary-parallel), and the rows
    every rank allocates: ``ceil(vocab_size / tp_size)``, the last rank's beyond the vocabulary
    being zero padding (vLLM pads likewise), so any vocabulary splits."""
    _check_rank(tp_size, rank)
    per_rank = -(-vocab_size // tp_size)
    start = min(rank * per_rank, vocab_size)
    return range(start, min(start + per_rank, vocab_size)), per_rank


@dataclass(slots=True, frozen=True)
class Shard:
    """What one rank of a tensor-parallel group holds of every decoder layer."""

    tp_size: int
    rank: int
    q_heads: range
    kv_heads: range
    intermediate: range

    @property
    def num_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def intermediate_size(self) -> int:
        return len(self.intermediate)


def shard_of(
    num_heads: int, num_kv_heads: int, intermediate_size: int, tp_size: int, rank: int
) -> Shard:
    """Rank ``rank``'s ``Shard``; raises ``ShardingError`` for shapes that do not split.

    GQA: each rank's q heads must read only the kv heads it holds, which the rules above
    guarantee when the head counts divide as required (checked here as an invariant).
    """
    shard = Shard(
        tp_size,
        rank,
        q_heads(num_heads, tp_size, rank),
        kv_heads(num_kv_heads, tp_size, rank),
        intermediate_cols(intermediate_size, tp_size, rank),
    )
    if num_heads % num_kv_heads:
        raise ShardingError(
            f"{num_heads} attention heads are not a multiple of {num_kv_heads} key/value heads"
        )
    group = num_heads // num_kv_heads
    read = sorted({h // group for h in shard.q_heads})
    # Invariant: a rank's q heads read only the kv heads it holds. No shape that passed the
    # divisibility checks above reaches this error (a rank's H/tp q heads lie inside one group of
    # H/Hkv, or span whole groups; tests pin that over every small shape): it guards the rules
    # of ``q_heads``/``kv_heads`` against a future change, so it raises rather than asserts.
    if not set(read) <= set(shard.kv_heads):
        raise ShardingError(
            f"rank {rank} of {tp_size} would compute q heads {list(shard.q_heads)}, which read "
            f"kv heads {read}, but holds kv heads {list(shard.kv_heads)} "
            f"({num_heads} q heads, {num_kv_heads} kv heads)"
        )
    return shard


def shard_for_config(config, tp_size: int, rank: int) -> Shard:
    """``shard_of`` a ``ModelConfig``."""
    return shard_of(config.num_heads, config.num_kv_heads, config.intermediate_size, tp_size, rank)
