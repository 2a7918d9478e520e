"""KV transports: how a prefill pod's pages reach the blocks a decode pod reserved for them.

Two kinds of transport exist:

- **memory transports** (``cuda-ipc``, ``nixl``, ``shm``): the decode pod exports its KV pool
  once (a ``PoolExport``, advertised as a ``PoolDescriptor`` by ``DecodeService.DescribeKV``);
  the prefill pod maps it once per decode pod incarnation (a ``PoolWriter``) and copies each
  finished layer group's pages straight into the reserved blocks. No code runs on the decode
  pod per page: it learns of the transfer from one completion notice (``CompleteKV``).
- **grpc**: pages streamed over ``PushKV`` (``push_streams.py``), validated and written by the
  decode pod's ``KVReceiver``. Works across any network; the portable fallback.

Pools on both sides share the layout ``[layers, 2 (K, V), blocks, block_size, kv_heads,
head_dim]`` (the model fingerprint guarantees the same model and dtype); only the number of
blocks differs, so a page ``(layer, k|v, block)`` is one contiguous run of bytes in each pool.

Choosing (``choose``): ``auto`` takes the fastest transport both sides have and can reach (same
host for ``shm`` and ``cuda-ipc``; never nixl, see ``AUTO_TRANSPORTS``); a named transport is
used if possible. Anything slower than
what was asked for (for ``auto``: the fastest this pod could use) is a *fallback*: never
silent (the caller logs it at WARNING and counts it), refused with ``strict``.
"""

import functools
import importlib
import os
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import msgspec
import torch

TRANSPORTS: tuple[str, ...] = ("cuda-ipc", "shm", "nixl", "grpc")
"""Every transport, in ``auto``'s order of preference (the first both pods can use): the
same-host memory transports (cuda-ipc for GPU pools, shm for CPU pools) before NIXL, which is
for pools on other hosts, before gRPC."""
MEMORY_TRANSPORTS = frozenset({"cuda-ipc", "nixl", "shm"})
AUTO_TRANSPORTS: tuple[str, ...] = ("cuda-ipc", "shm", "grpc")
"""What ``auto`` may pick. Not nixl: its agent's progress thread spins a CPU core in every
process that holds one (NIXL's Python API fixes the thread's delay at 0), a price a pod pays
only when asked to (``--kv-transport nixl``)."""
KVTransportMode = Literal["auto", "grpc", "shm", "cuda-ipc", "nixl"]

_MODULES = {
    "shm": "tandem.transfer.shm_transport",
    "cuda-ipc": "tandem.transfer.cuda_ipc_transport",
    "nixl": "tandem.transfer.nixl_transport",
}


class TransportUnavailable(Exception):
    """A transport cannot be used here (missing library, other host, wrong device...)."""


class PoolDescriptor(msgspec.Struct, frozen=True):
    """What a decode pod advertises for one memory transport: enough to map its KV pool.

    ``payload`` is the transport's own msgpack document (never pickle: it comes off the network).
    """

    transport: str
    host: str
    """``host_id()`` of the decode pod's host: shm and cuda-ipc only reach the same host."""
    shape: tuple[int, ...]
    """The pool's shape (``[layers, 2, blocks + 1, block_size, kv_heads, head_dim]``)."""
    dtype: str
    """torch dtype name, e.g. ``bfloat16``."""
    payload: bytes = b""


descriptor_encoder = msgspec.msgpack.Encoder()
descriptor_decoder = msgspec.msgpack.Decoder(PoolDescriptor)


@dataclass(frozen=True, slots=True)
class LocalPool:
    """What choosing a transport needs of this pod's pool, where the tensor itself is elsewhere
    (a pod's front process chooses; its engine core holds the pool). Duck-types the tensor's
    ``shape``, ``device``, ``dtype`` and ``is_cuda``."""

    shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def element_size(self) -> int:
        return self.dtype.itemsize


@functools.cache
def host_id() -> str:
    """This host's identity: the kernel's boot id (shared by every container on a node), else
    the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


class PoolExport(ABC):
    """A decode pod's KV pool, exported for one memory transport (lives as long as the pod)."""

    transport: str

    @abstractmethod
    def descriptor(self) -> PoolDescriptor: ...

    def close(self) -> None:  # noqa: B027 - most exports hold nothing to release
        """Stop exporting (the pod is stopping)."""


class PoolWriter(ABC):
    """A prefill pod's mapping of one decode pod's KV pool (one per decode pod incarnation).

    ``write`` queues copies and returns at once (the engine thread calls it between layer
    groups); ``flush`` returns once everything queued has landed in the decode pod's memory.
    """

    transport: str

    @abstractmethod
    def write(
        self,
        src: torch.Tensor,
        src_ids: torch.Tensor,
        layers: tuple[int, int],
        dst_ids: torch.Tensor,
    ) -> int:
        """Copy pages ``src[l0:l1, :, src_ids]`` (``src``: this pod's pool) into the decode
        pool's ``[l0:l1, :, dst_ids]``. Returns the bytes queued."""

    @abstractmethod
    def flush(self) -> None:
        """Block until every queued write has landed (or raise ``KVTransferError``)."""

    @property
    def broken(self) -> bool:
        """A writer that cannot be trusted any more (a transfer failed inside it); the sender
        maps the pool afresh for the next transfer."""
        return getattr(self, "_broken", None) is not None

    def close(self) -> None:  # noqa: B027 - most writers hold nothing to release
        """Drop the mapping (the decode pod went away, or this pod is stopping)."""


def check_block_ids(src_ids: torch.Tensor, dst_ids: torch.Tensor, dst_pool_shape) -> None:
    """Refuse, before anything is written, destination ids outside the decode pool's blocks
    (its last block is the scratch block padding rows write to: never a request's). Cheap: a
    writer runs it on every layer-group write. That no destination block is named twice is the
    transfer's to check, once (``check_distinct_block_ids``): its ids do not change between
    its writes."""
    from tandem.api.errors import KVTransferError

    if len(src_ids) != len(dst_ids):
        raise KVTransferError("source and destination block lists differ in length")
    if len(dst_ids) and (int(dst_ids.min()) < 0 or int(dst_ids.max()) >= dst_pool_shape[2] - 1):
        raise KVTransferError(
            f"destination block ids outside the decode pool's {dst_pool_shape[2] - 1} blocks"
        )


def check_distinct_block_ids(dst_ids) -> None:
    """Refuse a destination block named twice (parallel copies would write it at once: a torn
    page). Run once per transfer on the claim's block ids (``MemoryTransfer``); every write of
    the transfer names a slice of them."""
    from tandem.api.errors import KVTransferError

    if len(set(dst_ids)) != len(dst_ids):
        raise KVTransferError("a destination block id is named twice")


def pool_bytes_per_page(descriptor: PoolDescriptor) -> int:
    """Bytes of one (layer, K|V, block) page of a described pool."""
    import torch

    block_size, heads, dim = descriptor.shape[3:]
    return block_size * heads * dim * getattr(torch, descriptor.dtype).itemsize


def _module(transport: str):
    try:
        return importlib.import_module(_MODULES[transport])
    except KeyError:
        raise TransportUnavailable(f"{transport!r} is not a memory transport") from None
    except ImportError as exc:
        raise TransportUnavailable(f"{transport}: {exc}") from None


def export_pool(transport: str, pool: torch.Tensor, **options) -> PoolExport:
    """Export ``pool`` (the decode pod's, or a mapping of it) for ``transport``.

    Raises:
        TransportUnavailable: not on this device or without its library.
    """
    return _module(transport).export_pool(pool, **options)


def open_writer(descriptor: PoolDescriptor, local_pool: torch.Tensor) -> PoolWriter:
    """Map a decode pod's pool for writing from ``local_pool``'s device.

    Raises:
        TransportUnavailable: the descriptor cannot be reached from here.
    """
    check_reachable(descriptor, local_pool)
    return _module(descriptor.transport).open_writer(descriptor, local_pool)


def check_reachable(descriptor: PoolDescriptor, local_pool: torch.Tensor) -> None:
    """Raise ``TransportUnavailable`` if ``descriptor`` cannot be written from this process."""
    if descriptor.transport in ("shm", "cuda-ipc") and descriptor.host != host_id():
        raise TransportUnavailable(
            f"{descriptor.transport} reaches pods on this host only (the decode pod is on "
            f"another host)"
        )
    if tuple(local_pool.shape[:2]) != tuple(descriptor.shape[:2]) or tuple(
        local_pool.shape[3:]
    ) != tuple(descriptor.shape[3:]):
        raise TransportUnavailable(
            f"the decode pod's pool pages {list(descriptor.shape)} do not match this pod's "
            f"{list(local_pool.shape)}"
        )
    _module(descriptor.transport).check_reachable(descriptor, local_pool)


def local_transports(device_type: str) -> list[str]:
    """Transports this process could use with a pool on ``device_type``, fastest first."""
    names = []
    for name in TRANSPORTS:
        if name == "grpc":
            names.append(name)
            continue
        try:
            reason = _module(name).unavailable(device_type)
        except TransportUnavailable:
            continue
        if reason is None:
            names.append(name)
    return names


@dataclass(frozen=True, slots=True)
class Choice:
    transport: str
    descriptor: PoolDescriptor | None
    """None for grpc."""
    fallback: str | None = None
    """Why a slower transport than wanted was chosen (None: no fallback)."""


def choose(
    mode: str,
    local_pool: torch.Tensor,
    remote: list[PoolDescriptor],
    *,
    local: list[str] | None = None,
    unusable: dict[str, str] | None = None,
) -> Choice:
    """The transport for one transfer to a decode pod advertising ``remote``.

    ``mode``: ``auto`` or a transport name (this pod's ``--kv-transport``). ``local``: the
    transports this pod can use (default ``local_transports``). The caller decides whether a
    fallback is allowed (``--kv-transport-strict``). ``unusable``: transports known not to work
    with this decode pod (transport -> why: an earlier mapping of its pool failed here).
    """
    local = local_transports(local_pool.device.type) if local is None else local
    wanted = [mode] if mode != "auto" else [t for t in AUTO_TRANSPORTS if t in local]
    offered = {d.transport: d for d in remote}
    reasons = []
    for name in wanted:
        if name == "grpc":
            break
        if name not in local:
            reasons.append(f"{name}: not available on this pod")
            continue
        if unusable and name in unusable:
            reasons.append(f"{name}: {unusable[name]}")
            continue
        desc = offered.get(name)
        if desc is None:
            reasons.append(f"{name}: the decode pod does not offer it")
            continue
        try:
            check_reachable(desc, local_pool)
        except TransportUnavailable as exc:
            reasons.append(f"{name}: {exc}")
            continue
        # auto: any memory transport is what was asked for (nixl across hosts is no fallback).
        return Choice(name, desc, _fallback(reasons) if mode != "auto" else None)
    # gRPC: a fallback whenever a memory transport was wanted and could not be used.
    return Choice("grpc", None, _fallback(reasons))


def _fallback(reasons: list[str]) -> str | None:
    return "; ".join(reasons) if reasons else None


def shm_dir() -> str:
    """Where shared-memory pools live: ``TANDEM_SHM_DIR``, else /dev/shm, else the temp dir."""
    configured = os.environ.get("TANDEM_SHM_DIR")
    if configured:
        return configured
    if os.path.isdir("/dev/shm"):
        return "/dev/shm"
    import tempfile

    return tempfile.gettempdir()
