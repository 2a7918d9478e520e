"""``nixl`` KV transport: one-sided writes into a decode pod's pool through NVIDIA NIXL.

The decode pod registers its KV pool with a NIXL agent (UCX backend: RDMA, TCP, shared memory,
CUDA IPC -- whatever UCX finds between the two pods, on one host or across hosts) and advertises
the agent's metadata with the pool's address. A prefill pod loads that metadata into its own
agent once per decode pod incarnation and, after each layer group, posts one NIXL WRITE from
its pool's pages to the reserved blocks: no code runs on the decode pod per page (UCX's progress
thread serves transports that need the target's help, such as TCP). ``flush`` polls the posted
transfers until they have landed.

A page ``(layer, K|V, block)`` is one contiguous run of bytes in each pool, so a write is a list
of (address, length) pairs; runs of consecutive blocks on both sides become one descriptor.

Caveats:

- NIXL's Python API starts each agent's progress thread with no delay between polls: it keeps a
  CPU core busy in every process holding an agent (measured: 5 s of CPU per 5 s idle). So
  ``auto`` never picks nixl (``transport.AUTO_TRANSPORTS``); pods start agents only with
  ``--kv-transport nixl``.

- NIXL does not order its reads of GPU memory after CUDA streams, so a write from a GPU pool
  first waits for the current stream (the layer group's compute) before posting.
- A failed or timed-out transfer breaks the writer for good (every later ``write`` / ``flush``
  raises): one writer serves every request to a decode pod, and a ``flush`` that lost track of
  a failed transfer could otherwise let another request's completion notice go out with pages
  missing. The next incarnation of the pod gets a new writer.
- Install with ``pip install 'tandem[nixl]'`` (the ``nixl`` meta package picks the CUDA 12 or 13
  build); a single backend wheel (``nixl-cu12`` / ``nixl-cu13``) works on its own too.
"""

import contextlib
import importlib
import logging
import os
import threading
import time
import uuid

import msgspec
import numpy as np
import torch

from tandem.api.errors import KVTransferError
from tandem.transfer.transport import (
    PoolDescriptor,
    PoolExport,
    PoolWriter,
    TransportUnavailable,
    host_id,
    pool_bytes_per_page,
)


def _import_nixl():
    """NIXL's Python API: the ``nixl`` meta package, else a backend wheel installed alone.

    Raises:
        ImportError: none installed (``transport._module`` turns it into TransportUnavailable).
    """
    raise_exceptions = logging.raiseExceptions  # nixl's logging set-up clears it process-wide
    errors = []
    try:
        for package in ("nixl", "nixl_cu12", "nixl_cu13"):
            try:
                api = importlib.import_module(f"{package}._api")
                bindings = importlib.import_module(f"{package}._bindings")
            except ImportError as exc:
                errors.append(f"{package}: {exc}")
                continue
            return api, bindings
    finally:
        logging.raiseExceptions = raise_exceptions
    raise ImportError("NIXL is not installed (pip install 'tandem[nixl]'): " + "; ".join(errors))


_api, _bindings = _import_nixl()
if not os.environ.get("NIXL_LOG_LEVEL"):
    # nixl logs every agent's creation at INFO on stdout; NIXL_LOG_LEVEL still overrides this.
    logging.getLogger("nixl").setLevel(logging.WARNING)

_NIXL_ERRORS: tuple[type[BaseException], ...] = (
    *(
        obj
        for name, obj in vars(_bindings).items()
        if name.startswith("nixl")
        and name.endswith("Error")
        and isinstance(obj, type)
        and issubclass(obj, BaseException)
    ),
    RuntimeError,
)
"""What NIXL raises (its bindings' errors share no base class but Exception)."""

FLUSH_TIMEOUT_S = 60.0
"""How long ``flush`` waits for posted transfers before giving up on the writer."""


class _Payload(msgspec.Struct, frozen=True):
    agent: str
    """The decode pod's agent name (the metadata names it too)."""
    metadata: bytes
    """``nixl_agent.get_agent_metadata()``: connection info and the registered pool."""
    addr: int
    """The pool's base address in the decode pod's process."""
    nbytes: int
    mem: str
    """``DRAM`` (CPU pool) or ``VRAM`` (GPU pool)."""
    device: int
    """The GPU index in the decode pod's process (0 for DRAM)."""


def unavailable(device_type: str) -> str | None:
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    return f"nixl carries CPU and CUDA pools only, not {device_type}"


def _region(pool: torch.Tensor) -> tuple[str, int, int, int]:
    """``(mem, addr, nbytes, device)`` of a contiguous CPU or CUDA tensor."""
    if not pool.is_contiguous():
        raise TransportUnavailable("nixl registers a contiguous pool")
    if pool.device.type == "cpu":
        mem, device = "DRAM", 0
    elif pool.device.type == "cuda":
        mem, device = "VRAM", pool.device.index if pool.device.index is not None else 0
    else:
        raise TransportUnavailable(f"nixl carries CPU and CUDA pools only, not {pool.device}")
    return mem, pool.data_ptr(), pool.numel() * pool.element_size(), device


def _new_agent(role: str):
    """A NIXL agent with the UCX backend (no listener thread: metadata travels in descriptors).

    Raises:
        TransportUnavailable: NIXL or its UCX plugin cannot start here.
    """
    name = f"tandem-{role}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        agent = _api.nixl_agent(name, _api.nixl_agent_config(backends=["UCX"]))
    except _NIXL_ERRORS as exc:
        raise TransportUnavailable(f"nixl: cannot start an agent: {exc!r}") from None
    if "UCX" not in agent.backends:
        raise TransportUnavailable("nixl: the UCX backend plugin is not available")
    return agent


def _register(agent, mem: str, addr: int, nbytes: int, device: int):
    try:
        return agent.register_memory([(addr, nbytes, device, "")], mem, backends=["UCX"])
    except _NIXL_ERRORS as exc:
        raise TransportUnavailable(f"nixl: cannot register the {mem} pool: {exc!r}") from None


class NixlPoolExport(PoolExport):
    """The decode pod's pool registered with its own NIXL agent (kept alive until ``close``)."""

    transport = "nixl"

    def __init__(self, pool: torch.Tensor) -> None:
        mem, addr, nbytes, device = _region(pool)
        self._pool = pool  # the registered memory must outlive the registration
        self._agent = _new_agent("decode")
        self._reg = _register(self._agent, mem, addr, nbytes, device)
        payload = _Payload(
            agent=self._agent.name,
            metadata=bytes(self._agent.get_agent_metadata()),
            addr=addr,
            nbytes=nbytes,
            mem=mem,
            device=device,
        )
        self._descriptor = PoolDescriptor(
            transport="nixl",
            host=host_id(),
            shape=tuple(pool.shape),
            dtype=str(pool.dtype).removeprefix("torch."),
            payload=msgspec.msgpack.encode(payload),
        )

    def descriptor(self) -> PoolDescriptor:
        return self._descriptor

    def close(self) -> None:
        agent, reg = self._agent, self._reg
        self._agent = self._reg = None
        if agent is None:
            return
        with contextlib.suppress(*_NIXL_ERRORS):
            agent.deregister_memory(reg, backends=["UCX"])
        del agent  # the agent's UCX worker goes with it: connected writers see a disconnect
        self._pool = None


def export_pool(pool: torch.Tensor, **_) -> PoolExport:
    return NixlPoolExport(pool)


def _payload(descriptor: PoolDescriptor) -> _Payload:
    try:
        return msgspec.msgpack.decode(descriptor.payload, type=_Payload)
    except msgspec.DecodeError as exc:
        raise TransportUnavailable(f"nixl: malformed pool descriptor: {exc}") from None


def check_reachable(descriptor: PoolDescriptor, local_pool: torch.Tensor) -> None:
    p = _payload(descriptor)
    reason = unavailable(local_pool.device.type)
    if reason is not None:
        raise TransportUnavailable(reason)
    if str(local_pool.dtype).removeprefix("torch.") != descriptor.dtype:
        raise TransportUnavailable(
            f"the decode pod's pool holds {descriptor.dtype}, this pod's {local_pool.dtype}"
        )
    numel = 1
    for n in descriptor.shape:
        numel *= n
    if p.nbytes != numel * local_pool.element_size() or p.mem not in ("DRAM", "VRAM"):
        raise TransportUnavailable(
            f"nixl: the advertised {p.mem} region of {p.nbytes} bytes does not hold a pool of "
            f"shape {list(descriptor.shape)}"
        )


def _ids(ids: torch.Tensor) -> np.ndarray:
    return ids.detach().to("cpu", torch.int64).numpy().reshape(-1)


class NixlPoolWriter(PoolWriter):
    """A prefill pod's NIXL agent connected to one decode pod's agent."""

    transport = "nixl"

    def __init__(self, descriptor: PoolDescriptor, local_pool: torch.Tensor) -> None:
        p = _payload(descriptor)
        self._mem, self._base, self._nbytes, self._device = _region(local_pool)
        self._pool_shape = tuple(local_pool.shape)
        self._dtype = local_pool.dtype
        self._remote = p
        self._remote_blocks = int(descriptor.shape[2])
        self._page = pool_bytes_per_page(descriptor)
        self._lock = threading.Lock()  # write (engine thread) vs flush / close (sender threads)
        self._pending: list = []  # posted transfer handles, oldest first
        self._broken: str | None = None
        self._closed = False
        self.timeout_s = FLUSH_TIMEOUT_S
        self._agent = _new_agent("prefill")
        self._reg = None
        self._remote_name: str | None = None
        try:
            self._reg = _register(self._agent, self._mem, self._base, self._nbytes, self._device)
            try:
                name = self._agent.add_remote_agent(p.metadata)
            except _NIXL_ERRORS as exc:
                raise TransportUnavailable(
                    f"nixl: cannot connect to the decode pod's agent {p.agent}: {exc!r}"
                ) from None
            self._remote_name = name.decode() if isinstance(name, bytes) else str(name)
            if self._remote_name != p.agent:
                raise TransportUnavailable(
                    f"nixl: the descriptor names agent {p.agent}, its metadata {self._remote_name}"
                )
        except BaseException:
            self._release()
            raise

    # ---- writes -----------------------------------------------------------------------------

    def _descs(self, src: torch.Tensor, s: np.ndarray, d: np.ndarray, l0: int, l1: int):
        """The local and remote ``(addr, len, device)`` arrays of pages ``(l, kv, s[i])`` ->
        ``(l, kv, d[i])`` for l in [l0, l1), runs of consecutive blocks on both sides merged."""
        n = len(s)
        page = self._page
        breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
        starts = np.concatenate(([0], breaks))
        lengths = np.diff(np.append(starts, n)) * page
        planes = np.arange(2 * l0, 2 * l1, dtype=np.int64)[:, None]  # layer * 2 + kv
        local_off = (planes * src.shape[2] + s[starts][None, :]) * page
        remote_off = (planes * self._remote_blocks + d[starts][None, :]) * page
        count = local_off.size
        local = np.empty((count, 3), dtype=np.uint64)
        local[:, 0] = (local_off + src.data_ptr()).reshape(-1)
        local[:, 1] = np.tile(lengths, len(planes))
        local[:, 2] = self._device
        remote = np.empty((count, 3), dtype=np.uint64)
        remote[:, 0] = (remote_off + self._remote.addr).reshape(-1)
        remote[:, 1] = local[:, 1]
        remote[:, 2] = self._remote.device
        return local, remote

    def _check_src(self, src: torch.Tensor) -> None:
        if (
            src.dtype != self._dtype
            or tuple(src.shape[:2]) != self._pool_shape[:2]
            or tuple(src.shape[3:]) != self._pool_shape[3:]
            or not src.is_contiguous()
        ):
            raise KVTransferError("nixl writes from a contiguous pool shaped like this pod's")
        start, end = src.data_ptr(), src.data_ptr() + src.numel() * src.element_size()
        if start < self._base or end > self._base + self._nbytes:
            raise KVTransferError("nixl writes from the pool it registered only")

    def write(self, src, src_ids, layers, dst_ids) -> int:
        l0, l1 = layers
        if self._broken is not None:
            raise KVTransferError(self._broken)
        if self._closed:
            raise KVTransferError("nixl: the writer is closed")
        self._check_src(src)
        s, d = _ids(src_ids), _ids(dst_ids)
        if len(s) != len(d):
            raise KVTransferError("source and destination block lists differ in length")
        if not 0 <= l0 <= l1 <= self._pool_shape[0]:
            raise KVTransferError(f"layers {layers} out of range [0, {self._pool_shape[0]}]")
        if len(s) == 0 or l0 == l1:
            return 0
        if int(d.min()) < 0 or int(d.max()) >= self._remote_blocks:
            raise KVTransferError(
                f"destination block out of range [0, {self._remote_blocks}) of the decode pool"
            )
        if int(s.min()) < 0 or int(s.max()) >= src.shape[2]:
            raise KVTransferError(f"source block out of range [0, {src.shape[2]})")
        local, remote = self._descs(src, s, d, l0, l1)
        if src.is_cuda:
            # NIXL reads GPU memory outside CUDA's stream order: let the layer group land first.
            torch.cuda.current_stream(src.device).synchronize()
        mem = self._mem
        with self._lock:
            if self._closed:
                raise KVTransferError("nixl: the writer is closed")
            agent = self._agent
            try:
                handle = agent.initialize_xfer(
                    "WRITE",
                    agent.get_xfer_descs(local, mem),
                    agent.get_xfer_descs(remote, self._remote.mem),
                    self._remote_name,
                )
            except _NIXL_ERRORS as exc:
                # Validated above, so the decode pod's agent went away or lost its registration.
                raise self._break(f"nixl: cannot prepare the write: {exc!r}") from None
            try:
                state = agent.transfer(handle)
            except _NIXL_ERRORS as exc:
                self._release_handle(handle)
                raise self._break(f"nixl: posting the write failed: {exc!r}") from None
            if state == "ERR":
                self._release_handle(handle)
                raise self._break("nixl: posting the write failed")
            self._pending.append(handle)
            if len(self._pending) >= 64:
                self._reap()
        return (l1 - l0) * 2 * len(s) * self._page

    def _break(self, reason: str) -> KVTransferError:
        """Mark the writer broken (see the module's caveats); returns the error to raise."""
        if self._broken is None:
            self._broken = reason
        return KVTransferError(reason)

    def _release_handle(self, handle) -> None:
        with contextlib.suppress(*_NIXL_ERRORS):
            handle.release()

    def _reap(self, upto: int | None = None) -> int:
        """Release the finished transfers among the first ``upto`` pending (all: None); returns
        how many of those are still in progress. Holds ``_lock``.

        Raises:
            KVTransferError: one failed (the writer is broken from then on).
        """
        agent = self._agent
        window = self._pending if upto is None else self._pending[:upto]
        keep = []
        failed = None
        for handle in window:
            try:
                state = agent.check_xfer_state(handle)
            except _NIXL_ERRORS as exc:
                state, failed = "ERR", failed or repr(exc)
            if state == "PROC":
                keep.append(handle)
            else:
                if state != "DONE":
                    failed = failed or "the transfer reported an error"
                self._release_handle(handle)
        self._pending[: len(window)] = keep
        if failed is not None:
            raise self._break(f"nixl: a write to the decode pod failed: {failed}")
        return len(keep)

    def flush(self) -> None:
        if self._broken is not None:
            raise KVTransferError(self._broken)
        with self._lock:
            upto = len(self._pending)  # those queued before this call
        deadline = time.monotonic() + self.timeout_s
        delay = 20e-6
        while upto:
            with self._lock:
                if self._closed:
                    raise KVTransferError("nixl: the writer is closed")
                upto = self._reap(min(upto, len(self._pending)))
            if not upto:
                break
            if time.monotonic() > deadline:
                raise self._break(
                    f"nixl: writes to the decode pod did not complete in {self.timeout_s:.0f} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)
        if self._broken is not None:
            raise KVTransferError(self._broken)

    # ---- teardown ---------------------------------------------------------------------------

    def _release(self) -> None:
        agent = self._agent
        if agent is None:
            return
        for handle in self._pending:
            self._release_handle(handle)  # an unfinished one is cancelled (or leaked by NIXL)
        self._pending = []
        if self._remote_name is not None:
            with contextlib.suppress(*_NIXL_ERRORS):
                agent.remove_remote_agent(self._remote_name)
            self._remote_name = None
        if self._reg is not None:
            with contextlib.suppress(*_NIXL_ERRORS):
                agent.deregister_memory(self._reg, backends=["UCX"])
            self._reg = None
        self._agent = None

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._broken is None:
                with contextlib.suppress(KVTransferError):
                    self.flush()
        finally:
            with self._lock:
                self._closed = True
                self._release()


def open_writer(descriptor: PoolDescriptor, local_pool: torch.Tensor) -> PoolWriter:
    check_reachable(descriptor, local_pool)
    return NixlPoolWriter(descriptor, local_pool)
