"""Paged KV cache: one tensor holding every layer's K and V pages.

Layout ``[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]``: a block id
indexes the same page in every layer, so a request's pages for a group of layers are one
gather (``tensor[l0:l1, :, block_ids]``), which the KV sender relies on.
"""

import ctypes
import errno
import logging
import os
import sys
from dataclasses import dataclass

import torch

from tandem.api.errors import ModelLoadError
from tandem.model_dir import ModelConfig

logger = logging.getLogger(__name__)

_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
"""Linux 5.14+: fault every page of a range in, writable, now (madvise(2))."""
_PAGE = 4096


def _free_bytes(directory: str) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def prefault(tensor: torch.Tensor) -> bool:
    """Map every page of a CPU tensor's memory into this process, writable, in one call.

    A file-backed pool (``PagedKVCache(path=...)``) is otherwise mapped page by page on first
    touch: a minor fault per 4 KiB page, which made a shared-memory KV write into pages the
    writer had not touched yet ~3x slower than into touched ones (bench/NOTES.md). On the pool's
    owner it also allocates the pool's memory up front (charged to the owner's cgroup, not to a
    writer's). Returns False where the kernel cannot (not Linux, or older than 5.14): pages then
    fault in on first touch, as before.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    addr = tensor.data_ptr()
    start = addr - addr % _PAGE
    length = addr + tensor.numel() * tensor.element_size() - start
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(start, length, _MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a kernel without it
            logger.debug("madvise(MADV_POPULATE_WRITE) is not supported: errno %d", err)
            return False
        # ENOMEM, EFAULT (the file system is full), EHWPOISON: the memory is not there.
        raise OSError(err, f"pre-faulting {length} bytes failed: {os.strerror(err)}")
    return True


def _mount_huge_option(path: str, mounts: str = "/proc/mounts") -> str:
    """The ``huge=`` option of the tmpfs holding ``path`` (``never`` when not a tmpfs or not
    said), as ``/proc/mounts`` tells: the longest mount point holding the path decides."""
    best, option = "", "never"
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 4:
                    continue
                where, kind, opts = fields[1], fields[2], fields[3]
                holds = path == where or path.startswith(where.rstrip("/") + "/")
                if holds and len(where) > len(best):
                    best = where
                    huge = [o.split("=", 1)[1] for o in opts.split(",") if o.startswith("huge=")]
                    option = huge[0] if kind == "tmpfs" and huge else "never"
    except OSError:
        pass
    return option


def hugepages_on_advice(
    path: str,
    shmem_enabled: str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
    mounts: str = "/proc/mounts",
) -> bool:
    """The kernel holds the shared-memory file ``path`` in huge pages only where its mapping
    asks (``madvise(MADV_HUGEPAGE)``): its tmpfs is mounted ``huge=advise``, and the kernel
    neither forces nor denies huge pages on every tmpfs (``shmem_enabled``). Where the mount says
    ``always`` or ``within_size`` the pages are huge without asking; ``never``: not at all."""
    try:
        with open(shmem_enabled) as f:
            setting = f.read()
    except OSError:  # a kernel without transparent huge pages
        return False
    if "[force]" in setting or "[deny]" in setting:
        return False
    return _mount_huge_option(path, mounts) == "advise"


def advise_hugepages(tensor: torch.Tensor, path: str) -> bool:
    """Ask for huge pages (``madvise(MADV_HUGEPAGE)``) on the mapping of a pool file whose tmpfs
    gives them on advice only (``hugepages_on_advice``): fewer TLB misses on a pool of many GiB.
    The owner asks before it pre-faults the pool: pages already there stay as they are. Best
    effort: False (logged at debug) where it does not or cannot."""
    if not sys.platform.startswith("linux") or not hugepages_on_advice(path):
        logger.debug("%s is not on a huge=advise tmpfs; huge pages not asked for", path)
        return False
    addr = tensor.data_ptr()
    start = addr - addr % _PAGE  # the mapping's start (the kernel aligns it for huge pages)
    end = addr + tensor.numel() * tensor.element_size()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        failed = libc.madvise(start, end - start, _MADV_HUGEPAGE) != 0
    except (OSError, AttributeError) as exc:
        logger.debug("madvise is not available: %s", exc)
        return False
    if failed:
        err = ctypes.get_errno()
        logger.debug(
            "madvise(MADV_HUGEPAGE) on %s failed: %s", path, os.strerror(err or errno.EINVAL)
        )
        return False
    return True


@dataclass(slots=True, frozen=True)
class KVCacheSpec:
    """Shape of one KV page across all layers."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        block_size: int,
        dtype: torch.dtype,
        *,
        num_kv_heads: int | None = None,
    ) -> "KVCacheSpec":
        """``num_kv_heads``: the kv heads one tensor-parallel rank holds (``Shard.num_kv_heads``);
        None: all of the model's."""
        heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
        return cls(config.num_layers, heads, config.head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block id across all layers, K and V."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize


def rank_pool_path(path: str, rank: int) -> str:
    """The pool file of tensor-parallel rank ``rank`` when rank 0's is ``path`` (a decode pod
    shares every rank's pool with its front, whose KV receiver writes each rank's heads)."""
    return path if rank == 0 else f"{path}.rank{rank}"


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
            nbytes = numel * spec.dtype.itemsize
            free = _free_bytes(os.path.dirname(self.path) or ".")
            if free is not None and free < nbytes:
                # Otherwise the pool would fill the file system later, under load: SIGBUS.
                raise ModelLoadError(
                    f"the KV pool needs {nbytes / 2**30:.2f} GiB in {os.path.dirname(self.path)} "
                    f"but {free / 2**30:.2f} GiB is free there: lower kv_cache_memory_bytes "
                    "(or num_kv_blocks), or give the shared-memory directory more room "
                    "(TANDEM_SHM_DIR; a container's /dev/shm size)"
                )
            with open(self.path, "wb"):  # a fresh, empty file: from_file grows it with zeros
                pass
            self.tensor = torch.from_file(self.path, shared=True, size=numel, dtype=spec.dtype)
            self.tensor = self.tensor.view(shape)
            advise_hugepages(self.tensor, self.path)  # before any page exists: huge from the start
            try:
                prefault(self.tensor)  # the whole pool allocated now, by its owner
            except OSError as exc:  # e.g. another pod took the room since the check above
                self.tensor = None
                os.unlink(self.path)
                raise ModelLoadError(
                    f"the KV pool could not be allocated in {os.path.dirname(self.path)}: {exc}"
                    " (lower kv_cache_memory_bytes, or give the shared-memory directory more "
                    "room)"
                ) from None
        else:
            # Zeros, not empty: attention multiplies masked-out V rows by 0, and 0 * NaN is NaN.
            self.tensor = torch.zeros(shape, dtype=spec.dtype, device=device)

    def layer(self, index: int) -> torch.Tensor:
        """``[2, num_blocks, block_size, num_kv_heads, head_dim]`` view of one layer."""
        return self.tensor[index]
