"""``cuda-ipc`` KV transport: a decode pod's GPU pool mapped into prefill pods on the same node.

The decode pod's engine core (the pool's owner: CUDA refuses to re-export memory it imported)
exports the pool's allocation once as a CUDA IPC handle -- the same calls torch.multiprocessing
makes (``UntypedStorage._share_cuda_`` / ``_new_shared_cuda``), but sent as plain fields, never
pickled. A prefill pod maps it once per decode pod incarnation and, after each layer group,
copies the request's pages straight into the decode pod's reserved blocks: on one GPU with one
Triton kernel on the compute stream (``page_copy.py``; in order with the steps that may reuse the
source blocks); to another GPU of the node a gather, a peer copy and a scatter on a copy stream
(untested: the GPU machines this was built on had one GPU). ``flush`` waits for the copies, so a
completion notice sent after it finds every page in place.

Requirements on Kubernetes: both pods see the GPU and share the host's IPC namespace
(``hostIPC``) and /dev/shm (torch's IPC reference counters live there); see docs/kubernetes.md.
"""

import logging

import msgspec
import torch

from tandem.transfer.page_copy import copy_pages
from tandem.transfer.transport import (
    PoolDescriptor,
    PoolExport,
    PoolWriter,
    TransportUnavailable,
    check_block_ids,
    host_id,
)

logger = logging.getLogger(__name__)


class _Payload(msgspec.Struct, frozen=True):
    device_uuid: str
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool
    storage_offset: int
    """Of the pool tensor in its storage, in elements."""


def unavailable(device_type: str) -> str | None:
    if device_type != "cuda":
        return "cuda-ipc carries GPU pools only"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


class CudaIpcPoolExport(PoolExport):
    transport = "cuda-ipc"

    def __init__(self, pool: torch.Tensor) -> None:
        if not pool.is_cuda or not pool.is_contiguous():
            raise TransportUnavailable("cuda-ipc exports a contiguous GPU pool")
        (
            _device,
            handle,
            size_bytes,
            offset_bytes,
            ref_counter_handle,
            ref_counter_offset,
            event_handle,
            event_sync_required,
        ) = pool.untyped_storage()._share_cuda_()
        payload = _Payload(
            device_uuid=_uuid(pool.device.index),
            handle=bytes(handle),
            size_bytes=int(size_bytes),
            offset_bytes=int(offset_bytes),
            ref_counter_handle=bytes(ref_counter_handle),
            ref_counter_offset=int(ref_counter_offset),
            event_handle=bytes(event_handle) if event_handle else None,
            event_sync_required=bool(event_sync_required),
            storage_offset=pool.storage_offset(),
        )
        self._pool = pool  # keeps the allocation (and so the handle) alive
        self._descriptor = PoolDescriptor(
            transport="cuda-ipc",
            host=host_id(),
            shape=tuple(pool.shape),
            dtype=str(pool.dtype).removeprefix("torch."),
            payload=msgspec.msgpack.encode(payload),
        )

    def descriptor(self) -> PoolDescriptor:
        return self._descriptor


def export_pool(pool: torch.Tensor, **_) -> PoolExport:
    return CudaIpcPoolExport(pool)


def _local_index(device_uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if _uuid(i) == device_uuid:
            return i
    return None


def check_reachable(descriptor: PoolDescriptor, local_pool: torch.Tensor) -> None:
    if not local_pool.is_cuda:
        raise TransportUnavailable("cuda-ipc carries GPU pools only (this pod's pool is on CPU)")
    try:
        payload = msgspec.msgpack.decode(descriptor.payload, type=_Payload)
    except msgspec.DecodeError as exc:
        raise TransportUnavailable(f"unreadable cuda-ipc descriptor: {exc}") from None
    if _local_index(payload.device_uuid) is None:
        raise TransportUnavailable("the decode pod's GPU is not visible to this pod")


def map_pool(descriptor: PoolDescriptor) -> torch.Tensor:
    """Open the exported pool in this process (once per export: CUDA maps a handle once)."""
    p = msgspec.msgpack.decode(descriptor.payload, type=_Payload)
    index = _local_index(p.device_uuid)
    if index is None:
        raise TransportUnavailable("the decode pod's GPU is not visible to this pod")
    torch.cuda._lazy_init()
    with torch.cuda.device(index):
        try:
            storage = torch.UntypedStorage._new_shared_cuda(
                index,
                p.handle,
                p.size_bytes,
                p.offset_bytes,
                p.ref_counter_handle,
                p.ref_counter_offset,
                p.event_handle or b"",
                p.event_sync_required,
            )
        except RuntimeError as exc:
            raise TransportUnavailable(f"cannot map the decode pod's pool: {exc}") from None
    dtype = getattr(torch, descriptor.dtype)
    pool = torch.empty(0, dtype=dtype, device=f"cuda:{index}")
    pool.set_(storage, p.storage_offset, tuple(descriptor.shape))
    return pool


class CudaIpcPoolWriter(PoolWriter):
    transport = "cuda-ipc"

    def __init__(self, descriptor: PoolDescriptor, local_pool: torch.Tensor) -> None:
        self.pool = map_pool(descriptor)
        self._src_device = local_pool.device
        # Copies run on the destination GPU's stream, after the compute that made the pages.
        self._stream = torch.cuda.Stream(self.pool.device)
        self._last: torch.cuda.Event | None = None
        self._kernel = True
        """Whether the one-pass kernel works here (else torch's gather and scatter)."""

    def write(self, src, src_ids, layers, dst_ids) -> int:
        l0, l1 = layers
        check_block_ids(src_ids, dst_ids, self.pool.shape)
        dst = self.pool
        nbytes = (l1 - l0) * 2 * len(src_ids) * src[0, 0, 0].numel() * src.element_size()
        if src.device == dst.device and self._kernel:
            # One pass (page_copy.py), on the compute stream: in order with the steps that may
            # reuse the source blocks (the request finishes and frees them), and ~1 ms per GiB.
            try:
                copy_pages(
                    src,
                    src_ids.to(src.device, non_blocking=True),
                    dst,
                    dst_ids.to(dst.device, non_blocking=True),
                    layers,
                )
            except Exception:  # noqa: BLE001 - e.g. Triton cannot compile it here
                logger.warning(
                    "the page-copy kernel failed; cuda-ipc writes fall back to torch's "
                    "gather and scatter",
                    exc_info=True,
                )
                self._kernel = False
                return self.write(src, src_ids, layers, dst_ids)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(src.device))
            self._last = event
            return nbytes
        # Another GPU of the node (or no kernel): gather here on the compute stream (same
        # ordering reason), then a peer copy if needed and the scatter on a copy stream.
        pages = src[l0:l1].index_select(2, src_ids.to(src.device, non_blocking=True))
        self._stream.wait_stream(torch.cuda.current_stream(self._src_device))
        with torch.cuda.stream(self._stream):
            if pages.device != dst.device:
                pages.record_stream(self._stream)  # read by the peer copy below
                pages = pages.to(dst.device, non_blocking=True)
            dst[l0:l1].index_copy_(2, dst_ids.to(dst.device, non_blocking=True), pages)
            pages.record_stream(self._stream)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._last = event
        return nbytes

    def flush(self) -> None:
        if self._last is not None:
            self._last.synchronize()

    def close(self) -> None:
        self.flush()
        self.pool = None


def open_writer(descriptor: PoolDescriptor, local_pool: torch.Tensor) -> PoolWriter:
    return CudaIpcPoolWriter(descriptor, local_pool)
