"""Tensor parallelism: the rank group (``group``) and which shard of each layer a rank holds
(``sharding``)."""

from tandem.engine.parallel.group import TPConfig, TPGroup, TPInitError, init_tp_group
from tandem.engine.parallel.sharding import Shard, ShardingError, shard_for_config, shard_of

__all__ = [
    "Shard",
    "ShardingError",
    "TPConfig",
    "TPGroup",
    "TPInitError",
    "init_tp_group",
    "shard_for_config",
    "shard_of",
]
