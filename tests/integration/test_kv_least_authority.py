"""Least authority between pods, against real pods over real gRPC sockets.

- A decode pod takes KV only from the writer holding a live reservation's transfer token: wrong,
  missing, guessed, another reservation's, stale (an earlier lease of the same request id) and
  late tokens (after a cancel, after the claim deadline) are refused on every write path
  (PushKV chunks and end, ClaimKV for grpc and shm, CompleteKV) before any byte lands; the pool
  is unchanged and the victim's reservation unharmed.
- Reservations nobody claims are released after ``kv_claim_timeout_s``: a flood of 128 of them
  fills the pool for about that long only.
- A prefill pod pushes KV only to decode pods it knows from discovery, refusing any other
  address before it connects anywhere.
- A cancelled Prefill stops its KV push at once and returns the prefill pod's blocks.

One prefill and one decode pod for the whole module (served on a loop of their own).
"""

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
import torch

from tandem.api import cluster_auth
from tandem.api.errors import CapacityExceeded
from tandem.api.requests import Job
from tandem.api.sampling_params import SamplingParams
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc
from tandem.proto.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from tandem.transfer.wire import make_chunk

pytestmark = pytest.mark.integration

NUM_KV_BLOCKS = 256
CLAIM_S = 2.0
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Pods:
    run: object
    """run(coroutine) -> its result, on the pods' loop."""
    dispatcher: object
    prefill: object
    decode: object

    @property
    def decode_address(self) -> str:
        return f"127.0.0.1:{self.decode.port}"

    @property
    def receiver(self):
        return self.decode.parts["servicer"].receiver


@pytest.fixture(scope="module")
def pods(in_process_pods, tiny_model):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="pods-loop", daemon=True)
    thread.start()

    def run(coro, timeout=180):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    cm = in_process_pods(
        tiny_model("llama"),
        num_kv_blocks=NUM_KV_BLOCKS,
        # Prefill: small chunks, one layer per group, 64-token steps: a long prompt's KV goes
        # out in many chunks over many steps (the cancel test stops it midway).
        prefill=dict(
            kv_transport="grpc",
            kv_layers_per_group=1,
            kv_chunk_bytes=64 << 10,
            max_num_batched_tokens=64,
        ),
        decode=dict(kv_transport="auto", kv_claim_timeout_s=CLAIM_S),
    )
    dispatcher, p, d = run(cm.__aenter__())
    try:
        yield Pods(run, dispatcher, p, d)
    finally:
        run(cm.__aexit__(None, None, None))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def counter(service, name: str, **labels) -> float:
    total = 0.0
    for family in service.parts["metrics"].registry.collect():
        if family.name != name:
            continue
        for s in family.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def wait_idle(service, timeout=15.0):
    core = service.parts["core"]
    deadline = time.monotonic() + timeout
    while True:
        st = core.stats
        if st.num_free_blocks == st.num_total_blocks and not (
            st.num_waiting_for_kv or st.num_running or st.num_waiting
        ):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks not returned: {st}")
        await asyncio.sleep(0.02)


def prompt(seed: int, n: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


async def reserve(stub, rid, tokens, *, claim=True):
    """A REMOTE admission (its Generate call and Admitted), claimed as a prefill pod would."""
    call = stub.Generate(
        decode_pb2.GenerateRequest(
            request_id=rid,
            prompt_token_ids=tokens,
            sampling_params=common_pb2.SamplingParams(max_tokens=4),
            prefill_mode=decode_pb2.PREFILL_MODE_REMOTE,
        )
    )
    admitted = (await call.read()).admitted
    if claim:
        await stub.ClaimKV(
            decode_pb2.ClaimKVRequest(
                request_id=rid, transfer_token=admitted.transfer_token, transport="grpc"
            )
        )
    return call, admitted


async def stream_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        while True:
            r = await call.read()
            assert r is not grpc.aio.EOF and not r.HasField("chunk"), "tokens without KV"
    return e.value


def pages_for(receiver, num_blocks: int) -> torch.Tensor:
    lay = receiver.layout
    return torch.randn(
        lay.num_layers, 2, num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim
    )


def forged_messages(receiver, rid, token, fingerprint, num_blocks):
    """Each write path's message with ``token``: the PushKV streams (a chunk, an out-of-order
    chunk, an end with a wrong fingerprint) and the ClaimKV/CompleteKV requests."""
    chunk = make_chunk(
        rid, fingerprint, 0, (0, receiver.layout.num_layers), (0, num_blocks),
        pages_for(receiver, num_blocks),
    )  # fmt: skip
    chunk.transfer_token = token
    late_chunk = common_pb2.KVChunk()
    late_chunk.CopyFrom(chunk)
    late_chunk.sequence_number = 3
    end = common_pb2.KVTransferEnd(
        request_id=rid,
        model_fingerprint="another-model",
        transfer_token=token,
        total_chunks=1,
        first_token_id=5,
    )
    streams = {
        "chunk": [decode_pb2.PushKVRequest(chunk=chunk)],
        "out-of-order chunk": [decode_pb2.PushKVRequest(chunk=late_chunk)],
        "end": [decode_pb2.PushKVRequest(end=end)],
    }
    memory_end = common_pb2.KVTransferEnd()
    memory_end.CopyFrom(end)
    memory_end.model_fingerprint = fingerprint
    memory_end.transport = "shm"
    claims = {t: decode_pb2.ClaimKVRequest(request_id=rid, transfer_token=token, transport=t)
              for t in ("grpc", "shm")}  # fmt: skip
    return streams, claims, decode_pb2.CompleteKVRequest(end=memory_end)


def test_forged_stale_and_late_kv_is_refused_before_any_write(pods):
    receiver = pods.receiver
    assert "shm" in {d.transport for d in pods.decode.parts["servicer"].pools}

    async def main():
        channel = cluster_auth.aio_channel(pods.decode_address, [])
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        victim_call, victim = await reserve(stub, "victim", prompt(1, 40))
        # A stale token: the same request id admitted again (an earlier lease's token).
        first_call, first = await reserve(stub, "again", prompt(2, 40))
        first_call.cancel()
        while receiver.expects("again"):
            await asyncio.sleep(0.01)
        again_call, again = await reserve(stub, "again", prompt(2, 40))
        assert again.lease_epoch > first.lease_epoch
        # Late tokens: a cancelled reservation's, and one released unclaimed at the deadline.
        gone_call, gone = await reserve(stub, "gone", prompt(3, 40))
        gone_call.cancel()
        unclaimed_call, unclaimed = await reserve(stub, "unclaimed", prompt(4, 40), claim=False)
        assert "claimed" in (await stream_error(unclaimed_call)).details()
        while receiver.expects("gone"):
            await asyncio.sleep(0.01)

        fp = victim.model_fingerprint
        forgeries = [
            ("victim", "not-the-token", "a wrong token"),
            ("victim", "", "no token"),
            ("victim", f"{victim.lease_epoch}.guessed", "the right epoch, a guessed secret"),
            ("victim", again.transfer_token, "another reservation's token"),
            ("again", first.transfer_token, "a stale token (an earlier lease of the id)"),
            ("gone", gone.transfer_token, "the token of a cancelled reservation"),
            ("unclaimed", unclaimed.transfer_token, "the token of a reservation released"),
        ]
        pool_before = receiver.kv.clone()
        forbidden_before = counter(pods.decode, "tandem_kv_transfers", outcome="forbidden")
        refusals = 0
        for rid, token, what in forgeries:
            streams, claims, complete = forged_messages(receiver, rid, token, fp, 3)
            for name, messages in streams.items():
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.PushKV(iter(messages))
                assert e.value.code() == DENIED, (what, name, e.value.details())
                refusals += 1
            for transport, claim in claims.items():
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.ClaimKV(claim)
                assert e.value.code() == DENIED, (what, f"ClaimKV {transport}", e.value.details())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.CompleteKV(complete)
            assert e.value.code() == DENIED, (what, "CompleteKV", e.value.details())
            refusals += 1
        assert torch.equal(receiver.kv, pool_before), "a refused write changed the KV pool"
        forbidden = counter(pods.decode, "tandem_kv_transfers", outcome="forbidden")
        assert forbidden - forbidden_before == refusals
        # The reservations the forgeries named are unharmed: both still wait for their KV ...
        assert pods.decode.parts["core"].stats.num_waiting_for_kv == 2
        assert receiver.claimed("victim") and receiver.claimed("again")
        # ... and the victim's real writer completes it.
        chunk = make_chunk(
            "victim", fp, 0, (0, receiver.layout.num_layers), (0, 3), pages_for(receiver, 3)
        )
        chunk.transfer_token = victim.transfer_token
        end = common_pb2.KVTransferEnd(
            request_id="victim",
            model_fingerprint=fp,
            transfer_token=victim.transfer_token,
            total_chunks=1,
            first_token_id=5,
        )
        reply = await stub.PushKV(
            iter([decode_pb2.PushKVRequest(chunk=chunk), decode_pb2.PushKVRequest(end=end)])
        )
        assert reply.chunks_received == 1
        tokens = []
        while (r := await victim_call.read()) is not grpc.aio.EOF:
            tokens += list(r.chunk.token_ids)
        assert len(tokens) == 4 and tokens[0] == 5
        again_call.cancel()
        await wait_idle(pods.decode)
        await channel.close()

    pods.run(main())


def test_a_completion_that_fails_on_the_decode_pod_fails_the_request_at_once(pods, monkeypatch):
    """A defect of the decode pod's own while it completes a memory transfer (here: its receiver
    raises) answers INTERNAL and fails the request now, counted as outcome="error": not gRPC's
    UNKNOWN, with the request left waiting kv_timeout_s for KV that already came."""
    receiver = pods.receiver

    async def main():
        await wait_idle(pods.decode)
        before = counter(pods.decode, "tandem_kv_transfers", outcome="error")
        channel = cluster_auth.aio_channel(pods.decode_address, [])
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        call, admitted = await reserve(stub, "broken-complete", prompt(77, 30), claim=False)
        token = admitted.transfer_token
        await stub.ClaimKV(
            decode_pb2.ClaimKVRequest(
                request_id="broken-complete", transfer_token=token, transport="shm"
            )
        )
        end = common_pb2.KVTransferEnd(
            request_id="broken-complete", model_fingerprint=receiver.fingerprint,
            transfer_token=token, transport="shm", first_token_id=5,
        )  # fmt: skip

        def broken(end):
            raise RuntimeError("a defect")

        monkeypatch.setattr(receiver, "complete_memory", broken)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CompleteKV(decode_pb2.CompleteKVRequest(end=end))
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "failed to complete the KV transfer: RuntimeError" in e.value.details()
        failed = await stream_error(call)
        assert "failed to complete the KV transfer" in failed.details()
        assert time.monotonic() - started < 5.0  # not the 60 s kv_timeout_s
        assert counter(pods.decode, "tandem_kv_transfers", outcome="error") - before == 1
        # The writer's abort notice then frees the blocks the failed request held.
        monkeypatch.undo()
        end.aborted = True
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.CompleteKV(decode_pb2.CompleteKVRequest(end=end))
        await wait_idle(pods.decode)
        await channel.close()

    pods.run(main())


def test_a_flood_of_unclaimed_reservations_is_released_within_the_claim_deadline(pods):
    """128 never-fed REMOTE reservations fill the whole pool; they are released after
    kv_claim_timeout_s (not kv_timeout_s); ordinary requests get 429 only meanwhile. A claimed
    reservation outlives the deadline."""
    decode = pods.decode
    core = decode.parts["core"]

    async def ordinary(i: int) -> bool:
        job = Job(f"ordinary-{i}", prompt(500 + i, 40), SamplingParams(temperature=0, max_tokens=2))
        try:
            events = [e async for e in pods.dispatcher.generate(job)]
        except CapacityExceeded:
            return False
        assert events[-1].finish_reason == "length"
        return True

    async def main():
        await wait_idle(decode)
        unclaimed_before = counter(decode, "tandem_kv_transfers", outcome="unclaimed")
        channel = cluster_auth.aio_channel(pods.decode_address, [])
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        held_call, _ = await reserve(stub, "claimed-one", prompt(999, 30))  # 2 blocks, claimed
        started = time.monotonic()  # no flood reservation is older
        flood = await asyncio.gather(
            *(reserve(stub, f"flood-{i}", prompt(1000 + i, 30), claim=False) for i in range(127))
        )
        flooded_at = time.monotonic()
        assert all(a.num_reserved_blocks == 2 for _, a in flood)
        assert not await ordinary(0)  # the whole pool is reserved: 429
        # Ordinary requests succeed again as soon as the deadline released the flood.
        i = 1
        while not await ordinary(i):
            assert time.monotonic() - flooded_at < CLAIM_S + 4.0, "429s went on"
            i += 1
            await asyncio.sleep(0.05)
        served_after = time.monotonic() - started
        errors = await asyncio.gather(*(stream_error(call) for call, _ in flood))
        assert {e.code() for e in errors} == {grpc.StatusCode.DATA_LOSS}
        assert all("no prefill pod claimed" in e.details() for e in errors)
        unclaimed = counter(decode, "tandem_kv_transfers", outcome="unclaimed")
        assert unclaimed - unclaimed_before == 127
        # Back to the baseline but for the claimed reservation, which still waits.
        deadline = flooded_at + CLAIM_S + 4.0
        while core.stats.num_free_blocks != core.stats.num_total_blocks - 2:
            assert time.monotonic() < deadline, core.stats
            await asyncio.sleep(0.02)
        assert core.stats.num_waiting_for_kv == 1 and pods.receiver.expects("claimed-one")
        held_call.cancel()
        await wait_idle(decode)
        await channel.close()
        return served_after

    served_after = pods.run(main())
    assert CLAIM_S * 0.95 <= served_after  # the flood did hold the pool until its deadline


def test_a_prefill_request_naming_an_unknown_decode_target_is_refused_before_connecting(pods):
    """The target is a socket this test listens on: the prefill pod must not even connect."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]

    async def main():
        channel = cluster_auth.aio_channel(f"127.0.0.1:{pods.prefill.port}", [])
        stub = prefill_pb2_grpc.PrefillServiceStub(channel)
        before = counter(pods.prefill, "tandem_kv_transfers", outcome="forbidden")
        # Unknown, and the known decode pod spelled another way (addresses match exactly).
        for address in (f"127.0.0.1:{port}", f"localhost:{pods.decode.port}"):
            request = prefill_pb2.PrefillRequest(
                request_id=f"evil-{address}",
                prompt_token_ids=prompt(7, 40),
                sampling_params=common_pb2.SamplingParams(max_tokens=1),
                decode_target=prefill_pb2.DecodeTarget(
                    address=address, request_id="x", transfer_token="1.x"
                ),
            )
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Prefill(request, timeout=30)
            assert e.value.code() == DENIED and "not a decode pod" in e.value.details()
        after = counter(pods.prefill, "tandem_kv_transfers", outcome="forbidden")
        assert after - before == 2
        await wait_idle(pods.prefill)
        await channel.close()

    try:
        pods.run(main())
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def test_a_cancelled_prefill_stops_its_kv_push_at_once(pods):
    """A long prompt's KV streams out over many steps into a deliberately slow decode pod; the
    Prefill call is cancelled once the first pages landed: no page lands after that, the decode
    pod sees the push cancelled, and both pods return every block. (Three times: which of
    a cancelled stream's close and cancel reached the decode pod first used to vary.)"""
    receiver = pods.receiver
    original = receiver.write

    def slow_write(chunk, data):
        time.sleep(0.05)
        return original(chunk, data)

    async def main(rep: int):
        decode_channel = cluster_auth.aio_channel(pods.decode_address, [])
        decode_stub = decode_pb2_grpc.DecodeServiceStub(decode_channel)
        prefill_channel = cluster_auth.aio_channel(f"127.0.0.1:{pods.prefill.port}", [])
        prefill_stub = prefill_pb2_grpc.PrefillServiceStub(prefill_channel)
        tokens = prompt(11 + rep, 1600)  # 100 blocks: 200 pages of 4 KiB, in ~50 chunks
        call, admitted = await reserve(decode_stub, "long", tokens, claim=False)
        target = prefill_pb2.DecodeTarget(
            address=pods.decode_address,
            request_id="long",
            model_fingerprint=admitted.model_fingerprint,
            transfer_token=admitted.transfer_token,
            lease_expires_unix_ms=admitted.lease_expires_unix_ms,
            block_ids=admitted.block_ids,
            incarnation=admitted.incarnation,
        )
        prefill = prefill_stub.Prefill(
            prefill_pb2.PrefillRequest(
                request_id="long",
                prompt_token_ids=tokens,
                sampling_params=common_pb2.SamplingParams(max_tokens=1),
                decode_target=target,
            )
        )
        deadline = time.monotonic() + 30
        while not (receiver.expects("long") and receiver._inbound["long"].bytes):
            assert time.monotonic() < deadline and not prefill.done()
            await asyncio.sleep(0.002)
        inbound = receiver._inbound["long"]
        prefill.cancel()
        cancelled_at = time.monotonic()
        await wait_idle(pods.prefill, timeout=5)  # the prefill pod's blocks are back
        prefill_idle_after = time.monotonic() - cancelled_at
        await asyncio.sleep(0.3)  # writes already in flight land
        landed = inbound.bytes
        await asyncio.sleep(1.0)
        total = len(admitted.block_ids) * receiver.layout.num_layers
        total *= receiver.layout.bytes_per_block_layer
        assert inbound.bytes == landed, "pages kept landing after the cancel"
        assert landed < total / 2, f"the push was not stopped midway: {landed} of {total} bytes"
        # The decode pod saw the stream break off (a cancel, not a stream's ordinary end): its
        # request failed at once, not at its KV timeout, and its blocks are back.
        err = await asyncio.wait_for(stream_error(call), 5.0)
        assert err.code() == grpc.StatusCode.DATA_LOSS and "broke off" in err.details()
        await wait_idle(pods.decode)
        await decode_channel.close()
        await prefill_channel.close()
        return prefill_idle_after

    receiver.write = slow_write
    try:
        for rep in range(3):
            assert pods.run(main(rep)) < 2.0
    finally:
        receiver.write = original
