"""``shm`` KV transport: CPU pools in a named shared-memory file, written in place.

The decode pod's engine core allocates its KV pool in a file under /dev/shm
(``PagedKVCache(path=...)``); its front and any prefill pod on the same host map that file and
see the same pages. A prefill pod's write copies from its pool into the mapping: when it returns
the pages are in the decode pod's memory (no flush).

A write moves pages, not blocks: a page is one layer's K or V for one block, contiguous on both
sides. The pages of a write are gathered and scattered with numpy fancy indexing (one C loop of
row copies, the GIL released) split over a few threads; a Python loop of per-block tensor
copies spent most of its time in per-call overhead (bench/NOTES.md, "KV data plane").

Page faults: the owner allocates its whole pool at start (``kv_cache.prefault``), and a writer
maps every page of it into its own address space on a background thread as soon as it maps
the pool (``ShmPoolWriter.populated``). Writes meanwhile fault pages in one by one, ~3x slower.
"""

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
import torch

from tandem.engine.kv_cache import prefault
from tandem.transfer.transport import (
    PoolDescriptor,
    PoolExport,
    PoolWriter,
    TransportUnavailable,
    check_block_ids,
    host_id,
    shm_dir,
)

logger = logging.getLogger(__name__)

POOL_FILE_PREFIX = "tandem-kv-"
"""Pool files are ``shm_dir()/tandem-kv-*`` (``services/decode/server.py`` names them)."""

PARALLEL_MIN_BYTES = 2 << 20
"""A write smaller than this copies on the calling thread (a hand-off costs more than it saves)."""
MAX_COPY_THREADS = 4
CHUNK_BYTES = 256 << 10
"""Pages gathered at a time (see ``copy_pages``)."""

_copy_pool: tuple[ThreadPoolExecutor, int] | None = None
_copy_pool_lock = threading.Lock()


def _copy_threads() -> tuple[ThreadPoolExecutor, int]:
    """The process's copy threads and their number (shared by every writer, made on first use)."""
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            workers = max(1, min(MAX_COPY_THREADS, torch.get_num_threads(), os.cpu_count() or 1))
            pool = ThreadPoolExecutor(workers, thread_name_prefix="tandem-shm-copy")
            _copy_pool = (pool, workers)
        return _copy_pool


def _page_rows(pool: torch.Tensor) -> np.ndarray:
    """``pool`` ([layers, 2, blocks, ...], contiguous) as a numpy array of one row per page, in
    an integer dtype of the same width (numpy has no bfloat16; bytes are bytes)."""
    layers, kv, blocks = pool.shape[:3]
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[pool.element_size()]
    return pool.view(layers * kv * blocks, -1).view(ints).numpy()


def _row_ids(block_ids: np.ndarray, layers: tuple[int, int], kv: int, blocks: int) -> np.ndarray:
    """Page rows of ``block_ids`` for layers ``[l0, l1)`` in a pool of ``blocks`` blocks."""
    l0, l1 = layers
    planes = np.arange(l0 * kv, l1 * kv, dtype=np.int64)[:, None] * blocks
    return (planes + block_ids[None, :]).reshape(-1)


def copy_pages(
    src: torch.Tensor, dst: torch.Tensor, src_ids, dst_ids, layers: tuple[int, int]
) -> int:
    """Copy blocks ``src_ids`` of ``src`` into blocks ``dst_ids`` of ``dst`` for ``layers``
    (both CPU pools [layers, 2, blocks, ...] with pages of one size). Returns the bytes copied."""
    if src.dtype.itemsize != dst.dtype.itemsize or src.shape[3:] != dst.shape[3:]:
        raise ValueError("source and destination pools differ in page shape")
    kv = src.shape[1]
    s_ids = np.asarray(src_ids, dtype=np.int64)
    d_ids = np.asarray(dst_ids, dtype=np.int64)
    s_rows = _row_ids(s_ids, layers, kv, src.shape[2])
    d_rows = _row_ids(d_ids, layers, kv, dst.shape[2])
    if not src.is_contiguous():
        src = src.contiguous()  # never the case for an engine's pool; correct all the same
    s_pages, d_pages = _page_rows(src), _page_rows(dst)
    nbytes = len(s_rows) * s_pages.shape[1] * s_pages.itemsize

    # Fancy indexing gathers into a temporary before it scatters: a few pages at a time keep
    # that temporary in cache.
    step = max(1, CHUNK_BYTES // (s_pages.shape[1] * s_pages.itemsize))

    def part(lo: int, hi: int) -> None:
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            d_pages[d_rows[a:b]] = s_pages[s_rows[a:b]]

    threads, workers = _copy_threads()
    parts = min(workers, max(1, nbytes // PARALLEL_MIN_BYTES), len(s_rows))
    if parts <= 1:
        part(0, len(s_rows))
    else:
        bounds = np.linspace(0, len(s_rows), parts + 1).astype(int).tolist()
        futures = [threads.submit(part, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        for future in futures:
            future.result()
    return nbytes


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
        self.populated = threading.Event()
        """Set once every page of the pool is mapped here (or that is not done: see below)."""
        path = _path(descriptor)
        nbytes = self.pool.numel() * self.pool.element_size()
        if os.stat(path).st_blocks * 512 >= nbytes:
            threading.Thread(
                target=self._populate, args=(self.pool,), name="tandem-shm-populate", daemon=True
            ).start()
        else:
            # A sparse pool (an owner that could not pre-fault it): populating here would
            # allocate its missing pages, charged to this pod's memory. Pages fault in instead.
            self.populated.set()

    def _populate(self, pool: torch.Tensor) -> None:
        try:
            prefault(pool)  # the pages exist (the owner made them): this maps, allocates nothing
        except OSError:
            logger.warning("mapping the shm KV pool's pages failed; they fault in on use")
        finally:
            self.populated.set()

    def write(self, src, src_ids, layers, dst_ids) -> int:
        check_block_ids(src_ids, dst_ids, self.pool.shape)
        return copy_pages(src, self.pool, src_ids.numpy(), dst_ids.numpy(), layers)

    def flush(self) -> None:
        pass  # writes are synchronous

    def close(self) -> None:
        self.pool = None


def open_writer(descriptor: PoolDescriptor, local_pool: torch.Tensor) -> PoolWriter:
    return ShmPoolWriter(descriptor)
