"""``shm`` KV transport: CPU pools in a named shared-memory file, written in place.

The decode pod's engine core allocates its KV pool in a file under /dev/shm
(``PagedKVCache(path=...)``); its front and any prefill pod on the same host map that file and
see the same pages. A prefill pod's write copies from its pool into the mapping: when it returns
the pages are in the decode pod's memory (no flush).

A write moves pages: a page is one layer's K or V for one block, contiguous on both sides.
Its pages are copied one block (or one run of consecutive blocks on both sides) at a time, for
all of the write's layers at once: one strided numpy slice assignment per run, one pass over the
bytes (the GIL released), the runs split over the process's copy threads (``copy_threads``).
Earlier versions gathered pages into a temporary and scattered them out of it (every byte read
and written twice), or looped over per-block, per-layer torch copies (mostly per-call overhead);
bench/NOTES.md, "KV data plane", has the figures.

Page faults: the owner allocates its whole pool at start (``kv_cache.prefault``), and a writer
maps every page of it into its own address space on a background thread as soon as it maps
the pool (``ShmPoolWriter.populated``). Writes meanwhile fault pages in one by one, ~3x slower.
Huge pages are the owner's business: where /dev/shm gives them on advice only (``huge=advise``)
the owner asks for them before it pre-faults (``kv_cache.advise_hugepages``); a writer maps the
pages as they are.
"""

import itertools
import logging
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

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
MAX_COPY_THREADS = 8
"""Copy threads at most. On the 16-CPU host of an H100 machine (1 GiB of 8B pages, bench/NOTES.md
"shm writer threads"), writes ran at 6.7 / 17.9 / 23.7 / 18.6 GB/s with 1 / 4 / 8 / 16 threads:
the host's memory bandwidth saturates near 8 copiers, and more only contend."""

_copy_pool: tuple[ThreadPoolExecutor | None, int] | None = None
"""The copy threads (None where the writing thread copies alone) and how many threads copy."""
_copy_pool_lock = threading.Lock()


def _quota(quota: int, period: int) -> float | None:
    return None if quota < 0 or period <= 0 else quota / period


def _cgroup_cpus(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs this process's cgroup may use, or None where it sets no quota: cgroup v2's
    ``cpu.max`` (``max 100000`` is none), else cgroup v1's ``cpu/cpu.cfs_quota_us`` over
    ``cpu/cpu.cfs_period_us`` (a quota of -1 is none)."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else _quota(int(quota), int(period))
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return _quota(quota, period)
    except (OSError, ValueError):
        return None


def copy_threads() -> int:
    """How many threads copy pages: the CPUs this process may run on (its affinity, and its
    cgroup's CPU quota where one is set, v2 or v1: a pod limited to 4 CPUs of a 64-core node gets
    4), no more than torch's own thread setting (``torch.get_num_threads()``, which follows
    ``OMP_NUM_THREADS`` and ``torch.set_num_threads``), and at most ``MAX_COPY_THREADS``. A write
    runs on the engine thread between layer groups and waits for its copies: the threads do not
    compete with the forward."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, min(MAX_COPY_THREADS, cpus, torch.get_num_threads()))


def _copy_threads() -> tuple[ThreadPoolExecutor | None, int]:
    """The process's copy threads (shared by every writer, made when the first writer opens,
    each handed a no-op so that it starts now, not waited for) and how many threads copy: those
    plus the writing thread itself. ``(None, 1)`` where one thread copies alone."""
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            workers = copy_threads()
            pool = None
            if workers > 1:
                pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="tandem-shm-copy")
                for _ in range(workers - 1):
                    pool.submit(int)
            _copy_pool = (pool, workers)
        return _copy_pool


def _block_view(pool: torch.Tensor) -> np.ndarray:
    """``pool`` ([layers, 2, blocks, ...], contiguous) as a numpy array ``[layers, 2, blocks,
    page]`` of an integer dtype of the same width (numpy has no bfloat16; bytes are bytes)."""
    layers, kv, blocks = pool.shape[:3]
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[pool.element_size()]
    return pool.view(layers, kv, blocks, -1).view(ints).numpy()


def _runs(s_ids: np.ndarray, d_ids: np.ndarray, parts: int) -> list[list[tuple[int, int, int]]]:
    """``s_ids``/``d_ids`` cut into runs ``(src block, dst block, length)`` of blocks
    consecutive on both sides, in ``parts`` lists of about the same number of blocks (a run that
    spans two parts is cut in two)."""
    n = len(s_ids)
    if n == 0:
        return [[] for _ in range(parts)]
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    is_start = np.empty(n, dtype=bool)
    is_start[0] = True
    np.logical_or(np.diff(s_ids) != 1, np.diff(d_ids) != 1, out=is_start[1:])
    is_start[bounds[:-1]] = True
    starts = np.flatnonzero(is_start)
    ends = np.append(starts[1:], n)
    # The first run of each part (a part's first block is always a run's start).
    cuts = [0, *np.searchsorted(starts, bounds[1:-1]).tolist(), len(starts)]
    s0, d0, k = s_ids[starts].tolist(), d_ids[starts].tolist(), (ends - starts).tolist()
    return [list(zip(s0[a:b], d0[a:b], k[a:b], strict=True)) for a, b in itertools.pairwise(cuts)]


def _copy_runs(s_pages: np.ndarray, d_pages: np.ndarray, runs: list[tuple[int, int, int]]) -> None:
    """One part of a write: every layer's K and V page of each run, strided on both sides, in one
    pass (numpy releases the GIL)."""
    for s, d, k in runs:
        d_pages[:, :, d : d + k] = s_pages[:, :, s : s + k]


def copy_pages(
    src: torch.Tensor, dst: torch.Tensor, src_ids, dst_ids, layers: tuple[int, int]
) -> int:
    """Copy blocks ``src_ids`` of ``src`` into blocks ``dst_ids`` of ``dst`` for ``layers``
    (both CPU pools [layers, 2, blocks, ...] with pages of one size). Returns the bytes copied."""
    if src.dtype.itemsize != dst.dtype.itemsize or src.shape[3:] != dst.shape[3:]:
        raise ValueError("source and destination pools differ in page shape")
    l0, l1 = layers
    s_ids = np.asarray(src_ids, dtype=np.int64)
    d_ids = np.asarray(dst_ids, dtype=np.int64)
    for ids, pool in ((s_ids, src), (d_ids, dst)):
        # A slice would wrap a negative id around (another block written): refused here too.
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= pool.shape[2]):
            raise ValueError(f"block ids outside the pool's {pool.shape[2]} blocks")
    if len(s_ids) != len(d_ids):
        raise ValueError("source and destination block lists differ in length")
    if len(np.unique(d_ids)) != len(d_ids):
        # Two threads could write one page at once (torn); one write must name a page once.
        raise ValueError("a destination block is named twice")
    if not src.is_contiguous():
        src = src.contiguous()  # never the case for an engine's pool; correct all the same
    s_pages, d_pages = _block_view(src)[l0:l1], _block_view(dst)[l0:l1]
    nbytes = s_pages.shape[0] * s_pages.shape[1] * len(s_ids) * s_pages.shape[3] * s_pages.itemsize
    threads, workers = _copy_threads()
    parts = min(workers, max(1, nbytes // PARALLEL_MIN_BYTES), max(1, len(s_ids)))
    split = _runs(s_ids, d_ids, parts)
    if parts <= 1 or threads is None:
        for runs in split:
            _copy_runs(s_pages, d_pages, runs)
        return nbytes
    futures: list[Future] = []
    try:
        for runs in split[1:]:
            futures.append(threads.submit(_copy_runs, s_pages, d_pages, runs))
        _copy_runs(s_pages, d_pages, split[0])  # the calling thread copies its share too
    finally:
        # Every part stops before this returns or raises: a failed write is aborted and its
        # blocks may be reused at once, so no thread may still be writing into them.
        wait(futures)
    for future in futures:
        future.result()  # the first part's error, if one failed
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
        _copy_threads()  # started now, not by the first transfer
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
