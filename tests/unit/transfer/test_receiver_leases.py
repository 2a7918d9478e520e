"""Leases on reserved blocks (KVReceiver): only the live lease's token opens a reservation, and
every refusal happens before a byte lands in the pool."""

import threading
import time

import pytest
import torch

from tandem.api.errors import KVFingerprintMismatch, KVTransferError, KVTransferForbidden
from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
from tandem.proto.common.v1 import common_pb2
from tandem.transfer.receiver import KVReceiver
from tandem.transfer.wire import make_chunk

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32)
FP = "fp"


@pytest.fixture
def receiver() -> KVReceiver:
    cache = PagedKVCache(SPEC, 16, torch.device("cpu"))
    return KVReceiver(cache.tensor, cache.spec, FP)


def chunk(rid: str, token: str, blocks=(0, 2), fingerprint=FP):
    pages = torch.randn(SPEC.num_layers, 2, blocks[1] - blocks[0], 4, 2, 4)
    c = make_chunk(rid, fingerprint, 0, (0, SPEC.num_layers), blocks, pages)
    c.transfer_token = token
    return c, c.data


def end(rid: str, token: str, *, fingerprint=FP, transport="grpc", total=1):
    return common_pb2.KVTransferEnd(
        request_id=rid,
        model_fingerprint=fingerprint,
        transfer_token=token,
        transport=transport,
        total_chunks=total,
    )


def refused_without_a_write(receiver: KVReceiver, fn) -> None:
    before = receiver.kv.clone()
    with pytest.raises(KVTransferForbidden):
        fn()
    assert torch.equal(receiver.kv, before)


def test_a_non_ascii_token_is_refused_like_any_wrong_one(receiver):
    """Comparing str tokens raised TypeError on non-ASCII ones: a forged notice then reached
    the decode pod's own-error path and failed the request. Now it is a plain refusal."""
    lease = receiver.expect("r", [1, 2], 0)
    forged = f"{lease.epoch}.é"
    refused_without_a_write(receiver, lambda: receiver.claim("r", forged, "shm"))
    receiver.claim("r", lease.token, "shm")
    refused_without_a_write(receiver, lambda: receiver.renew("r", forged))
    refused_without_a_write(
        receiver, lambda: receiver.complete_memory(end("r", forged, transport="shm"))
    )
    receiver.discard("r")  # claimed: it drains, still listening for its writer's notice
    refused_without_a_write(
        receiver, lambda: receiver.complete_memory(end("r", forged, transport="shm"))
    )


def test_the_token_names_its_epoch_and_a_stale_one_opens_nothing(receiver):
    old = receiver.expect("r", [1, 2], 0)
    assert old.token.startswith(f"{old.epoch}.")
    receiver.discard("r")
    new = receiver.expect("r", [3, 4], 0)  # the same request id, admitted again
    assert new.epoch > old.epoch
    for token in (old.token, "", "not-a-token", f"{new.epoch}.guess", new.token + "x"):
        refused_without_a_write(receiver, lambda t=token: receiver.write(*chunk("r", t)))
        refused_without_a_write(receiver, lambda t=token: receiver.claim("r", t, "shm"))
        refused_without_a_write(receiver, lambda t=token: receiver.complete(end("r", t)))
        refused_without_a_write(receiver, lambda t=token: receiver.authorize("r", t))
    assert not receiver.claimed("r")  # none of it claimed the live lease
    assert receiver.write(*chunk("r", new.token)) > 0  # the live token still works


def test_another_reservations_token_opens_nothing(receiver):
    a = receiver.expect("a", [1, 2], 0)
    receiver.expect("b", [3, 4], 0)
    refused_without_a_write(receiver, lambda: receiver.write(*chunk("b", a.token)))


def test_a_lease_that_ended_opens_nothing(receiver):
    lease = receiver.expect("r", [1, 2], 0, lease_s=0.05)
    time.sleep(0.1)
    refused_without_a_write(receiver, lambda: receiver.write(*chunk("r", lease.token)))
    refused_without_a_write(receiver, lambda: receiver.claim("r", lease.token, "grpc"))


def test_a_forged_notice_is_refused_as_forbidden_before_its_fingerprint_is_read(receiver):
    """Were the fingerprint read first, a forger's notice would fail the victim's request with
    a mismatch (the decode pod fails a request on any error but PERMISSION_DENIED)."""
    receiver.expect("r", [1, 2], 0)
    with pytest.raises(KVTransferForbidden):
        receiver.complete(end("r", "forged", fingerprint="other"))
    with pytest.raises(KVTransferForbidden):
        receiver.complete_memory(end("r", "forged", fingerprint="other", transport="shm"))
    with pytest.raises(KVTransferForbidden):
        receiver.write(*chunk("r", "forged", fingerprint="other"))


def test_the_holder_of_the_token_gets_the_real_errors(receiver):
    lease = receiver.expect("r", [1, 2], 0)
    with pytest.raises(KVFingerprintMismatch):
        receiver.complete(end("r", lease.token, fingerprint="other"))


def test_an_unclaimed_reservation_is_released_and_refuses_everything_after(receiver):
    lease = receiver.expect("r", [1, 2], 0)
    assert receiver.release_unclaimed("r")
    assert not receiver.expects("r") and not receiver.release_unclaimed("r")
    refused_without_a_write(receiver, lambda: receiver.claim("r", lease.token, "grpc"))
    refused_without_a_write(receiver, lambda: receiver.write(*chunk("r", lease.token)))
    assert receiver.discard("r") is None  # nothing to drain: the blocks may go back at once


@pytest.mark.parametrize("claim", ["grpc", "shm", "chunk"])
def test_a_claimed_reservation_is_not_released(receiver, claim):
    lease = receiver.expect("r", [1, 2], 0)
    if claim == "chunk":
        receiver.write(*chunk("r", lease.token))  # a first chunk claims too
    else:
        assert receiver.claim("r", lease.token, claim).block_ids == [1, 2]
    assert receiver.claimed("r")
    assert not receiver.release_unclaimed("r")
    assert receiver.expects("r")


def test_release_and_claim_racing_end_one_way_or_the_other(receiver):
    """Either the claim wins (the reservation stays) or the release does (the claim is
    refused): never a claimed writer on released blocks."""
    for i in range(200):
        rid = f"r{i}"
        lease = receiver.expect(rid, [1, 2], 0)
        outcome = {}

        def claim(rid=rid, token=lease.token, outcome=outcome):
            try:
                receiver.claim(rid, token, "grpc")
                outcome["claimed"] = True
            except KVTransferForbidden:
                outcome["claimed"] = False

        t = threading.Thread(target=claim)
        t.start()
        released = receiver.release_unclaimed(rid)
        t.join()
        assert released != outcome["claimed"], (i, released, outcome)
        receiver.discard(rid)


def test_writes_into_a_cancelled_reservation_are_refused(receiver):
    lease = receiver.expect("r", [1, 2], 0)
    receiver.claim("r", lease.token, "grpc")
    receiver.discard("r")  # the request was cancelled
    refused_without_a_write(receiver, lambda: receiver.write(*chunk("r", lease.token)))
    with pytest.raises(KVTransferError):
        receiver.complete(end("r", lease.token))
