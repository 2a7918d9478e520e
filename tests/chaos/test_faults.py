"""Chaos: real processes broken under load -- nothing lost, nothing leaked.

One cluster (2 prefill pods, 2 decode pods, kvstore on a Redis server, the router) serves the
whole module; the tests run in file order, the destructive ones last:

1. disconnect storm: hundreds of streams dropped at random points (before the response, right
   after the headers, after k tokens) -> every pod returns to its baseline free KV blocks;
2. reservation flood: decode pods filled with ``Generate(REMOTE)`` reservations whose KV never
   comes -> the pools return to baseline within the decode pod's own deadline for unfed
   reservations, and ordinary requests succeed afterwards;
3. Redis dies under streaming load -> every request completes, placed by load
   (``index_unavailable``);
4. ``kill -9`` of a prefill pod under streaming load -> every request completes with the text of
   an uninterrupted run (those that were prefilling there are retried on the other pod before
   their first token), the survivors return to baseline;
5. router SIGTERM with streams open -> the streams finish; requests made during the drain get
   503 in the OpenAI envelope (never a refused connection); the router then exits.

Run: ``.venv/bin/pytest tests/chaos -p no:cacheprovider`` (marked ``chaos``, ``integration``,
``slow``).
"""

import asyncio
import os
import random
import signal
import time
from collections import Counter

import grpc
import httpx
import pytest

from services.local_cluster import RedisProcess, counter_totals
from tandem.api.proto_convert import sampling_params_to_proto
from tandem.api.sampling_params import SamplingParams
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc

from .conftest import (
    completion_body,
    kill9,
    pod_baseline,
    pod_channel,
    served_model,
    start_cluster,
    stream_load,
    stream_one,
    wait_for_baseline,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

KV_TIMEOUT_S = 15.0
"""The decode pods' wait for a reservation's KV pages (``TANDEM_DECODE_KV_TIMEOUT_S``), short
so that the reservation flood is bounded even without an earlier claim deadline."""
KV_LEASE_S = 20.0
"""The decode pods' lease on reserved blocks (``TANDEM_DECODE_KV_LEASE_S``, must exceed
KV_TIMEOUT_S). A prefill pod killed after it claimed a memory-transport lease (shm on CPU) stops
renewing its write lease (``TANDEM_DECODE_KV_WRITE_LEASE_S``, 10 s): the decode pod frees those
blocks when it ends; the kill test waits at most for this lease."""


@pytest.fixture(scope="module")
def cluster(chaos_model):
    os.environ["TANDEM_DECODE_KV_TIMEOUT_S"] = str(KV_TIMEOUT_S)  # inherited by the pods only
    os.environ["TANDEM_DECODE_KV_LEASE_S"] = str(KV_LEASE_S)
    # The SIGTERM test's streams must finish within the router's drain on a loaded 2-core machine.
    os.environ["TANDEM_ROUTER_SHUTDOWN_GRACE_S"] = "120"
    try:
        c = start_cluster(chaos_model, prefill=2, decode=2)
    finally:
        del os.environ["TANDEM_DECODE_KV_TIMEOUT_S"]
        del os.environ["TANDEM_DECODE_KV_LEASE_S"]
        del os.environ["TANDEM_ROUTER_SHUTDOWN_GRACE_S"]
    yield c
    c.stop()


@pytest.fixture(scope="module")
def model(cluster):
    return served_model(cluster.router_url)


def assert_alive(cluster, *, except_for=()):
    dead = [
        (s.name, s.proc.returncode)
        for s in cluster.services
        if s.name not in except_for and s.proc.poll() is not None
    ]
    assert not dead, f"services died: {dead}\n{''.join(list(cluster.log)[-40:])}"


def failures(results):
    return [r for r in results if not r.ok]


# ---------------------------------------------------------------------------------------------


def test_disconnect_storm_leaks_no_blocks(cluster, model):
    baseline = pod_baseline(cluster)
    rng = random.Random(18)
    n, max_tokens = 200, 16
    bodies = [
        completion_body(model, i, max_tokens=max_tokens, words=rng.randint(8, 60)) for i in range(n)
    ]
    # a third dropped before the response starts (a timer), a sixth right after the headers, the
    # rest after 1..max_tokens-1 chunks
    plan = [rng.choice(["timer", "timer", 0, "chunks", "chunks", "chunks"]) for _ in range(n)]

    async def storm():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            gate = asyncio.Semaphore(32)

            async def one(i):
                async with gate:
                    how = plan[i]
                    if how == "timer":
                        try:
                            return await asyncio.wait_for(
                                stream_one(client, cluster.router_url, bodies[i], i),
                                rng.uniform(0.0, 0.4),
                            )
                        except TimeoutError:
                            return "dropped"
                    drop = 0 if how == 0 else rng.randint(1, max_tokens - 1)
                    return await stream_one(
                        client, cluster.router_url, bodies[i], i, drop_after_chunks=drop
                    )

            return await asyncio.gather(*(one(i) for i in range(n)))

    results = asyncio.run(storm())
    broken = [r for r in results if r != "dropped" and r.exception]
    bad_status = [r for r in results if r != "dropped" and r.status not in (200, 429, 503)]
    assert not broken and not bad_status, (broken[:3], bad_status[:3])
    outcomes = Counter(
        "dropped" if r == "dropped" or r.dropped else "completed" if r.ok else str(r.status)
        for r in results
    )
    print(f"disconnect storm: {n} streams: {dict(outcomes)}")
    assert outcomes["dropped"] > n // 2, outcomes
    assert_alive(cluster)
    wait_for_baseline(cluster, baseline, timeout_s=30)
    # and the cluster still serves
    after = asyncio.run(stream_load(cluster.router_url, [completion_body(model, 9999)]))
    assert not failures(after), after


# ---------------------------------------------------------------------------------------------


def unfed_reservation_deadline_s() -> float:
    """The decode pod's bound on a reservation whose KV never comes: its early claim deadline
    when it has one (a ``*claim*`` duration setting), else its wait for KV pages."""
    from services.decode.settings import DecodeSettings

    fields = DecodeSettings.model_fields
    claim = [
        f.default
        for name, f in fields.items()
        if "claim" in name and name.endswith("_s") and isinstance(f.default, int | float)
    ]
    return min([KV_TIMEOUT_S, *claim])


def test_reservation_flood_is_released(cluster, model):
    """Generate(REMOTE) reservations that are never fed (a prefill pod that never comes, or a
    misbehaving peer) fill both decode pools; they are released within the decode pod's
    deadline, then ordinary requests succeed."""
    baseline = pod_baseline(cluster)
    bound = unfed_reservation_deadline_s() + 5.0  # + stats lag and the reaper's tick
    calls, channels, refused = [], [], 0
    params = sampling_params_to_proto(SamplingParams(temperature=0, max_tokens=4))
    for pod in cluster.pods("decode"):
        channel = pod_channel(cluster, pod.address)
        channels.append(channel)
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        for i in range(400):
            call = stub.Generate(
                decode_pb2.GenerateRequest(
                    request_id=f"flood-{pod.name}-{i}",
                    prompt_token_ids=[random.Random(i).randrange(3, 900) for _ in range(40)],
                    sampling_params=params,
                    prefill_mode=decode_pb2.PREFILL_MODE_REMOTE,
                ),
                timeout=120,
            )
            try:
                first = next(call)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                refused += 1
                break
            assert first.HasField("admitted")
            calls.append(call)
    flooded_at = time.monotonic()
    try:
        assert refused == 2, "the flood did not fill both decode pools"
        assert len(calls) >= 2 * 40
        # the pools are full now: the router answers 429 (never a 5xx) -- unless the flood
        # has already been released
        probe = httpx.post(
            f"{cluster.router_url}/v1/completions",
            json={**completion_body(model, 1), "stream": False},
            timeout=30,
        )
        assert probe.status_code in (200, 429), probe.text
        wait_for_baseline(cluster, baseline, timeout_s=bound)
        released_after = time.monotonic() - flooded_at
        # every reservation's stream ends with an error (never tokens: no KV came)
        codes = set()
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                for resp in call:
                    assert not resp.HasField("chunk"), "tokens without KV"
            codes.add(e.value.code())
        assert grpc.StatusCode.OK not in codes, codes
        print(
            f"reservation flood: {len(calls)} reservations released after "
            f"{released_after:.1f} s (bound {bound:.0f} s); stream codes {codes}"
        )
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
    results = asyncio.run(
        stream_load(cluster.router_url, [completion_body(model, 500 + i) for i in range(8)])
    )
    assert not failures(results), failures(results)
    assert_alive(cluster)


# ---------------------------------------------------------------------------------------------


def test_redis_death_under_load(cluster, model):
    baseline = pod_baseline(cluster)
    metrics = cluster.by_name("router").metrics_url
    before = counter_totals(metrics, "tandem_router_prefill_choices", "reason")
    bodies = [completion_body(model, 1000 + i, max_tokens=24) for i in range(48)]

    async def load_and_kill():
        task = asyncio.ensure_future(stream_load(cluster.router_url, bodies, concurrency=12))
        await asyncio.sleep(0.5)
        cluster.redis.proc.kill()  # kill -9 of the Redis server
        cluster.redis.proc.wait(5)
        return await task

    port = cluster.redis.port
    try:
        results = asyncio.run(load_and_kill())
        assert not failures(results), failures(results)[:3]
        # after Redis is gone, requests are still routed (by load)
        later = asyncio.run(
            stream_load(cluster.router_url, [completion_body(model, 2000 + i) for i in range(8)])
        )
        assert not failures(later), failures(later)
        after = counter_totals(metrics, "tandem_router_prefill_choices", "reason")
        gained = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert gained.get("index_unavailable", 0) >= 8, gained
        assert_alive(cluster)
        wait_for_baseline(cluster, baseline)
    finally:
        cluster.redis = RedisProcess.start(port)  # back for the tests after this one


# ---------------------------------------------------------------------------------------------


def test_kill9_prefill_under_streaming_load(cluster, model):
    """No request lost: streams prefilling on the killed pod are retried on the other one before
    their first token, and every text equals an uninterrupted run's."""
    metrics = cluster.by_name("router").metrics_url
    n = 32

    def bodies(salt):
        out = []
        for i in range(n):
            b = completion_body(model, 3000 + i, max_tokens=16, words=60)
            b["cache_salt"] = salt  # no prefix-cache hit from the other run: both prefill
            out.append(b)
        return out

    reference = asyncio.run(stream_load(cluster.router_url, bodies("ref"), concurrency=12))
    assert not failures(reference)
    baseline = pod_baseline(cluster)
    attempts_before = counter_totals(metrics, "tandem_router_attempts")[None]
    victim = cluster.by_name("prefill-0")

    async def load_and_kill():
        task = asyncio.ensure_future(
            stream_load(cluster.router_url, bodies("chaos"), concurrency=12)
        )
        from services.local_cluster import pod_stats

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not task.done():
            st = await asyncio.to_thread(pod_stats, victim)
            if st.num_running or st.num_waiting:
                break
            await asyncio.sleep(0.02)
        kill9(cluster, "prefill-0")
        return await task

    results = asyncio.run(load_and_kill())
    assert not failures(results), failures(results)[:3]
    assert [r.text for r in results] == [r.text for r in reference]
    attempts = counter_totals(metrics, "tandem_router_attempts")[None] - attempts_before
    print(f"prefill kill -9: {n} streams, {attempts:.0f} attempts ({attempts - n:.0f} retries)")
    assert attempts > n, "the kill hit no request in flight: nothing was tested"
    assert_alive(cluster, except_for={"prefill-0"})
    # Blocks the killed pod had claimed (memory transport) come back when their write lease ends.
    wait_for_baseline(
        cluster,
        {k: v for k, v in baseline.items() if k != "prefill-0"},
        timeout_s=KV_LEASE_S + 15,
    )


# ---------------------------------------------------------------------------------------------


def test_router_sigterm_drains_streams_and_answers_503(cluster, model):
    router = cluster.by_name("router")
    baseline = pod_baseline(cluster)
    # 6 x ~950 tokens fit two decode pods' 256 blocks of 16 however the router splits them. The
    # streams must outlast what follows the signal (the drain's start and 15 probes, well under
    # a second on an idle machine); 900 tokens take seconds even there (400 did not, in CI).
    n, max_tokens = 6, 900
    url = cluster.router_url

    async def probe(client: httpx.AsyncClient, method: str, path: str, body=None) -> tuple:
        try:
            resp = await client.request(method, f"{url}{path}", json=body)
            return resp.status_code, resp.headers, resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            return None, {}, repr(exc)

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [
                asyncio.ensure_future(
                    stream_one(
                        client, url, completion_body(model, 4000 + i, max_tokens=max_tokens), i
                    )
                )
                for i in range(n)
            ]
            # Every stream reached a decode pod (the router accepted it) before the signal.
            deadline = time.monotonic() + 30
            while (busy := await asyncio.to_thread(_decode_busy, cluster)) < n:
                assert time.monotonic() < deadline, f"only {busy} of {n} streams reached a pod"
                await asyncio.sleep(0.05)
            router.proc.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(timeout=10) as fresh:
                # The drain has begun once /health answers 503 (it answers 200 until then).
                deadline = time.monotonic() + 10
                while (await probe(fresh, "GET", "/health"))[0] != 503:
                    assert time.monotonic() < deadline, "the router never started draining"
                    await asyncio.sleep(0.02)
                probes = []
                for i in range(5):  # a whole completion, a stream and a health check at once
                    probes += await asyncio.gather(
                        probe(
                            fresh,
                            "POST",
                            "/v1/completions",
                            {**completion_body(model, 5000 + i), "stream": False},
                        ),
                        probe(fresh, "POST", "/v1/completions", completion_body(model, 5100 + i)),
                        probe(fresh, "GET", "/health"),
                    )
            still_running = sum(1 for s in streams if not s.done())
            return await asyncio.gather(*streams), probes, still_running

    results, probes, still_running = asyncio.run(scenario())
    assert still_running > 0, "the streams ended before the probes: the drain was not tested"
    assert not failures(results), [
        (r.index, r.status, r.chunks, r.done, r.error, r.exception) for r in failures(results)
    ]
    for status, headers, body in probes:
        assert status == 503, (status, body)
        assert body["error"]["code"] == 503 and body["error"]["type"] == "ServiceUnavailableError"
        assert headers.get("retry-after")
    router.proc.wait(60)
    assert router.proc.returncode in (0, -signal.SIGTERM), router.proc.returncode
    assert_alive(cluster, except_for={"router", "prefill-0"})
    wait_for_baseline(cluster, {k: v for k, v in baseline.items() if k != "prefill-0"})


def _decode_busy(cluster) -> int:
    """Requests the live decode pods hold (running, waiting, or waiting for their KV)."""
    from services.local_cluster import pod_stats

    return sum(
        st.num_running + st.num_waiting + st.num_waiting_for_kv
        for st in (pod_stats(p) for p in cluster.pods("decode") if p.proc.poll() is None)
    )
