"""The ``nixl`` KV transport over real NIXL and UCX (host memory, loopback), no mocks.

The process tests run the decode side (a CPU pool exported with ``export_pool("nixl", ...)``) in
a spawned process, as a decode pod would, and write into it from this process through
``open_writer``; the decode process reads its pool back over a pipe on request, so every check
is against the bytes that actually landed in the other process's memory.
"""

import importlib
import multiprocessing
import sys
import time

import msgspec
import pytest
import torch

from tandem.api.errors import KVTransferError
from tandem.transfer import transport as tr
from tandem.transfer.transport import TransportUnavailable

# NIXL ships Linux wheels only (the test extra installs it there); elsewhere these tests skip.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="NIXL has Linux wheels only")

LAYERS, BLOCK, HEADS, DIM = 4, 4, 2, 8
DECODE_BLOCKS = 8  # + 1 scratch block, as PagedKVCache allocates: never written here
PREFILL_BLOCKS = 12
DTYPE = torch.bfloat16


def _shape(blocks: int) -> tuple[int, ...]:
    return (LAYERS, 2, blocks + 1, BLOCK, HEADS, DIM)


def _decode_side(conn, shape: tuple[int, ...], dtype: str, device: str) -> None:
    """A decode pod: exports a zeroed pool over nixl and answers ``read`` / ``clear`` /
    ``close`` (stop exporting, keep the pool) / ``export`` (export it again: a new descriptor)
    / ``exit`` on ``conn``."""
    pool = torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
    export = tr.export_pool("nixl", pool)
    conn.send_bytes(tr.descriptor_encoder.encode(export.descriptor()))
    try:
        while True:
            try:
                op = conn.recv()
            except EOFError:
                return
            if op == "read":
                conn.send_bytes(pool.view(torch.uint8).cpu().numpy().tobytes())
            elif op == "clear":
                pool.zero_()
                conn.send("ok")
            elif op == "close":
                export.close()
                conn.send("ok")
            elif op == "export":
                export.close()
                export = tr.export_pool("nixl", pool)
                conn.send_bytes(tr.descriptor_encoder.encode(export.descriptor()))
            else:
                return
    finally:
        export.close()


class DecodePod:
    def __init__(self, blocks: int = DECODE_BLOCKS, device: str = "cpu") -> None:
        self.shape = _shape(blocks)
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_decode_side,
            args=(child, self.shape, str(DTYPE).removeprefix("torch."), device),
        )
        self.proc.start()
        child.close()
        self.descriptor = tr.descriptor_decoder.decode(self._recv(bytes_=True, timeout=60))

    def _recv(self, bytes_: bool = False, timeout: float = 10):
        if not self.conn.poll(timeout):
            raise AssertionError(f"the decode process did not answer in {timeout} s")
        try:
            return self.conn.recv_bytes() if bytes_ else self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise AssertionError(
                f"the decode process exited (status {self.proc.exitcode})"
            ) from None

    def ask(self, op: str):
        self.conn.send(op)
        return self._recv()

    def export(self) -> None:
        """Export the pool again (after ``close``): a new agent, a new descriptor."""
        self.conn.send("export")
        self.descriptor = tr.descriptor_decoder.decode(self._recv(bytes_=True, timeout=30))

    def read(self) -> torch.Tensor:
        """The decode pool, as it is in the decode process's memory now."""
        self.conn.send("read")
        raw = bytearray(self._recv(bytes_=True))
        return torch.frombuffer(raw, dtype=torch.uint8).view(DTYPE).view(self.shape)

    def stop(self) -> None:
        try:
            self.conn.send("exit")
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


@pytest.fixture(scope="module")
def decode_pod():
    pod = DecodePod()
    yield pod
    pod.stop()


def _prefill_pool(seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(_shape(PREFILL_BLOCKS), generator=g).to(device, DTYPE)


def _ids(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality."""
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


# Runs that coalesce on both sides (3,4,5 -> 1,2,3), one contiguous only at the source (9,10 ->
# 7,5), single pages, and block 0.
SRC = [3, 4, 5, 9, 10, 0, 12]
DST = [1, 2, 3, 7, 5, 0, 6]


@pytest.mark.integration  # a decode process
@pytest.mark.timeout(60)
def test_pages_land_exactly_in_another_process_per_layer_group(decode_pod):
    decode_pod.ask("clear")
    local = _prefill_pool()
    writer = tr.open_writer(decode_pod.descriptor, local)
    try:
        page = BLOCK * HEADS * DIM * DTYPE.itemsize
        want = torch.zeros(decode_pod.shape, dtype=DTYPE)
        # First layer group, flushed alone: only it lands.
        assert writer.write(local, _ids(SRC), (0, 1), _ids(DST)) == 1 * 2 * len(SRC) * page
        writer.flush()
        want[0:1, :, DST] = local[0:1, :, SRC]
        assert _same(decode_pod.read(), want)
        # The other groups queued together (several transfers in flight), one flush.
        assert writer.write(local, _ids(SRC), (1, 3), _ids(DST)) == 2 * 2 * len(SRC) * page
        assert writer.write(local, _ids(SRC[:3]), (3, 4), _ids(DST[:3])) == 2 * 3 * page
        assert writer.write(local, _ids(SRC[3:]), (3, 4), _ids(DST[3:])) == 2 * 4 * page
        writer.flush()
        want[:, :, DST] = local[:, :, SRC]
        got = decode_pod.read()
        assert _same(got, want)
        assert not got[:, :, DECODE_BLOCKS].any()  # the scratch block
        # Nothing queued: flush returns at once; empty writes queue nothing.
        writer.flush()
        assert writer.write(local, _ids([]), (0, LAYERS), _ids([])) == 0
        assert writer.write(local, _ids(SRC), (2, 2), _ids(DST)) == 0
    finally:
        writer.close()


@pytest.mark.integration  # a decode process
@pytest.mark.timeout(60)
def test_bad_ids_are_refused_and_nothing_is_written(decode_pod):
    decode_pod.ask("clear")
    local = _prefill_pool(seed=1)
    writer = tr.open_writer(decode_pod.descriptor, local)
    try:
        bad = [
            ([0, 1], [2, DECODE_BLOCKS + 1]),  # past the decode pool (its scratch block is last)
            ([0, 1], [2, DECODE_BLOCKS + 100]),
            ([0, 1], [2, -1]),
            ([0, PREFILL_BLOCKS + 1], [2, 3]),  # past this pod's pool
            ([0, 1, 2], [2, 3]),  # lengths differ
        ]
        for src, dst in bad:
            with pytest.raises(KVTransferError):
                writer.write(local, _ids(src), (0, LAYERS), _ids(dst))
        with pytest.raises(KVTransferError):
            writer.write(local, _ids([0]), (0, LAYERS + 1), _ids([0]))
        with pytest.raises(KVTransferError):  # not the registered pool
            writer.write(local.clone(), _ids([0]), (0, 1), _ids([0]))
        writer.flush()
        assert not decode_pod.read().any()
        # Refusals do not break the writer.
        writer.write(local, _ids([1, 2]), (0, LAYERS), _ids([DECODE_BLOCKS - 1, 0]))
        writer.flush()
        want = torch.zeros(decode_pod.shape, dtype=DTYPE)
        want[:, :, [DECODE_BLOCKS - 1, 0]] = local[:, :, [1, 2]]
        assert _same(decode_pod.read(), want)
    finally:
        writer.close()
    with pytest.raises(KVTransferError):  # closed
        writer.write(local, _ids([0]), (0, 1), _ids([0]))


def _fails_within(seconds: float, attempt) -> BaseException:
    """Call ``attempt`` until it raises (returns the exception), failing after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            attempt()
        except (KVTransferError, TransportUnavailable) as exc:
            return exc
        assert time.monotonic() < deadline, f"still writing {seconds} s after the export closed"
        time.sleep(0.05)


@pytest.mark.integration  # a decode process
@pytest.mark.timeout(60)
def test_writers_fail_once_the_export_is_closed(decode_pod):
    pod = decode_pod
    try:
        local = _prefill_pool(seed=2)
        writer = tr.open_writer(pod.descriptor, local)
        writer.write(local, _ids(SRC), (0, LAYERS), _ids(DST))
        writer.flush()  # connected, and it works
        assert pod.ask("close") == "ok"

        def write_and_flush() -> None:
            writer.write(local, _ids(SRC), (0, LAYERS), _ids(DST))
            writer.flush()

        assert isinstance(_fails_within(10, write_and_flush), KVTransferError)
        with pytest.raises(KVTransferError):  # a failed writer stays failed
            writer.flush()
        writer.close()

        # A writer opened after the close: refused when it connects, or at its first write.
        def open_and_write() -> None:
            late = tr.open_writer(pod.descriptor, local)
            try:
                late.write(local, _ids(SRC), (0, LAYERS), _ids(DST))
                late.flush()
            finally:
                late.close()

        _fails_within(10, open_and_write)
    finally:
        pod.export()  # for the tests after this one


# ---- in one process (fast) ------------------------------------------------------------------


def test_available_for_cpu_and_cuda_pools():
    nixl_transport = importlib.import_module("tandem.transfer.nixl_transport")
    assert nixl_transport.unavailable("cpu") is None
    assert (nixl_transport.unavailable("cuda") is None) == torch.cuda.is_available()
    assert nixl_transport.unavailable("mps")
    assert "nixl" in tr.local_transports("cpu")


def test_without_nixl_the_transport_is_unavailable(monkeypatch):
    for package in ("nixl", "nixl_cu12", "nixl_cu13"):
        for module in (package, f"{package}._api", f"{package}._bindings"):
            monkeypatch.setitem(sys.modules, module, None)  # import fails
    monkeypatch.delitem(sys.modules, "tandem.transfer.nixl_transport", raising=False)
    assert "nixl" not in tr.local_transports("cpu")
    with pytest.raises(TransportUnavailable, match="NIXL is not installed"):
        tr.export_pool("nixl", torch.zeros(_shape(1)))


def test_descriptor_and_loopback_write_in_one_process():
    remote = torch.zeros(_shape(DECODE_BLOCKS), dtype=DTYPE)
    export = tr.export_pool("nixl", remote, path="/ignored")
    try:
        d = export.descriptor()
        assert (d.transport, d.host, d.shape, d.dtype) == (
            "nixl",
            tr.host_id(),
            _shape(DECODE_BLOCKS),
            "bfloat16",
        )
        assert tr.descriptor_decoder.decode(tr.descriptor_encoder.encode(d)) == d
        payload = msgspec.msgpack.decode(d.payload)
        assert payload["mem"] == "DRAM" and payload["addr"] == remote.data_ptr()
        assert payload["nbytes"] == remote.numel() * remote.element_size()
        assert payload["agent"] and payload["metadata"]

        local = _prefill_pool(seed=3)
        writer = tr.open_writer(d, local)
        try:
            writer.write(local, _ids(SRC), (1, 3), _ids(DST))
            writer.flush()
        finally:
            writer.close()
        want = torch.zeros_like(remote)
        want[1:3, :, DST] = local[1:3, :, SRC]
        assert _same(remote, want)
    finally:
        export.close()


def test_runs_of_blocks_become_one_descriptor():
    remote = torch.zeros(_shape(DECODE_BLOCKS), dtype=DTYPE)
    export = tr.export_pool("nixl", remote)
    local = _prefill_pool()
    writer = tr.open_writer(export.descriptor(), local)
    try:
        page = BLOCK * HEADS * DIM * DTYPE.itemsize
        s, d = torch.tensor(SRC).numpy(), torch.tensor(DST).numpy()
        src_descs, dst_descs = writer._descs(local, s, d, 1, 3)
        # 3,4,5 -> 1,2,3 merge; 9,10 -> 7,5 do not (the destination is not contiguous).
        runs = [(3, 1, 3), (9, 7, 1), (10, 5, 1), (0, 0, 1), (12, 6, 1)]
        assert len(src_descs) == len(dst_descs) == 2 * 2 * len(runs)
        rows = iter(zip(src_descs.tolist(), dst_descs.tolist(), strict=True))
        for plane in range(2 * 1, 2 * 3):  # layer * 2 + kv
            for sb, db, n in runs:
                (sa, sl, _), (da, dl, _) = next(rows)
                assert sa == local.data_ptr() + (plane * (PREFILL_BLOCKS + 1) + sb) * page
                assert da == remote.data_ptr() + (plane * (DECODE_BLOCKS + 1) + db) * page
                assert sl == dl == n * page
    finally:
        writer.close()
        export.close()


def test_unreachable_descriptors_are_refused():
    remote = torch.zeros(_shape(DECODE_BLOCKS), dtype=DTYPE)
    export = tr.export_pool("nixl", remote)
    try:
        d = export.descriptor()
        with pytest.raises(TransportUnavailable):  # another dtype
            tr.check_reachable(d, torch.zeros(_shape(PREFILL_BLOCKS), dtype=torch.float16))
        with pytest.raises(TransportUnavailable):  # other pages
            tr.check_reachable(d, torch.zeros(LAYERS, 2, 3, BLOCK, HEADS, DIM + 1, dtype=DTYPE))
        with pytest.raises(TransportUnavailable):
            tr.check_reachable(msgspec.structs.replace(d, payload=b"\x01junk"), _prefill_pool())
        # An advertised region too small for the advertised shape: refused before any write.
        small = msgspec.msgpack.decode(d.payload)
        small["nbytes"] -= 1
        with pytest.raises(TransportUnavailable):
            tr.check_reachable(
                msgspec.structs.replace(d, payload=msgspec.msgpack.encode(small)),
                _prefill_pool(),
            )
        with pytest.raises(TransportUnavailable):  # not contiguous
            tr.export_pool("nixl", remote.transpose(0, 1))
    finally:
        export.close()


# ---- GPU pools (VRAM; run where CUDA is) ----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.integration  # a decode process
@pytest.mark.timeout(120)
def test_gpu_pages_land_exactly_in_another_process_after_the_compute():
    pod = DecodePod(device="cuda")
    try:
        local = _prefill_pool(seed=5, device="cuda")
        writer = tr.open_writer(pod.descriptor, local)
        try:
            assert msgspec.msgpack.decode(pod.descriptor.payload)["mem"] == "VRAM"
            want = torch.zeros(pod.shape, dtype=DTYPE)
            for l0, l1 in [(0, 1), (1, 3)]:
                writer.write(local, _ids(SRC).cuda(), (l0, l1), _ids(DST))
            # The last group's pages are still being computed when it is written: the write
            # must wait for the stream, not read what was there before.
            torch.cuda._sleep(200_000_000)
            local[3:4, :, SRC] = 7.0
            writer.write(local, _ids(SRC).cuda(), (3, 4), _ids(DST))
            writer.flush()
            want[:, :, DST] = local[:, :, SRC].cpu()
            assert _same(pod.read(), want)
        finally:
            writer.close()
    finally:
        pod.stop()


@pytest.mark.gpu
def test_gpu_loopback_write_in_one_process():
    remote = torch.zeros(_shape(DECODE_BLOCKS), dtype=DTYPE, device="cuda")
    export = tr.export_pool("nixl", remote)
    try:
        local = _prefill_pool(seed=6, device="cuda")
        writer = tr.open_writer(export.descriptor(), local)
        try:
            writer.write(local, _ids(SRC), (0, LAYERS), _ids(DST))
            writer.flush()
        finally:
            writer.close()
        want = torch.zeros_like(remote)
        want[:, :, DST] = local[:, :, SRC]
        assert _same(remote, want)
    finally:
        export.close()
