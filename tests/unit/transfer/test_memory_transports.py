"""Memory transports at the pool level (shm here; nixl in its own module, cuda-ipc on a GPU):
the lease protocol of ``KVReceiver``, the writers, and how a transport is chosen."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from opentelemetry.context import Context

from tandem.api.errors import KVTransferError, KVTransferForbidden
from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
from tandem.proto.common.v1 import common_pb2
from tandem.transfer.receiver import KVReceiver, page_checksum
from tandem.transfer.transport import (
    LocalPool,
    PoolDescriptor,
    TransportUnavailable,
    choose,
    export_pool,
    open_writer,
)

SPEC = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.bfloat16)


@pytest.fixture
def decode_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_SHM_DIR", str(tmp_path))  # pool files live in the shm directory
    cache = PagedKVCache(SPEC, 32, torch.device("cpu"), path=str(tmp_path / "tandem-kv-pool"))
    export = export_pool("shm", cache.tensor, path=cache.path)
    return cache, export.descriptor()


def source(blocks: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((4, 2, blocks + 1, 4, 2, 8), generator=g).to(torch.bfloat16)


def end(rid, token, **kw) -> common_pb2.KVTransferEnd:
    return common_pb2.KVTransferEnd(
        request_id=rid, model_fingerprint="fp", transfer_token=token, transport="shm", **kw
    )


def test_pages_land_exactly_through_the_mapping(decode_pool):
    cache, descriptor = decode_pool
    receiver = KVReceiver(cache.tensor, SPEC, "fp")
    lease = receiver.expect("r", [7, 3, 9, 20, 1], 1)
    claim = receiver.claim("r", lease.token, "shm")
    assert claim.block_ids == [7, 3, 9, 20, 1] and claim.first_block == 1  # where to write
    src = source()
    writer = open_writer(descriptor, src)
    src_ids = torch.tensor([2, 5, 11, 0])
    dst = [3, 9, 20, 1]
    for layers in ((0, 2), (2, 4)):
        writer.write(src, src_ids, layers, torch.tensor(dst))
    writer.flush()
    checksum = page_checksum(src.index_select(2, src_ids))
    summary = receiver.complete_memory(end("r", lease.token, checksum=checksum))
    assert summary.transport == "shm" and summary.bytes == 4 * 4 * 2 * 4 * 2 * 8 * 2
    assert torch.equal(cache.tensor[:, :, dst], src[:, :, src_ids])
    assert not receiver.expects("r")


def test_a_partial_write_fails_the_checksum(decode_pool):
    cache, descriptor = decode_pool
    receiver = KVReceiver(cache.tensor, SPEC, "fp")
    lease = receiver.expect("r", [4, 5], 0)
    receiver.claim("r", lease.token, "shm")
    src = source()
    ids = torch.tensor([1, 2])
    open_writer(descriptor, src).write(src, ids, (0, 2), torch.tensor([4, 5]))  # half the layers
    with pytest.raises(KVTransferError, match="checksum"):
        receiver.complete_memory(
            end("r", lease.token, checksum=page_checksum(src.index_select(2, ids)))
        )


def test_out_of_range_blocks_are_refused_and_nothing_is_written(decode_pool):
    cache, descriptor = decode_pool
    before = cache.tensor.clone()
    src = source()
    writer = open_writer(descriptor, src)
    with pytest.raises(KVTransferError):
        writer.write(src, torch.tensor([1, 2]), (0, 4), torch.tensor([3, 33]))
    with pytest.raises(KVTransferError):
        writer.write(src, torch.tensor([1, 2]), (0, 4), torch.tensor([3]))
    with pytest.raises(ValueError, match="twice"):  # shm's copy threads would tear it
        writer.write(src, torch.tensor([1, 2]), (0, 4), torch.tensor([3, 3]))
    assert torch.equal(cache.tensor, before)


def test_a_claim_naming_a_block_twice_fails_its_transfer_before_any_write(decode_pool):
    """The claim's ids are checked for duplicates once, when the transfer is set up (not on each
    layer-group write): nothing is written, the transfer fails and sends its abort notice."""
    from tandem.transfer.memory_push import MemoryTransfer
    from tandem.transfer.push_streams import KVTarget

    cache, descriptor = decode_pool
    before = cache.tensor.clone()
    src = source()
    notices = []
    target = KVTarget(
        "decode:1", "r1", 0, "fp", transfer_token="t", transport="shm", block_ids=(3, 5, 3),
        lease_expires_unix_ms=int((time.time() + 60) * 1000),
    )  # fmt: skip
    transfer = MemoryTransfer(
        target, 3, open_writer(descriptor, src), lambda e, **kw: notices.append(e), 5.0
    )
    assert transfer.failed
    for layers in ((0, 2), (2, 4)):
        transfer.write(src, [1, 2, 4], layers, 0, 3)
    assert transfer.writes == 0 and torch.equal(cache.tensor, before)
    with pytest.raises(
        KVTransferError, match="failed: shm write failed: a destination block id is named twice"
    ):
        transfer.finish(end("r1", "t"))
    assert [n.aborted for n in notices] == [True]


def test_forged_unclaimed_and_late_notices_are_refused(decode_pool):
    cache, _ = decode_pool
    receiver = KVReceiver(cache.tensor, SPEC, "fp")
    lease = receiver.expect("r", [1, 2], 0)
    with pytest.raises(KVTransferForbidden):
        receiver.claim("r", "forged", "shm")
    with pytest.raises(KVTransferForbidden):
        receiver.complete_memory(end("r", lease.token))  # not claimed
    assert receiver.expects("r")  # none of that harmed the reservation
    receiver.claim("r", lease.token, "shm")
    with pytest.raises(KVTransferError):
        receiver.claim("r", lease.token, "nixl")  # one transport per transfer
    receiver.complete_memory(end("r", lease.token))
    with pytest.raises(KVTransferForbidden):
        receiver.complete_memory(end("r", lease.token))  # late: the lease is gone


def test_a_discarded_claimed_lease_holds_its_blocks_until_the_writer_stops(decode_pool):
    cache, _ = decode_pool
    receiver = KVReceiver(cache.tensor, SPEC, "fp")
    lease = receiver.expect("r", [1, 2], 0, lease_s=30)
    receiver.claim("r", lease.token, "shm")
    held = receiver.discard("r")
    assert held is not None and not receiver.drained(held)
    with pytest.raises(KVTransferForbidden, match="cancelled"):
        receiver.complete_memory(end("r", lease.token, aborted=True))  # the writer's notice
    assert receiver.drained(held)
    receiver.end_drain("r")
    # An unclaimed lease (no memory writer ever started) is free at once.
    lease = receiver.expect("u", [3], 0)
    assert receiver.discard("u") is None


def test_a_lease_ends_on_its_own(decode_pool):
    cache, _ = decode_pool
    receiver = KVReceiver(cache.tensor, SPEC, "fp")
    lease = receiver.expect("r", [1], 0, lease_s=6.0)
    receiver.claim("r", lease.token, "shm")
    held = receiver.discard("r")
    held.expires_at = time.monotonic() + 0.2  # as if the lease were almost over
    start = time.monotonic()
    receiver.end_drain("r")
    while not receiver.drained(held):
        time.sleep(0.01)
    assert 0.1 < time.monotonic() - start < 2
    # Too close to its end, a lease cannot be claimed (the writer would outlive it).
    short = receiver.expect("s", [2], 0, lease_s=1.0)
    with pytest.raises(KVTransferForbidden, match="ended"):
        receiver.claim("s", short.token, "shm")


def test_choose_prefers_memory_and_never_falls_back_silently(decode_pool):
    cache, descriptor = decode_pool
    local = LocalPool(tuple(cache.tensor.shape), torch.device("cpu"), torch.bfloat16)
    picked = choose("auto", local, [descriptor], local=["shm", "grpc"])
    assert picked.transport == "shm" and picked.fallback is None
    assert choose("grpc", local, [descriptor], local=["shm", "grpc"]).fallback is None
    nothing = choose("auto", local, [], local=["shm", "grpc"])
    assert nothing.transport == "grpc" and "does not offer" in nothing.fallback
    elsewhere = PoolDescriptor("shm", "another-host", descriptor.shape, "bfloat16", b"")
    away = choose("shm", local, [elsewhere], local=["shm", "grpc"])
    assert away.transport == "grpc" and "this host only" in away.fallback
    other_model = PoolDescriptor(
        "shm", descriptor.host, (4, 2, 33, 4, 2, 16), "bfloat16", descriptor.payload
    )
    assert choose("shm", local, [other_model], local=["shm", "grpc"]).transport == "grpc"
    with pytest.raises(TransportUnavailable):
        open_writer(elsewhere, cache.tensor)


def test_a_descriptor_cannot_point_the_writer_outside_the_pool_files(decode_pool, tmp_path):
    import msgspec

    cache, descriptor = decode_pool
    for path in ("/etc/passwd", str(tmp_path / "other-file"), str(tmp_path / ".." / "x")):
        forged = PoolDescriptor(
            "shm",
            descriptor.host,
            descriptor.shape,
            "bfloat16",
            msgspec.msgpack.encode({"path": path}),
        )
        with pytest.raises(TransportUnavailable):
            open_writer(forged, cache.tensor)
    garbage = PoolDescriptor("shm", descriptor.host, descriptor.shape, "bfloat16", b"\xff\x00")
    with pytest.raises(TransportUnavailable):
        open_writer(garbage, cache.tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threaded", [False, True])
def test_page_copies_move_exactly_the_named_pages(dtype, threaded, monkeypatch, request):
    """shm's page copy (runs of blocks, over threads) against a per-block reference: shuffled
    and consecutive ids, a layer range, every other page untouched."""
    from tandem.transfer import shm_transport

    copiers = set()
    if threaded:  # every write splits over 4 copy threads, however few CPUs this runner has
        pool = ThreadPoolExecutor(3, thread_name_prefix="test-shm-copy")
        request.addfinalizer(pool.shutdown)
        monkeypatch.setattr(shm_transport, "_copy_pool", (pool, 4))
        monkeypatch.setattr(shm_transport, "PARALLEL_MIN_BYTES", 1)
        copy = shm_transport._copy_runs

        def record(s_pages, d_pages, runs):
            copiers.add(threading.current_thread())
            copy(s_pages, d_pages, runs)

        monkeypatch.setattr(shm_transport, "_copy_runs", record)
    g = torch.Generator().manual_seed(3)
    src = torch.randn((6, 2, 10, 4, 2, 8), generator=g).to(dtype)
    for src_ids, dst_ids, layers in [
        (torch.randperm(10, generator=g)[:7], torch.randperm(12, generator=g)[:7], (1, 5)),
        (torch.arange(2, 8), torch.arange(5, 11), (0, 6)),
        (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), (0, 6)),
    ]:
        dst = torch.full((6, 2, 13, 4, 2, 8), -1.0, dtype=dtype)
        want = dst.clone()
        l0, l1 = layers
        for s, d in zip(src_ids.tolist(), dst_ids.tolist(), strict=True):
            want[l0:l1, :, d] = src[l0:l1, :, s]
        nbytes = shm_transport.copy_pages(src, dst, src_ids.numpy(), dst_ids.numpy(), layers)
        assert torch.equal(dst, want)
        assert nbytes == (l1 - l0) * 2 * len(src_ids) * 4 * 2 * 8 * src.element_size()
    if threaded:  # the writing thread and copy threads (as many as the pool started) copied
        assert threading.current_thread() in copiers and len(copiers) > 1


def test_a_cancelled_memory_transfer_ends_its_span_as_failed(monkeypatch):
    """A transfer cancelled mid-way sends its abort notice and closes its ``kv_transfer`` span
    (marked failed), instead of leaving it open forever."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from tandem import telemetry
    from tandem.transfer.memory_push import MemoryTransfer
    from tandem.transfer.push_streams import KVTarget
    from tandem.transfer.transport import PoolWriter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", lambda: provider.get_tracer("test"))

    class Writer(PoolWriter):
        transport = "shm"

        def write(self, src, src_ids, layers, dst_ids) -> int:
            return 64

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    notices = []
    target = KVTarget(
        "decode:1", "r1", 0, "fp", transfer_token="t", transport="shm", block_ids=(3, 4),
        lease_expires_unix_ms=int((time.time() + 60) * 1000),
    )  # fmt: skip
    transfer = MemoryTransfer(
        target, 2, Writer(), lambda end, **kw: notices.append(end), 5.0, trace_context=Context()
    )
    transfer.write(torch.zeros(1, 2, 4, 1), [0, 1], (0, 1), 0, 1)
    transfer.cancel()
    transfer.abort_notice()
    assert [n.aborted for n in notices] == [True]
    (span,) = exporter.get_finished_spans()
    assert span.name == "kv_transfer" and span.status.status_code == StatusCode.ERROR
    assert span.attributes["tandem.kv.bytes"] == 64
