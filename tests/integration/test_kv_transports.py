"""The KV transport conformance suite: the same tests for every transport this machine has.

Each test runs a prefill and a decode pod (their engine cores are processes of their own, so
the memory transports really map another process's pool) with ``--kv-transport T
--kv-transport-strict``: pages land exactly (token-exact generation), forged, late and partial
writes or notices are refused, an abort mid-transfer followed by immediate reuse of the blocks
leaves the next requests token-exact, and an unfinished lease frees everything when it ends -- a
memory writer's short write lease (kv_write_lease_s) when it stops renewing it, as a writer
killed mid-transfer does.
cuda-ipc runs on a GPU (tests/gpu runs this module with ``TANDEM_TEST_DEVICE=cuda``).
"""

import asyncio
import os
import time

import grpc
import pytest

from tandem.api import cluster_auth
from tandem.api.requests import Job
from tandem.api.sampling_params import SamplingParams
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc
from tandem.transfer.transport import local_transports

pytestmark = pytest.mark.integration

DEVICE = os.environ.get("TANDEM_TEST_DEVICE", "cpu")
TRANSPORTS = local_transports(DEVICE)
MAX_NEW = 8
NUM_KV_BLOCKS = 256


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randint(5, 120))] for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def reference(model_dir):
    from tandem.engine import LLM

    return LLM(model_dir, num_kv_blocks=NUM_KV_BLOCKS, device=DEVICE)


def expected(reference, batch):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    if DEVICE == "cuda":  # GPU kernels' last bits depend on the batch: one prompt at a time
        return [reference.generate([p], params)[0].outputs[0].token_ids for p in batch]
    return [o.outputs[0].token_ids for o in reference.generate(batch, params)]


async def run_batch(dispatcher, prefix, batch):
    """Concurrently on CPU; one at a time on a GPU (as ``expected`` computes them)."""
    if DEVICE == "cuda":
        return [await generate(dispatcher, f"{prefix}{i}", x) for i, x in enumerate(batch)]
    return await asyncio.gather(
        *(generate(dispatcher, f"{prefix}{i}", x) for i, x in enumerate(batch))
    )


def pods(in_process_pods, model_dir, transport, *, decode=None, prefill=None):
    return in_process_pods(
        model_dir,
        prefill=prefill,
        decode=decode,
        num_kv_blocks=NUM_KV_BLOCKS,
        device=DEVICE,
        kv_transport=transport,
        kv_transport_strict=True,
    )


async def generate(dispatcher, rid, prompt):
    from services.router.flow import Route

    route = Route()
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    events = [e async for e in dispatcher.generate(Job(rid, prompt, params), route)]
    assert route.mode == "disaggregated"
    return [t for e in events for t in e.token_ids]


def kv_bytes(service, transport) -> float:
    metrics = service.parts["metrics"]
    total = 0.0
    for family in metrics.registry.collect():
        if family.name != "tandem_kv_transfer_bytes":
            continue
        for s in family.samples:
            if s.name.endswith("_total") and s.labels.get("transport") == transport:
                total += s.value
    return total


async def wait_idle(service, timeout=15.0):
    core = service.parts["core"]
    deadline = time.monotonic() + timeout
    while True:
        st = core.stats
        if st.num_free_blocks == st.num_total_blocks and not st.num_waiting_for_kv:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks not returned: {st}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pages_land_exactly_and_generation_is_token_exact(
    in_process_pods, model_dir, reference, transport
):
    batch = prompts(6)
    want = expected(reference, batch)

    async def main():
        async with pods(in_process_pods, model_dir, transport) as (dispatcher, p, d):
            got = await run_batch(dispatcher, "r", batch)
            assert kv_bytes(p, transport) > 0 and kv_bytes(d, transport) == kv_bytes(p, transport)
            for other in set(TRANSPORTS) - {transport}:
                assert kv_bytes(p, other) == 0 and kv_bytes(d, other) == 0
            await wait_idle(d)
            return got

    assert asyncio.run(main()) == want


async def _reserve(address, rid, prompt):
    """A raw REMOTE admission on the decode pod: (its Generate call, the Admitted answer)."""
    channel = cluster_auth.aio_channel(address, [])
    stub = decode_pb2_grpc.DecodeServiceStub(channel)
    call = stub.Generate(
        decode_pb2.GenerateRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling_params=common_pb2.SamplingParams(max_tokens=4),
            prefill_mode=decode_pb2.PREFILL_MODE_REMOTE,
        )
    )
    first = await call.read()
    return channel, stub, call, first.admitted


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_forged_and_late_writes_and_notices_are_refused(in_process_pods, model_dir, transport):
    async def main():
        async with pods(in_process_pods, model_dir, transport) as (_, p, d):
            address = f"127.0.0.1:{d.port}"
            channel, stub, call, admitted = await _reserve(address, "victim", list(range(3, 40)))
            assert (
                admitted.transfer_token and len(admitted.block_ids) == admitted.num_reserved_blocks
            )
            forged = common_pb2.KVTransferEnd(
                request_id="victim",
                model_fingerprint=admitted.model_fingerprint,
                transfer_token="not-the-token",
                transport=transport,
                first_token_id=5,
            )
            # A notice or claim without the token is refused and harms nothing.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.CompleteKV(decode_pb2.CompleteKVRequest(end=forged))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            if transport != "grpc":
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.ClaimKV(
                        decode_pb2.ClaimKVRequest(
                            request_id="victim", transfer_token="x", transport=transport
                        )
                    )
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                # With the token but never claimed: a memory notice is refused too.
                unclaimed = common_pb2.KVTransferEnd()
                unclaimed.CopyFrom(forged)
                unclaimed.transfer_token = admitted.transfer_token
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.CompleteKV(decode_pb2.CompleteKVRequest(end=unclaimed))
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            else:
                chunk = common_pb2.KVChunk(
                    request_id="victim",
                    model_fingerprint=admitted.model_fingerprint,
                    transfer_token="not-the-token",
                    layer_start=0,
                    layer_end=1,
                    block_start=0,
                    block_end=1,
                )
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.PushKV(iter([decode_pb2.PushKVRequest(chunk=chunk)]))
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # The reservation is intact: still waiting for its KV.
            assert d.parts["core"].stats.num_waiting_for_kv == 1
            call.cancel()
            await wait_idle(d)
            # Late: the reservation is gone, its token opens nothing any more.
            late = common_pb2.KVTransferEnd()
            late.CopyFrom(forged)
            late.transfer_token = admitted.transfer_token
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.CompleteKV(decode_pb2.CompleteKVRequest(end=late))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await channel.close()

    asyncio.run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_abort_mid_transfer_then_immediate_reuse_stays_token_exact(
    in_process_pods, model_dir, reference, transport
):
    long_prompts = prompts(4, seed=7)
    delays = (0.0, 0.005, 0.02, 0.05)
    # New prompts every round: a repeated one would hit the pods' prefix caches, whose partial
    # recomputation may differ from the reference in the last bits on a GPU.
    batches = [prompts(6, seed=8 + r) for r in range(len(delays))]
    wants = [expected(reference, b) for b in batches]

    async def main():
        async with pods(in_process_pods, model_dir, transport) as (dispatcher, p, d):
            for delay, batch, want in zip(delays, batches, wants, strict=True):
                tasks = [
                    asyncio.ensure_future(generate(dispatcher, f"x{delay}-{i}", x))
                    for i, x in enumerate(long_prompts)
                ]
                await asyncio.sleep(delay)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                got = await run_batch(dispatcher, f"y{delay}-", batch)
                diverged = {
                    i: next(
                        (k for k, (a, b) in enumerate(zip(g, w, strict=False)) if a != b),
                        min(len(g), len(w)),
                    )
                    for i, (g, w) in enumerate(zip(got, want, strict=True))
                    if g != w
                }
                assert got == want, (
                    f"after an abort {delay * 1000:.0f} ms in: request -> first differing token "
                    f"{diverged}"
                )
            await wait_idle(d)
            await wait_idle(p)

    asyncio.run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_unfinished_lease_frees_everything_when_it_ends(in_process_pods, model_dir, transport):
    async def main():
        # The write lease as long as the lease: a claimed lease's writer that never renews
        # holds the blocks until the lease ends (the write lease's own end: the tests below).
        decode = dict(kv_timeout_s=0.5, kv_lease_s=6.0, kv_write_lease_s=6.0)
        async with pods(in_process_pods, model_dir, transport, decode=decode) as (_, p, d):
            address = f"127.0.0.1:{d.port}"
            channel, stub, call, admitted = await _reserve(address, "orphan", list(range(3, 60)))
            if transport != "grpc":
                # A writer claims the lease, then dies without a word.
                await stub.ClaimKV(
                    decode_pb2.ClaimKVRequest(
                        request_id="orphan",
                        transfer_token=admitted.transfer_token,
                        transport=transport,
                    )
                )
            with pytest.raises(grpc.aio.AioRpcError) as e:
                while True:
                    await call.read()
            assert e.value.code() == grpc.StatusCode.DATA_LOSS  # the KV never came
            started = time.monotonic()
            if transport != "grpc":
                # Claimed: the blocks stay out of use until the lease ends (minus nothing).
                await asyncio.sleep(0.5)
                st = d.parts["core"].stats
                assert st.num_free_blocks < st.num_total_blocks
            await wait_idle(d, timeout=10)
            if transport != "grpc":
                assert time.monotonic() - started > 3.0
            await channel.close()

    asyncio.run(main())


MEMORY = [t for t in TRANSPORTS if t != "grpc"]
WRITE_LEASE_S = 1.5


@pytest.mark.parametrize("transport", MEMORY)
def test_a_writer_that_stops_renewing_or_dies_loses_the_blocks_at_its_write_lease_end(
    in_process_pods, model_dir, reference, transport
):
    """RenewKV keeps a claimed reservation alive past kv_write_lease_s (only for its token);
    once the renewals stop, the request fails within the write lease (kv_timeout_s is 20 s,
    kv_lease_s 30 s) and its blocks come back at once.

    Then the same with a real writer: a prefill process claims a reservation, writes half of it
    and renews its write lease (KVSender's renewer, in a process of its own), then dies by
    SIGKILL without a word: the blocks come back within kv_write_lease_s, and the requests that
    reuse them, the dead writer's prompt among them, are token-exact."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    orphan = list(range(3, 60))
    batch = [orphan, *prompts(3, seed=21)]
    want = expected(reference, batch)

    async def fails_for_its_write_lease(call, since: float) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while True:
                await call.read()
        assert e.value.code() == grpc.StatusCode.DATA_LOSS
        assert "write lease" in e.value.details()
        # Within the write lease, well before kv_claim_timeout_s would have run out.
        assert time.monotonic() - since < WRITE_LEASE_S + 1.0

    async def main():
        # The claim deadline outlasts the dead writer's start-up (a Python process importing
        # torch and, for nixl, creating an agent: over 5 s on a loaded 2-core CI machine, whose
        # claim then found the reservation released as unclaimed). Claimed reservations are
        # bound by the write lease, which this test is about.
        decode = dict(
            kv_timeout_s=20.0,
            kv_lease_s=30.0,
            kv_write_lease_s=WRITE_LEASE_S,
            kv_claim_timeout_s=15.0,
        )
        async with pods(in_process_pods, model_dir, transport, decode=decode) as (
            dispatcher,
            p,
            d,
        ):
            address = f"127.0.0.1:{d.port}"
            channel, stub, call, admitted = await _reserve(address, "slow", list(range(3, 40)))
            token = admitted.transfer_token
            renew = decode_pb2.RenewKVRequest(request_id="slow", transfer_token=token)
            with pytest.raises(grpc.aio.AioRpcError) as e:  # unclaimed: nothing to renew
                await stub.RenewKV(renew)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            claim = await stub.ClaimKV(
                decode_pb2.ClaimKVRequest(
                    request_id="slow", transfer_token=token, transport=transport, renews=True
                )
            )
            assert claim.lease_expires_unix_ms < admitted.lease_expires_unix_ms  # the short one
            expires = claim.lease_expires_unix_ms
            for _ in range(4):  # past the first grant, renewed every third
                await asyncio.sleep(WRITE_LEASE_S / 3)
                for forged in ("", "x", token + "x"):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.RenewKV(
                            decode_pb2.RenewKVRequest(request_id="slow", transfer_token=forged)
                        )
                    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                answer = await stub.RenewKV(renew)
                assert expires < answer.lease_expires_unix_ms <= admitted.lease_expires_unix_ms
                expires = answer.lease_expires_unix_ms
            st = d.parts["core"].stats
            assert st.num_waiting_for_kv == 1 and st.num_free_blocks < st.num_total_blocks
            await fails_for_its_write_lease(call, time.monotonic())  # no renewal from here on
            await wait_idle(d, timeout=1.0)  # drained at once: the write lease is over
            with pytest.raises(grpc.aio.AioRpcError) as e:  # and it never comes back
                await stub.RenewKV(renew)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

            # A real writer, killed mid-transfer.
            _, _, call, admitted = await _reserve(address, "orphan", orphan)
            writer = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("dead_kv_writer.py")), address]
                + ["orphan", admitted.transfer_token, transport],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                line = await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), timeout=60)
                assert line.startswith("WRITING"), line + writer.stdout.read()
                # Renewed from the other process: alive past the write lease.
                await asyncio.sleep(WRITE_LEASE_S + 0.5)
                assert writer.poll() is None
                st = d.parts["core"].stats
                assert st.num_waiting_for_kv == 1 and st.num_free_blocks < st.num_total_blocks
                writer.send_signal(signal.SIGKILL)
                killed = time.monotonic()
            finally:
                writer.kill()
                writer.wait()
            await fails_for_its_write_lease(call, killed)
            await wait_idle(d, timeout=1.0)
            got = await run_batch(dispatcher, "after", batch)
            await wait_idle(d)
            await channel.close()
            return got

    assert asyncio.run(main()) == want


def test_a_fallback_is_logged_counted_and_refused_when_strict(
    in_process_pods, model_dir, reference, caplog
):
    """The decode pod offers grpc only: an ``auto`` prefill pod falls back loudly, a strict one
    refuses."""
    if len(TRANSPORTS) < 2:
        pytest.skip("no memory transport on this machine: nothing to fall back from")
    batch = prompts(2, seed=11)
    want = expected(reference, batch)

    async def main(strict: bool):
        async with in_process_pods(
            model_dir,
            prefill=dict(kv_transport="auto", kv_transport_strict=strict),
            decode=dict(kv_transport="grpc"),
            num_kv_blocks=NUM_KV_BLOCKS,
            device=DEVICE,
        ) as (dispatcher, p, d):
            if strict:
                from services.router.flow import Route

                route = Route()
                params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
                events = [e async for e in dispatcher.generate(Job("s", batch[0], params), route)]
                # The router's retry runs it colocated: the strict prefill pod refused.
                assert route.mode == "colocated" and events
                assert kv_bytes(p, "grpc") == 0
                await wait_idle(d)
                return None
            got = [await generate(dispatcher, f"f{i}", x) for i, x in enumerate(batch)]
            fallbacks = sum(
                s.value
                for f in p.parts["metrics"].registry.collect()
                if f.name == "tandem_kv_transfer_fallbacks"
                for s in f.samples
                if s.name.endswith("_total") and s.labels["transport"] == "grpc"
            )
            assert fallbacks == len(batch)
            assert kv_bytes(p, "grpc") > 0
            return got

    with caplog.at_level("WARNING"):
        assert asyncio.run(main(strict=False)) == want
    assert any("falls back to grpc" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        asyncio.run(main(strict=True))
    assert any("--kv-transport-strict" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU ranks (gloo); GPU ranks need one GPU each")
@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_pods_of_different_tensor_parallel_sizes_exchange_kv_token_exact(
    in_process_pods, model_dir, reference, prefill_tp, decode_tp
):
    """A page carries every kv head: a tensor-parallel prefill pod gathers its ranks' heads
    onto rank 0 before sending; a tensor-parallel decode pod splits each page between its
    ranks' pools. Both take gRPC, whatever ``auto`` would pick between one-rank pods."""
    batch = prompts(6, seed=5)
    want = expected(reference, batch)

    async def main():
        async with in_process_pods(
            model_dir,
            prefill=dict(tensor_parallel_size=prefill_tp),
            decode=dict(tensor_parallel_size=decode_tp),
            num_kv_blocks=NUM_KV_BLOCKS,
            device=DEVICE,
            kv_transport="auto",
        ) as (dispatcher, p, d):
            assert (
                p.parts["core"].info.tensor_parallel_size,
                d.parts["core"].info.tensor_parallel_size,
            ) == (prefill_tp, decode_tp)
            got = await run_batch(dispatcher, "tp", batch)
            assert kv_bytes(p, "grpc") > 0 and kv_bytes(d, "grpc") == kv_bytes(p, "grpc")
            assert all(kv_bytes(p, t) == 0 for t in TRANSPORTS if t != "grpc")
            await wait_idle(d)
            return got

    assert asyncio.run(main()) == want
