"""The tensor-parallel group of one engine: its ranks and the collectives the model needs.

One process per rank. ``TPGroup.single()`` (world size 1) touches no ``torch.distributed`` at
all: the model then runs exactly the one-device path. ``init_tp_group`` joins a group of
``world_size`` processes over ``torch.distributed`` (gloo for CPU tensors, NCCL for CUDA ones;
NVLink multicast off, ``NCCL_NVLS_ENABLE=0``, set before NCCL starts) and fails with a
``TPInitError`` that says which rank waited for what, after ``timeout`` seconds, instead of
hanging when a rank never arrives.
"""

import datetime
import os
from dataclasses import dataclass

import torch

from tandem.api.errors import TandemError


class TPInitError(TandemError):
    """A tensor-parallel rank could not join its group (a peer never came, or the address is
    unusable)."""


@dataclass(slots=True, frozen=True)
class TPConfig:
    """Where and how a rank joins its group (from arguments or the environment)."""

    world_size: int
    rank: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str | None = None
    """``gloo`` or ``nccl``; None: NCCL for CUDA devices, gloo otherwise."""
    timeout_s: float = 60.0
    """How long a rank waits for its peers at start-up (and for any collective) before failing."""
    init_method: str | None = None
    """A ``torch.distributed`` rendezvous URL (e.g. ``file:///tmp/x``, free of port races);
    None: ``tcp://master_addr:master_port``."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "TPConfig":
        """torchrun's variables: ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``."""
        env = os.environ if environ is None else environ
        values = dict(
            world_size=int(env.get("WORLD_SIZE", "1")),
            rank=int(env.get("RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )
        values.update(overrides)
        return cls(**values)


class TPGroup:
    """A tensor-parallel group as the model layers see it: size, rank, and in-place sum."""

    def __init__(
        self, world_size: int, rank: int, process_group=None, backend: str = "gloo"
    ) -> None:
        self.world_size = world_size
        self.rank = rank
        self._pg = process_group
        """The ``torch.distributed`` group (None: the default one); unused at world size 1."""
        self.backend = backend
        """``gloo`` (collectives on CPU tensors) or ``nccl`` (on CUDA tensors)."""

    @classmethod
    def single(cls) -> "TPGroup":
        """The group of one process: no communication at all."""
        return cls(1, 0)

    @property
    def is_first(self) -> bool:
        """Rank 0: the rank that samples and speaks for the group."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns it."""
        if self.world_size > 1:
            torch.distributed.all_reduce(x, group=self._pg)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim``, in rank order (on every rank)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self._pg)
        return torch.cat(parts, dim=dim)

    def gather(self, x: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """Every rank's ``x`` (same shape and dtype on all), in rank order, on rank ``dst``
        only (None elsewhere): one collective, nothing sent to the ranks that do not need it."""
        if self.world_size == 1:
            return [x]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == dst else None
        torch.distributed.gather(x, parts, dst=dst, group=self._pg)
        return parts

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` into every rank's ``x`` (same shape and dtype), in place."""
        if self.world_size > 1:
            torch.distributed.broadcast(x, src=src, group=self._pg)
        return x

    def min_int(self, value: int, device: torch.device | str = "cpu") -> int:
        """The smallest of every rank's ``value`` (e.g. the KV blocks each rank's memory holds,
        so that all ranks allocate the same pool). ``device``: where an NCCL group's tensor lives
        (this rank's GPU)."""
        if self.world_size == 1:
            return value
        where = device if self.backend == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.int64, device=where)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self._pg)
        return int(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier(group=self._pg)

    def destroy(self) -> None:
        """Leave the group (the default process group is torn down); no-op at world size 1."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tp_group(cfg: TPConfig, device: torch.device | str = "cpu") -> TPGroup:
    """Join the group ``cfg`` describes (world size 1: no ``torch.distributed``, no cost).

    Raises ``TPInitError`` when the peers do not all arrive within ``cfg.timeout_s`` or the
    rendezvous address cannot be used.
    """
    if cfg.world_size < 1 or not 0 <= cfg.rank < cfg.world_size:
        raise TPInitError(f"rank {cfg.rank} is outside a tensor-parallel group of {cfg.world_size}")
    if cfg.world_size == 1:
        return TPGroup.single()
    if torch.distributed.is_initialized():
        raise TPInitError("this process is already in a torch.distributed group")
    device = torch.device(device)
    backend = cfg.backend or default_backend(device)
    if backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on shared hosts
        if device.index is not None:
            torch.cuda.set_device(device)
    where = cfg.init_method or f"tcp://{cfg.master_addr}:{cfg.master_port}"
    try:
        torch.distributed.init_process_group(
            backend,
            init_method=where,
            world_size=cfg.world_size,
            rank=cfg.rank,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
        )
        # The rendezvous returns once the store is reached; a collective proves every rank
        # is there (and, for gloo, that the ranks can reach each other).
        torch.distributed.barrier()
    except Exception as exc:  # DistStoreError, DistNetworkError, RuntimeError (timeouts)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise TPInitError(
            f"tensor-parallel rank {cfg.rank} of {cfg.world_size} could not join its group at "
            f"{where} ({backend}) within {cfg.timeout_s:g} s: did every rank start, with the "
            f"same address and world size? ({type(exc).__name__}: {exc})"
        ) from exc
    return TPGroup(cfg.world_size, cfg.rank, backend=backend)
