"""Short, renewable write leases of memory writers: the decode side (``KVReceiver.claim``,
``renew``, ``drained``) and the prefill side (``LeaseRenewer`` keeping ``MemoryTransfer``s alive
over real gRPC, and stopping one whose renewal is refused).

A writer that dies after its claim stops renewing: the decode pod gets the blocks back when the
write lease ends, not when the whole reservation's lease does."""

import concurrent.futures
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from tandem.api.errors import KVTransferForbidden
from tandem.api.grpc_status import grpc_code_for
from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2
from tandem.transfer.memory_push import LeaseRenewer, MemoryTransfer
from tandem.transfer.push_streams import KVTarget
from tandem.transfer.receiver import (
    MEMORY_WRITE_MARGIN_S,
    KVReceiver,
    lease_remaining_ms,
    local_lease_end_ms,
    write_margin_s,
)
from tandem.transfer.sender import ChannelPool
from tandem.transfer.transport import export_pool, open_writer
from tandem.transfer.wire import make_chunk

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32)
WRITE_LEASE_S = 0.3


def receiver_with(write_lease_s=WRITE_LEASE_S, pool=None) -> KVReceiver:
    if pool is None:
        pool = PagedKVCache(SPEC, 16, torch.device("cpu")).tensor
    return KVReceiver(pool, SPEC, "fp", write_lease_s=write_lease_s)


def end(rid, token, *, aborted=False) -> common_pb2.KVTransferEnd:
    return common_pb2.KVTransferEnd(
        request_id=rid, model_fingerprint="fp", transfer_token=token, transport="shm",
        aborted=aborted,
    )  # fmt: skip


def now_ms() -> int:
    return int(time.time() * 1000)


# ---- the decode side ------------------------------------------------------------------------


def test_a_claim_grants_a_short_write_lease_and_renewals_extend_it():
    r = receiver_with(write_lease_s=0.5)
    lease = r.expect("r", [1, 2, 3], 0, lease_s=60.0)
    before = now_ms()
    claim = r.claim("r", lease.token, "shm")
    # The writer's deadline is the write lease's, not the reservation's.
    assert before + 400 <= claim.lease.expires_unix_ms <= now_ms() + 500
    assert claim.lease.token == lease.token and claim.lease.epoch == lease.epoch
    assert r.write_lease_end("r") <= time.monotonic() + 0.5
    time.sleep(0.3)
    renewed = r.renew("r", lease.token)
    assert renewed >= claim.lease.expires_unix_ms + 250  # moved on
    time.sleep(0.4)  # past the first grant's end: renewed, the lease lives on
    assert r.renew("r", lease.token) >= renewed + 350
    assert r.expects("r") and r.write_lease_end("r") > time.monotonic()


def test_the_write_lease_never_outlives_the_reservations_lease():
    r = receiver_with(write_lease_s=60.0)
    lease = r.expect("r", [1, 2], 0, lease_s=MEMORY_WRITE_MARGIN_S + 0.5)
    claim = r.claim("r", lease.token, "shm")
    assert claim.lease.expires_unix_ms <= lease.expires_unix_ms
    assert r.renew("r", lease.token) <= lease.expires_unix_ms
    assert r.write_lease_end("r") <= time.monotonic() + MEMORY_WRITE_MARGIN_S + 0.5


def test_a_grpc_claim_has_no_write_lease():
    r = receiver_with()
    lease = r.expect("r", [1, 2], 0, lease_s=5.0)
    assert r.claim("r", lease.token, "grpc").lease == lease
    assert r.write_lease_end("r") is None
    with pytest.raises(KVTransferForbidden, match="no memory write lease"):
        r.renew("r", lease.token)
    time.sleep(WRITE_LEASE_S + 0.1)  # a gRPC writer's chunks are checked one by one
    r.authorize("r", lease.token)


def test_renewal_is_refused_to_all_but_the_live_claimed_lease():
    r = receiver_with(write_lease_s=5.0)
    old = r.expect("r", [1, 2], 0)
    r.claim("r", old.token, "shm")
    assert r.discard("r") is not None  # claimed: draining until the writer's notice
    # Discarded: the writer is told to stop (by its own token), however live the lease was.
    with pytest.raises(KVTransferForbidden, match="cancelled"):
        r.renew("r", old.token)
    with pytest.raises(KVTransferForbidden):
        r.complete_memory(end("r", old.token, aborted=True))  # its notice: it stopped
    r.end_drain("r")
    new = r.expect("r", [3, 4], 0)
    # Unclaimed: nothing to renew.
    with pytest.raises(KVTransferForbidden, match="no memory write lease"):
        r.renew("r", new.token)
    r.claim("r", new.token, "shm")
    for token in (old.token, "", "x", f"{new.epoch}.guess", new.token + "x"):
        with pytest.raises(KVTransferForbidden):
            r.renew("r", token)
    with pytest.raises(KVTransferForbidden):
        r.renew("other", new.token)
    assert r.renew("r", new.token) > 0  # the holder's renewal works
    r.complete_memory(end("r", new.token))
    with pytest.raises(KVTransferForbidden):  # completed: its lease is over
        r.renew("r", new.token)


def test_a_discarded_claimed_lease_drains_when_its_write_lease_ends_unrenewed():
    r = receiver_with()
    lease = r.expect("r", [1, 2], 0, lease_s=60.0)
    r.claim("r", lease.token, "shm")
    draining = r.discard("r")
    assert draining is not None and not r.drained(draining)
    started = time.monotonic()
    while not r.drained(draining):
        assert time.monotonic() - started < WRITE_LEASE_S + 0.5, "still not drained"
        time.sleep(0.01)
    # The write lease's end, not the 60 s lease's.
    assert time.monotonic() - started >= WRITE_LEASE_S - 0.1
    r.end_drain("r")


def test_an_unrenewed_write_lease_ends_the_live_lease_and_refuses_everything_after():
    r = receiver_with()
    lease = r.expect("r", [1, 2], 0, lease_s=60.0)
    r.claim("r", lease.token, "shm")
    time.sleep(0.15)
    r.renew("r", lease.token)  # renewed once: lives past the first grant
    time.sleep(0.2)
    assert r.write_lease_end("r") > time.monotonic()
    time.sleep(WRITE_LEASE_S)
    assert r.write_lease_end("r") <= time.monotonic()  # the decode loop fails the request
    before = r.kv.clone()
    pages = torch.ones(SPEC.num_layers, 2, 1, 4, 2, 4)
    chunk = make_chunk("r", "fp", 0, (0, SPEC.num_layers), (0, 1), pages)
    chunk.transfer_token = lease.token
    for late in (
        lambda: r.renew("r", lease.token),  # never revived
        lambda: r.claim("r", lease.token, "shm"),
        lambda: r.complete_memory(end("r", lease.token)),
        lambda: r.write(chunk, chunk.data),
    ):
        with pytest.raises(KVTransferForbidden):
            late()
    assert torch.equal(r.kv, before)
    # Discarded afterwards (the request failed), it is drained at once.
    draining = r.discard("r")
    assert draining is not None and r.drained(draining)


def test_the_writer_margin_follows_the_grant():
    assert write_margin_s(150.0) == MEMORY_WRITE_MARGIN_S
    assert write_margin_s(10.0) == 2.5
    assert write_margin_s(1.0) == 0.25
    assert write_margin_s(-1.0) == 0.0


# ---- the prefill side -----------------------------------------------------------------------


class RenewServer:
    """A real gRPC server answering ``DecodeService.RenewKV`` from a real ``KVReceiver``."""

    def __init__(
        self, receiver: KVReceiver, *, clock_ahead_s: float = 0.0, sends_remaining: bool = True
    ) -> None:
        """``clock_ahead_s``: this "decode pod"'s clock runs that far ahead of the writer's (its
        Unix times are shifted by it); ``sends_remaining``: it answers ``lease_remaining_ms``
        (False: a decode pod that predates the field)."""
        self.receiver = receiver
        self.calls = 0

        def renew(request, context):
            self.calls += 1
            try:
                expires = receiver.renew(request.request_id, request.transfer_token)
            except KVTransferForbidden as exc:
                context.abort(grpc_code_for(exc), str(exc))
            return decode_pb2.RenewKVResponse(
                lease_expires_unix_ms=expires + int(clock_ahead_s * 1000),
                lease_remaining_ms=lease_remaining_ms(expires) if sends_remaining else 0,
            )

        handler = grpc.method_handlers_generic_handler(
            "tandem.decode.v1.DecodeService",
            {
                "RenewKV": grpc.unary_unary_rpc_method_handler(
                    renew,
                    request_deserializer=decode_pb2.RenewKVRequest.FromString,
                    response_serializer=decode_pb2.RenewKVResponse.SerializeToString,
                )
            },
        )
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture
def shm_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_SHM_DIR", str(tmp_path))
    cache = PagedKVCache(SPEC, 16, torch.device("cpu"), path=str(tmp_path / "tandem-kv-pool"))
    export = export_pool("shm", cache.tensor, path=cache.path)
    yield cache, export.descriptor()
    export.close()


def transfer_for(receiver, address, descriptor, rid, src):
    lease = receiver.expect(rid, [5, 6], 0, lease_s=60.0)
    claim = receiver.claim(rid, lease.token, "shm")
    target = KVTarget(
        address, rid, 0, "fp", transfer_token=lease.token, transport="shm",
        descriptor=descriptor, block_ids=tuple(claim.block_ids),
        lease_expires_unix_ms=claim.lease.expires_unix_ms,
    )  # fmt: skip
    notices = []
    transfer = MemoryTransfer(
        target, 2, open_writer(descriptor, src), lambda e, **kw: notices.append(e), 5.0
    )
    return transfer, notices


@dataclass
class Renewing:
    """Both sides of write-lease renewal: a decode side (a ``KVReceiver`` over the shm pool,
    behind a real ``RenewServer``) and a prefill side's ``LeaseRenewer`` on a real channel."""

    cache: PagedKVCache
    descriptor: object
    receiver: KVReceiver
    server: RenewServer
    renewer: LeaseRenewer
    src: torch.Tensor
    """The prefill side's pages (random), which its transfers write from."""

    def transfer(self, rid: str):
        return transfer_for(self.receiver, self.server.address, self.descriptor, rid, self.src)


@contextlib.contextmanager
def renewing(shm_pool, write_lease_s: float, **server_options) -> Iterator[Renewing]:
    """``Renewing`` with write leases of ``write_lease_s``; renewer, channel and server closed
    on exit."""
    cache, descriptor = shm_pool
    receiver = receiver_with(write_lease_s=write_lease_s, pool=cache.tensor)
    server = RenewServer(receiver, **server_options)
    channels = ChannelPool(1)
    renewer = LeaseRenewer(channels.renew_kv)
    src = torch.randn(SPEC.num_layers, 2, 4, 4, 2, 4)
    try:
        yield Renewing(cache, descriptor, receiver, server, renewer, src)
    finally:
        renewer.close()
        channels.close()
        server.stop()


def test_the_renewer_keeps_a_live_transfer_writing_and_stops_a_refused_one(shm_pool):
    with renewing(shm_pool, write_lease_s=1.0) as r:
        cache, receiver, server, renewer, src = r.cache, r.receiver, r.server, r.renewer, r.src
        live, _ = r.transfer("live")
        doomed, notices = r.transfer("doomed")
        first = live.expires
        renewer.add(live)
        renewer.add(doomed)
        # More than two write leases (only renewals keep them): every third of the lease, both
        # transfers; polled, as the renewer's thread may be starved on a loaded machine.
        deadline = time.monotonic() + 10
        while server.calls < 8 or live.expires <= first + 1.5 or time.time() < first + 1.2:
            assert time.monotonic() < deadline, f"only {server.calls} renewals in 10 s"
            time.sleep(0.02)
        assert live.expires > first + 1.5 and not live.failed
        # Still writing, long past the first grant: the pages land.
        live.write(src, [0, 1], (0, SPEC.num_layers), 0, 2)
        assert live.error is None and torch.equal(cache.tensor[:, :, [5, 6]], src[:, :, [0, 1]])
        # The decode pod discards one reservation (its request was cancelled): the next renewal
        # is refused and that writer stops at once; the other goes on.
        assert receiver.discard("doomed") is not None
        deadline = time.monotonic() + 1.0
        while not doomed.failed:
            assert time.monotonic() < deadline, "a refused renewal did not stop the transfer"
            time.sleep(0.01)
        assert "PERMISSION_DENIED" in doomed.error and "cancelled" in doomed.error
        before = cache.tensor.clone()
        doomed.write(src, [2, 3], (0, SPEC.num_layers), 0, 2)  # ignored: it stopped
        assert torch.equal(cache.tensor, before)
        with pytest.raises(Exception, match="could not be renewed"):
            doomed.finish(common_pb2.KVTransferEnd())
        assert [n.aborted for n in notices] == [True]  # its abort path ran
        assert not live.failed and receiver.write_lease_end("live") > time.monotonic()


def test_an_unreachable_decode_pod_fails_the_transfer(shm_pool):
    with renewing(shm_pool, write_lease_s=0.6) as r:
        transfer, _ = r.transfer("r")
        r.server.stop()  # the decode pod is gone
        r.renewer.add(transfer)
        deadline = time.monotonic() + 2.0
        while not transfer.failed:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "could not be renewed" in transfer.error


def test_a_transfer_past_its_write_lease_writes_nothing(shm_pool):
    cache, descriptor = shm_pool
    receiver = receiver_with(write_lease_s=0.2, pool=cache.tensor)
    src = torch.randn(SPEC.num_layers, 2, 4, 4, 2, 4)
    transfer, _ = transfer_for(receiver, "unused:1", descriptor, "r", src)  # never renewed
    time.sleep(0.2 - write_margin_s(0.2) + 0.02)  # past the writer's deadline
    before = cache.tensor.clone()
    transfer.write(src, [0, 1], (0, SPEC.num_layers), 0, 2)
    assert transfer.error and "lease" in transfer.error
    assert torch.equal(cache.tensor, before)


def test_a_writer_that_does_not_renew_keeps_the_whole_lease():
    """A prefill pod from before write leases (a rolling upgrade) claims without ``renews``:
    it is held to the reservation's lease, as it expects, not cut off after the write lease."""
    r = receiver_with(write_lease_s=0.3)
    lease = r.expect("r", [1, 2], 0, lease_s=30.0)
    claim = r.claim("r", lease.token, "shm", renews=False)
    assert claim.lease == lease and r.write_lease_end("r") is None
    time.sleep(0.4)  # past what a renewing writer would have had
    assert not r.drained(r._inbound["r"])
    r.complete_memory(end("r", lease.token))  # its notice is still taken


def test_lease_times_cross_clocks_as_durations():
    now = time.time()
    assert abs(lease_remaining_ms(int((now + 10) * 1000)) - 10_000) < 50
    assert lease_remaining_ms(int((now - 10) * 1000)) == 1  # ended: still not "absent" (0)
    # The writer's clock: when it sent the call plus what was left; 0 = an older decode pod.
    assert local_lease_end_ms(9_999_999_999_000, 4_000, 1_000.0) == 1_004_000
    assert local_lease_end_ms(9_999_999_999_000, 0, 1_000.0) == 9_999_999_999_000


@pytest.mark.parametrize("sends_remaining", [True, False])
def test_a_renewal_is_read_on_the_writers_clock_whatever_the_decode_pods_clock_says(
    shm_pool, sends_remaining
):
    """A decode pod whose clock runs 60 s ahead: the writer's write lease still ends one write
    lease after its renewal, on its own clock (it adds the time left to when it sent the call),
    so it never writes past the real end. A decode pod that predates ``lease_remaining_ms`` is
    read in its own clock, as before (which is what the skew would get wrong)."""
    with renewing(
        shm_pool, write_lease_s=1.0, clock_ahead_s=60.0, sends_remaining=sends_remaining
    ) as r:
        live, _ = r.transfer("live")
        first = live.expires
        r.renewer.add(live)
        deadline = time.monotonic() + 10
        while live.expires == first:
            assert time.monotonic() < deadline, "no renewal in 10 s"
            time.sleep(0.01)
        now = time.time()
        if sends_remaining:
            assert now < live.expires <= now + 1.0
        else:
            assert live.expires > now + 59
