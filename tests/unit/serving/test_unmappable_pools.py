"""A decode pod's pool that this prefill pod's engine core could not map: one request fails
(``KVPoolUnmappable``, across the engine-core boundary as itself), then the front picks gRPC for
that decode pod incarnation, logged and counted as a fallback, or refuses under
``--kv-transport-strict``; a restarted decode pod (a new incarnation) is tried again."""

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest
import torch

from services.prefill.server import KVTransportChooser
from services.prefill.settings import PrefillSettings
from tandem.api.errors import KVPoolUnmappable, KVTransferError
from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
from tandem.proto.decode.v1 import decode_pb2
from tandem.serving import core_protocol
from tandem.transfer.transport import LocalPool, choose, export_pool

SPEC = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.bfloat16)


@pytest.fixture
def offer(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_SHM_DIR", str(tmp_path))
    cache = PagedKVCache(SPEC, 32, torch.device("cpu"), path=str(tmp_path / "tandem-kv-pool"))
    return export_pool("shm", cache.tensor, path=cache.path).descriptor()


class Metrics:
    def __init__(self) -> None:
        self.fallbacks: list[tuple[str, str]] = []

    def fallback(self, wanted: str, transport: str) -> None:
        self.fallbacks.append((wanted, transport))


def chooser(offer, monkeypatch, tensor_parallel_size=1, **settings) -> KVTransportChooser:
    info = SimpleNamespace(
        kv_spec=SPEC,
        num_kv_blocks=32,
        device="cpu",
        fingerprint="fp",
        tensor_parallel_size=tensor_parallel_size,
    )
    c = KVTransportChooser(PrefillSettings(model="unused", kv_transport="auto", **settings), info)
    claims = []

    async def offered(target):
        return [offer]

    async def claim(target, transport):
        claims.append(transport)
        return decode_pb2.ClaimKVResponse(block_ids=[3, 4], first_block=0, lease_expires_unix_ms=1)

    monkeypatch.setattr(c, "_offer", offered)
    monkeypatch.setattr(c, "_claim", claim)
    c.claims = claims
    return c


def target(incarnation: str = "a") -> core_protocol.KVTargetSpec:
    return core_protocol.KVTargetSpec(
        "decode:1", "r", 0, transfer_token="t", incarnation=incarnation
    )


def test_an_unmappable_pool_is_not_tried_again_for_that_incarnation(offer, monkeypatch, caplog):
    c, metrics = chooser(offer, monkeypatch), Metrics()
    first = asyncio.run(c.choose(target(), metrics))
    assert first.transport == "shm" and metrics.fallbacks == []
    with caplog.at_level(logging.WARNING):
        c.unmappable(first, "KV transport shm to decode:1 failed here: gone")
        then = asyncio.run(c.choose(target(), metrics))
    assert then.transport == "grpc" and then.descriptor is None
    assert metrics.fallbacks == [("shm", "grpc")]
    assert "could not be mapped here" in caplog.text and "falls back to grpc" in caplog.text
    assert c.claims == ["shm", "grpc"]  # the lease is claimed for what will write
    # The decode pod restarted: its new pool is tried again (and the old entry dropped).
    assert asyncio.run(c.choose(target("b"), metrics)).transport == "shm"


def test_strict_refuses_instead_of_falling_back(offer, monkeypatch):
    c = chooser(offer, monkeypatch, kv_transport_strict=True)
    first = asyncio.run(c.choose(target(), Metrics()))
    c.unmappable(first, "failed here")
    with pytest.raises(KVTransferError, match="could not be mapped here"):
        asyncio.run(c.choose(target(), Metrics()))


def test_a_tensor_parallel_prefill_pod_sends_over_grpc_only(offer, monkeypatch):
    """Its pages are gathered onto rank 0 each step, not read from a pool a memory writer could
    copy: ``auto`` takes grpc (its only transport, no fallback); an explicit shm falls back,
    counted, or is refused when strict."""
    c, metrics = chooser(offer, monkeypatch, tensor_parallel_size=2), Metrics()
    assert asyncio.run(c.choose(target(), metrics)).transport == "grpc"
    assert metrics.fallbacks == []
    c = chooser(offer, monkeypatch, tensor_parallel_size=2)
    c.mode = "shm"
    assert asyncio.run(c.choose(target(), metrics)).transport == "grpc"
    assert metrics.fallbacks == [("shm", "grpc")]
    strict = chooser(offer, monkeypatch, tensor_parallel_size=2, kv_transport_strict=True)
    strict.mode = "shm"
    with pytest.raises(KVTransferError, match="--kv-transport-strict"):
        asyncio.run(strict.choose(target(), Metrics()))


def test_choose_names_why_a_transport_is_unusable(offer):
    local = LocalPool(tuple(offer.shape), torch.device("cpu"), torch.bfloat16)
    picked = choose("auto", local, [offer], local=["shm", "grpc"], unusable={"shm": "broken"})
    assert picked.transport == "grpc" and picked.fallback == "shm: broken"


def test_the_engine_cores_error_reaches_the_front_as_itself():
    info = core_protocol.error_info(KVPoolUnmappable("KV transport shm to d:1 failed here: x"))
    err = core_protocol.error_from_info(info)
    assert type(err) is KVPoolUnmappable and "failed here" in str(err)


def test_the_claimed_write_lease_ends_on_this_pods_clock(offer, monkeypatch):
    """The decode pod's clock runs an hour ahead: the engine core gets the write lease's end as
    this host's time of the claim plus what the decode pod said was left (never later than the
    real end), not the decode pod's Unix time; an older decode pod (no remaining time) is taken
    at its word, as before."""
    c = chooser(offer, monkeypatch)
    ahead_ms = 3_600_000

    async def claim(target, transport, remaining_ms=4_000):
        decode_now_ms = int(time.time() * 1000) + ahead_ms
        return decode_pb2.ClaimKVResponse(
            block_ids=[3, 4],
            first_block=0,
            lease_expires_unix_ms=decode_now_ms + remaining_ms,
            lease_remaining_ms=remaining_ms,
        )

    monkeypatch.setattr(c, "_claim", claim)
    before = int(time.time() * 1000)
    chosen = asyncio.run(c.choose(target(), Metrics()))
    after = int(time.time() * 1000)
    assert chosen.transport == "shm"
    assert before + 4_000 <= chosen.lease_expires_unix_ms <= after + 4_000

    async def old_pod_claim(target, transport):
        return await claim(target, transport, remaining_ms=0)

    monkeypatch.setattr(c, "_claim", old_pod_claim)
    chosen = asyncio.run(c.choose(target(), Metrics()))
    assert chosen.lease_expires_unix_ms >= before + ahead_ms
