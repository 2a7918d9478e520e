"""``shm`` KV transport: CPU pools in a named shared-memory file, written in place.

The decode pod's engine core allocates its KV pool in a file under /dev/shm
(``PagedKVCache(path=...)``); its front and any prefill pod on the same host map that file and
see the same pages. A prefill pod's write copies from its pool into the mapping, one slice per
run of consecutive blocks: when it returns the pages are in the decode pod's memory (no flush).
"""

import os

import msgspec
import torch

from tandem.transfer.transport import (
    PoolDescriptor,
    PoolExport,
    PoolWriter,
    TransportUnavailable,
    block_runs,
    check_block_ids,
    host_id,
    shm_dir,
)

POOL_FILE_PREFIX = "tandem-kv-"
"""Pool files are ``shm_dir()/tandem-kv-*`` (``services/decode/server.py`` names them)."""


class _Payload(msgspec.Struct, frozen=True):
    path: str


def unavailable(device_type: str) -> str | None:
    return None if device_type == "cpu" else "shm carries CPU pools only"


def map_pool(path: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Map a pool file (made by ``PagedKVCache(path=...)``) as a tensor of ``shape``.

    Raises:
        TransportUnavailable: no such file, or not the size of ``shape``.
    """
    numel = 1
    for n in shape:
        numel *= n
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise TransportUnavailable(f"shm pool {path!r} cannot be opened: {exc}") from None
    if size != numel * dtype.itemsize:
        raise TransportUnavailable(
            f"shm pool {path!r} holds {size} bytes, not the advertised {numel * dtype.itemsize}"
        )
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)


class ShmPoolExport(PoolExport):
    transport = "shm"

    def __init__(self, pool: torch.Tensor, path: str) -> None:
        self._descriptor = PoolDescriptor(
            transport="shm",
            host=host_id(),
            shape=tuple(pool.shape),
            dtype=str(pool.dtype).removeprefix("torch."),
            payload=msgspec.msgpack.encode(_Payload(path)),
        )

    def descriptor(self) -> PoolDescriptor:
        return self._descriptor


def export_pool(pool: torch.Tensor, *, path: str | None = None, **_) -> PoolExport:
    if pool.device.type != "cpu" or not path:
        raise TransportUnavailable("shm exports a CPU pool allocated in a shared-memory file")
    return ShmPoolExport(pool, path)


def _path(descriptor: PoolDescriptor) -> str:
    """The pool file a descriptor names: only a ``tandem-kv-*`` file of the shm directory (a
    descriptor comes off the network: it must not make this pod write elsewhere)."""
    try:
        path = msgspec.msgpack.decode(descriptor.payload, type=_Payload).path
    except msgspec.DecodeError as exc:
        raise TransportUnavailable(f"unreadable shm descriptor: {exc}") from None
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(shm_dir()) or not os.path.basename(
        real
    ).startswith(POOL_FILE_PREFIX):
        raise TransportUnavailable(f"shm pool {path!r} is not a pool file of {shm_dir()}")
    return real


def check_reachable(descriptor: PoolDescriptor, local_pool: torch.Tensor) -> None:
    if local_pool.device.type != "cpu":
        raise TransportUnavailable("shm carries CPU pools only (this pod's pool is on a GPU)")
    path = _path(descriptor)
    if not os.path.exists(path):
        raise TransportUnavailable(f"shm pool {path!r} is not visible here (another /dev/shm)")


class ShmPoolWriter(PoolWriter):
    transport = "shm"

    def __init__(self, descriptor: PoolDescriptor) -> None:
        self.pool = map_pool(
            _path(descriptor), tuple(descriptor.shape), getattr(torch, descriptor.dtype)
        )

    def write(self, src, src_ids, layers, dst_ids) -> int:
        l0, l1 = layers
        check_block_ids(src_ids, dst_ids, self.pool.shape)
        # One slice copy per run of blocks consecutive on both sides: on CPU that is several
        # times faster than index_select + index_copy_ (which also copy twice).
        pool, nbytes = self.pool, 0
        for s0, d0, n in block_runs(src_ids.tolist(), dst_ids.tolist()):
            pages = src[l0:l1, :, s0 : s0 + n]
            pool[l0:l1, :, d0 : d0 + n].copy_(pages)
            nbytes += pages.numel() * pages.element_size()
        return nbytes

    def flush(self) -> None:
        pass  # writes are synchronous

    def close(self) -> None:
        self.pool = None


def open_writer(descriptor: PoolDescriptor, local_pool: torch.Tensor) -> PoolWriter:
    return ShmPoolWriter(descriptor)
