"""Prefix-aware routing with real processes and a real Redis: 2 prefill pods, 1 decode, kvstore."""

import concurrent.futures
import random
import threading
import time

import httpx
import pytest

from services.local_cluster import (
    RedisProcess,
    Service,
    counter_totals,
    free_port,
    grpc_healthy,
    http_healthy,
    pod_stats,
)
from tandem.api import cluster_auth
from tandem.api.hashing import BlockHasher
from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc

from ..e2e.conftest import start_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(e2e_model):
    # What these tests pin is where a lookup's answer sends a prompt; the routers' 50 ms lookup
    # deadline (falling back to routing by load) was missed on a loaded 2-core CI machine.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TANDEM_ROUTER_KVSTORE_TIMEOUT_S", "5")
        c = start_cluster(e2e_model, prefill=2, decode=1, worker_args=["--max-num-seqs", "16"])
        try:
            yield c
        finally:
            c.stop()


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def complete(url: str, prompt: list[int]) -> dict:
    r = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": prompt, "max_tokens": 2, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def hits(cluster) -> dict[str, int]:
    return {p.name: pod_stats(p).prefix_cache_hits for p in cluster.pods("prefill")}


def queries(cluster) -> dict[str, int]:
    """Prompt tokens each prefill pod has looked up in its cache: grows on the pod that served."""
    return {p.name: pod_stats(p).prefix_cache_queries for p in cluster.pods("prefill")}


def choices(url: str) -> dict[str, float]:
    return counter_totals(f"{url}/metrics", "tandem_router_prefill_choices", "reason")


def kvstore_entries(cluster) -> int:
    with cluster_auth.channel(cluster.by_name("kvstore").address, []) as channel:
        return (
            kvstore_pb2_grpc.KVStoreServiceStub(channel)
            .Stats(kvstore_pb2.StatsRequest(), timeout=5)
            .num_entries
        )


def kvstore_holders(cluster, prompt: list[int]) -> dict[str, int]:
    """kvstore's answer for ``prompt``: pod id -> leading blocks held (the router's lookup)."""
    stats = pod_stats(cluster.pods("prefill")[0])
    hashes = BlockHasher(stats.model_fingerprint, stats.block_size).hash_prompt(prompt, None)
    with cluster_auth.channel(cluster.by_name("kvstore").address, []) as channel:
        resp = kvstore_pb2_grpc.KVStoreServiceStub(channel).Lookup(
            kvstore_pb2.LookupRequest(
                model_fingerprint=stats.model_fingerprint, block_hashes=hashes
            ),
            timeout=5,
        )
    return {m.pod_id: m.num_blocks for m in resp.matches}


def sees_every_prefill_pod(cluster, address: str) -> bool:
    """A router's /health counts the prefill pods it has polled healthy."""
    answer = httpx.get(f"http://{address}/health", timeout=5)
    return answer.status_code == 200 and answer.json()["prefill_pods"] == len(
        cluster.pods("prefill")
    )


def wait_until(cond, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, (
            f"timed out waiting for {what() if callable(what) else what}"
        )
        time.sleep(0.1)


def served_by(cluster, before: dict[str, int], read, at_least: int = 1) -> str:
    """The one prefill pod whose counter (``read()``: pod -> count) grew, by ``at_least``. Pods'
    stats are snapshots their engine core publishes every 100 ms: poll until one shows it."""
    deadline = time.monotonic() + 5.0
    while True:
        after = read()
        if any(after[n] - before[n] >= at_least for n in after) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    gained = [name for name in after if after[name] > before[name]]
    assert len(gained) == 1, (before, after)
    return gained[0]


def warm(cluster, url, prefix) -> None:
    """Serve one request with the prefix and wait until kvstore indexed its blocks."""
    before = kvstore_entries(cluster)
    complete(url, prefix + tokens(8, 999))
    wait_until(
        lambda: kvstore_entries(cluster) >= before + len(prefix) // 16,
        what="kvstore to index the prefix",
    )


def test_prompts_sharing_a_system_prompt_land_on_the_pod_that_caches_it(cluster):
    system = tokens(256, seed=1)  # 16 blocks
    warm(cluster, cluster.router_url, system)
    before_hits, before_choices = hits(cluster), choices(cluster.router_url)
    cached = [
        complete(cluster.router_url, system + tokens(32, 100 + i))["usage"][
            "prompt_tokens_details"
        ]["cached_tokens"]
        for i in range(6)
    ]
    assert cached == [256] * 6, (choices(cluster.router_url), hits(cluster))
    pod = served_by(cluster, before_hits, lambda: hits(cluster), at_least=6 * 256)
    after_hits, after_choices = hits(cluster), choices(cluster.router_url)
    assert after_hits[pod] - before_hits[pod] == 6 * 256
    assert after_choices.get("prefix", 0) - before_choices.get("prefix", 0) == 6


def test_two_router_replicas_route_a_prompt_to_the_same_pod(cluster):
    """Each router with its own kvstore replica, both replicas on the one Redis: the pods publish
    to the first, the second router's lookups go through the second."""
    kv_args = list(cluster.by_name("kvstore").args)
    kv_port = free_port()
    kv_args[kv_args.index("--port") + 1] = str(kv_port)
    kv_args[kv_args.index("--metrics-port") + 1] = str(free_port())
    kvstore_2 = Service(
        "kvstore-2", kv_args, f"127.0.0.1:{kv_port}", lambda: grpc_healthy(f"127.0.0.1:{kv_port}")
    )
    kvstore_2.proc, kvstore_2.relay = cluster.spawn("kvstore-2", kv_args)
    started = [kvstore_2]
    try:
        # The router connects to its kvstore as it starts: a replica still starting then would
        # leave its channel backing off (lookups failing, prompts routed by load) on a loaded
        # machine.
        wait_until(kvstore_2.ready, 60, "the second kvstore")
        args = list(cluster.by_name("router").args)
        port = free_port()
        args[args.index("--port") + 1] = str(port)
        args[args.index("--grpc-port") + 1] = str(free_port())
        args[args.index("--kvstore") + 1] = kvstore_2.address
        second = Service(
            "router-2",
            args,
            f"127.0.0.1:{port}",
            lambda: http_healthy(f"http://127.0.0.1:{port}/health"),
        )
        second.proc, second.relay = cluster.spawn("router-2", args)
        started.append(second)
        wait_until(second.ready, 60, "the second router")
        # Ready means a decode pod is; a prefill pod router 2 has not polled yet is not among
        # its candidates, and the prompt would go by load to the other one (CI saw that).
        wait_until(
            lambda: sees_every_prefill_pod(cluster, second.address),
            60,
            "the second router to see every prefill pod",
        )
        system = tokens(256, seed=2)
        warm(cluster, cluster.router_url, system)  # router 1 places it
        before = hits(cluster)
        complete(cluster.router_url, system + tokens(16, 7))
        first_pod = served_by(cluster, before, lambda: hits(cluster))
        before, second_choices = hits(cluster), choices(f"http://{second.address}")
        out = complete(f"http://{second.address}", system + tokens(16, 8))  # router 2 finds it
        # What router 2 decided and what the pod reused come with the answer; the pods' hit
        # counters are snapshots that may lag on a loaded machine, so they come last.
        after_choices = choices(f"http://{second.address}")
        assert after_choices.get("prefix", 0) == second_choices.get("prefix", 0) + 1, (
            second_choices,
            after_choices,
        )
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 256
        assert served_by(cluster, before, lambda: hits(cluster)) == first_pod
    finally:
        for service in reversed(started):
            service.proc.terminate()
            service.proc.wait(10)


def test_requests_survive_redis_dying_and_routing_recovers(cluster):
    system = tokens(256, seed=3)
    warm(cluster, cluster.router_url, system)
    port = cluster.redis.port
    before = choices(cluster.router_url)
    redis_killed = threading.Event()

    def client(worker: int) -> list[str]:
        """Requests back to back, before and after Redis dies: every one must be served."""
        finishes = []
        for i in range(6):
            if i == 2 and worker == 0:
                cluster.redis.stop()  # mid-run, with the other clients' requests in flight
                redis_killed.set()
            finishes.append(
                complete(cluster.router_url, system + tokens(16, 300 + 10 * worker + i))["choices"][
                    0
                ]["finish_reason"]
            )
            if i == 2:
                redis_killed.wait(30)
        return finishes

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            finishes = [f for result in pool.map(client, range(4)) for f in result]
        assert len(finishes) == 24 and all(finishes)
        unavailable = choices(cluster.router_url).get("index_unavailable", 0) - before.get(
            "index_unavailable", 0
        )
        assert unavailable >= 12  # at least every request sent after the kill routed by load alone
    finally:
        cluster.redis = RedisProcess.start(port=port)  # back, empty

    # The pods notice (heartbeat: unknown incarnation) and resend their caches; wait until both are
    # registered again and the index names a holder of the whole system prompt (load routing may
    # have put it on both pods, so the entry count says nothing about who resynced).
    def resynced() -> bool:
        with cluster_auth.channel(cluster.by_name("kvstore").address, []) as channel:
            live = (
                kvstore_pb2_grpc.KVStoreServiceStub(channel)
                .Stats(kvstore_pb2.StatsRequest(), timeout=5)
                .live_pods
            )
        block_size = pod_stats(cluster.pods("prefill")[0]).block_size
        return (
            live == 2
            and max(kvstore_holders(cluster, system).values(), default=0)
            == len(system) // block_size
        )

    wait_until(
        resynced,
        20,
        lambda: f"the pods to resync the index (holders: {kvstore_holders(cluster, system)})",
    )
    before = choices(cluster.router_url)
    out = complete(cluster.router_url, system + tokens(16, 399))
    assert choices(cluster.router_url).get("prefix", 0) - before.get("prefix", 0) == 1
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 256


def test_a_restarted_prefill_pod_loses_its_old_entries(cluster):
    system = tokens(256, seed=4)
    before = queries(cluster)
    warm(cluster, cluster.router_url, system)
    holder = next(
        p
        for p in cluster.pods("prefill")
        if p.name == served_by(cluster, before, lambda: queries(cluster))
    )
    holder.proc.terminate()
    holder.proc.wait(10)
    holder.proc, holder.relay = cluster.spawn(
        holder.name, holder.args
    )  # same pod id, new incarnation, empty cache
    wait_until(holder.ready, 60, "the restarted pod")
    wait_until(
        lambda: httpx.get(f"{cluster.router_url}/health").json()["prefill_pods"] == 2,
        20,
        "the router",
    )
    # Its first heartbeat retires the old incarnation's entries: kvstore then knows no holder.
    wait_until(
        lambda: kvstore_holders(cluster, system) == {},
        20,
        "kvstore to drop the old incarnation's entries",
    )
    before = choices(cluster.router_url)
    out = complete(cluster.router_url, system + tokens(16, 499))
    after = choices(cluster.router_url)
    assert after.get("prefix", 0) == before.get("prefix", 0), "routed on a dead pod's entries"
    assert after.get("load", 0) - before.get("load", 0) == 1
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
