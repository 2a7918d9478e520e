"""Chaos: ``kill -9`` of a decode pod mid-stream -- its streams move to the other decode pod and
finish with the text of an uninterrupted run (request migration, ``--max-migrations``).

One cluster (1 prefill pod, 2 decode pods, the router) plus a second router that knows
only ``decode-0`` and runs with ``--max-migrations 0``. One scenario serves the module's tests:

1. uninterrupted reference runs of the default router's requests (greedy and seeded sampling);
2. the same requests as concurrent streams; once every stream is mid-way, the decode pod
   holding more of them is killed with SIGKILL;
3. its streams continue on the other decode pod: every stream's text equals its reference
   (greedy and seeded alike), the surviving pods return to their baseline free KV blocks, and
   the router counts the migrations;
4. ``decode-0`` (restarted if it was the victim) is killed under streams of the
   ``--max-migrations 0`` router: they end with an in-stream 503 error, as before migration.
"""

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from services.local_cluster import (
    LocalCluster,
    Service,
    UpOptions,
    counter_totals,
    free_port,
    pod_stats,
    router_sees_every_pod,
)

from ..e2e.conftest import NUM_KV_BLOCKS
from .conftest import kill9, pod_baseline, served_model, wait_for_baseline

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

GREEDY = 16
SEEDED = 4
UNMIGRATED = 4
MAX_TOKENS = 200
"""Long enough that generation outlasts the kill on a loaded machine (at 96, a busy CI-sized
machine let the pods finish while the router still relayed the streams)."""
KILL_AFTER_CHUNKS = 4
"""``decode-0`` dies once every stream has at least this many chunks (or ended already)."""


def body(model: str, index: int, *, seeded: bool = False) -> dict:
    prompt = " ".join(f"w{(index * 7919 + i) % 997}" for i in range(30))
    b = {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    if seeded:
        b.update(temperature=1.0, top_p=0.9, seed=1000 + index, frequency_penalty=0.5)
    return b


@dataclass
class Stream:
    """One stream as its client saw it (updated as chunks arrive)."""

    status: int | None = None
    text: str = ""
    chunks: int = 0
    done: bool = False
    finish_reason: str | None = None
    error: dict | None = None
    exception: str | None = None
    open_at_kill: bool = False
    """The stream was still going when ``decode-0`` was killed."""

    @property
    def ended(self) -> bool:
        return self.done or self.error is not None or self.exception is not None


async def follow(client: httpx.AsyncClient, url: str, request: dict, out: Stream) -> None:
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=request) as response:
            out.status = response.status_code
            if response.status_code != 200:
                out.error = json.loads(await response.aread()).get("error")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    out.done = True
                    return
                event = json.loads(data)
                if "error" in event:
                    out.error = event["error"]
                    continue
                out.chunks += 1
                for choice in event["choices"]:
                    out.text += choice.get("text", "")
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
    except httpx.HTTPError as exc:
        out.exception = f"{type(exc).__name__}: {exc}"


def start(model_dir) -> tuple[LocalCluster, str]:
    """The cluster and the URL of its second router (``decode-0`` only, no migration)."""
    cluster = LocalCluster(
        UpOptions(
            model=model_dir,
            port=0,
            prefill=1,
            decode=2,
            num_kv_blocks=NUM_KV_BLOCKS,
            kvstore=False,  # fewer processes to start; prefix routing plays no part here
        ),
        model_dir,
        relay=False,
    )
    cluster.start_redis()
    cluster.plan()
    port = free_port()
    args = list(cluster.by_name("router").args)
    args[args.index("--port") + 1] = str(port)
    args[args.index("--grpc-port") + 1] = str(free_port())
    args[args.index("--decode") + 1] = json.dumps([cluster.by_name("decode-0").address])
    args += ["--max-migrations", "0"]
    url = f"http://127.0.0.1:{port}"
    cluster.services.append(
        Service(
            "router-nomig",
            args,
            f"127.0.0.1:{port}",
            lambda: router_sees_every_pod(f"{url}/health", 1, 1),
            f"{url}/metrics",
        )
    )
    cluster.start()
    problem = cluster.wait_ready(300)
    if problem is not None:
        cluster.stop()
        raise RuntimeError(f"{problem}\n{''.join(list(cluster.log)[-60:])}")
    return cluster, url


def busy(cluster: LocalCluster, name: str) -> int:
    stats = pod_stats(cluster.by_name(name))
    return stats.num_running + stats.num_waiting + stats.num_waiting_for_kv


def restart(cluster: LocalCluster, name: str, router_url: str) -> None:
    """Start a killed pod again (same address) and wait until the router serves with it."""
    service = cluster.by_name(name)
    service.proc, service.relay = cluster.spawn(service.name, service.args)
    deadline = time.monotonic() + 120
    while not router_sees_every_pod(f"{router_url}/health", 1, 1):
        assert service.proc.poll() is None, f"{name} exited on restart"
        assert time.monotonic() < deadline, f"the router never saw {name} again"
        time.sleep(0.2)


def settled_counts(metrics_url: str) -> dict:
    """``tandem_router_migrations_total`` by outcome, once two readings agree (a request is
    counted as its response ends, a moment after the client read its last byte)."""
    last = None
    for _ in range(20):
        reading = counter_totals(metrics_url, "tandem_router_migrations", "outcome")
        if reading == last:
            return reading
        last = reading
        time.sleep(0.25)
    return last


@dataclass
class Scenario:
    references: list[str]
    """Uninterrupted texts of the default router's requests (greedy first, then seeded)."""
    migrated: list[Stream]
    """The default router's streams in the kill run, in the same order."""
    unmigrated: list[Stream]
    """The ``--max-migrations 0`` router's streams (all on the killed pod)."""
    migrations: dict
    nomig_migrations: dict
    survivors: list[str]
    """The pods alive after the first kill."""
    leak: str | None
    """How the survivors missed their baseline free KV blocks (None: they returned to it)."""
    seconds: float


@pytest.fixture(scope="module")
def scenario(chaos_model):
    cluster, nomig_url = start(chaos_model)
    try:
        url = cluster.router_url
        model = served_model(url)
        requests = [body(model, i) for i in range(GREEDY)]
        requests += [body(model, GREEDY + i, seeded=True) for i in range(SEEDED)]
        # Longer: the router may hold a short stream's every token (gRPC flow-control windows)
        # while a loaded client still reads it, and a pod killed then ends no stream.
        nomig = [{**body(model, 100 + i), "max_tokens": 800} for i in range(UNMIGRATED)]
        started = time.monotonic()

        async def run(
            target: str, bodies: list[dict], victim: Callable[[], str] | None
        ) -> tuple[list[Stream], str | None]:
            """Stream every body through the router at ``target``; with ``victim``, kill -9 the
            decode pod it names once every stream is mid-way."""
            streams = [Stream() for _ in bodies]
            killed = None
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits()) as client:
                tasks = [
                    asyncio.ensure_future(follow(client, target, b, s))
                    for b, s in zip(bodies, streams, strict=True)
                ]
                if victim is not None:
                    deadline = time.monotonic() + 60
                    while not all(s.chunks >= KILL_AFTER_CHUNKS or s.ended for s in streams):
                        assert time.monotonic() < deadline, "streams never got going"
                        await asyncio.sleep(0.02)
                    for s in streams:
                        s.open_at_kill = not s.ended and s.finish_reason is None
                    killed = victim()
                    kill9(cluster, killed)
                await asyncio.wait_for(asyncio.gather(*tasks), 120)
            return streams, killed

        def busiest() -> str:
            # Where the router put more streams (its choice by free blocks follows polls).
            return max(("decode-0", "decode-1"), key=lambda n: busy(cluster, n))

        references, _ = asyncio.run(run(url, requests, None))
        assert all(s.done and s.error is None for s in references), references
        baseline = pod_baseline(cluster)
        migrated, victim = asyncio.run(run(url, requests, busiest))
        migrations = settled_counts(f"{url}/metrics")
        survivors = {k: v for k, v in baseline.items() if k != victim}
        try:
            wait_for_baseline(cluster, survivors, timeout_s=30)
            leak = None
        except AssertionError as exc:
            leak = str(exc)
        # The --max-migrations 0 router knows decode-0 only: bring it back if it was the victim.
        if victim == "decode-0":
            restart(cluster, "decode-0", nomig_url)
        unmigrated, _ = asyncio.run(run(nomig_url, nomig, lambda: "decode-0"))
        yield Scenario(
            references=[s.text for s in references],
            migrated=migrated,
            unmigrated=unmigrated,
            migrations=migrations,
            nomig_migrations=settled_counts(f"{nomig_url}/metrics"),
            survivors=sorted(survivors),
            leak=leak,
            seconds=time.monotonic() - started,
        )
    finally:
        cluster.stop()


def test_greedy_streams_finish_with_the_uninterrupted_text(scenario):
    greedy = scenario.migrated[:GREEDY]
    transport = [s.exception for s in greedy if s.exception]
    assert not transport, transport
    identical = sum(
        s.done and s.error is None and s.finish_reason == "length" and s.text == ref
        for s, ref in zip(greedy, scenario.references, strict=False)
    )
    print(
        f"decode migration: {identical}/{GREEDY} greedy streams identical; migrations "
        f"{scenario.migrations}; scenario {scenario.seconds:.1f} s"
    )
    assert identical >= GREEDY - 1, [
        (s.error, s.finish_reason, s.text == ref)
        for s, ref in zip(greedy, scenario.references, strict=False)
    ]
    # The kill came mid-stream: the streams on the busier decode pod moved.
    assert sum(s.open_at_kill for s in scenario.migrated) >= len(scenario.migrated) // 2
    assert scenario.migrations.get("resumed", 0) >= 1, scenario.migrations
    assert scenario.migrations.get("failed", 0) == 0 == scenario.migrations.get("limit", 0)


def test_seeded_sampling_continues_deterministically(scenario):
    seeded = scenario.migrated[GREEDY:]
    assert all(s.done and s.error is None for s in seeded), seeded
    assert [s.text for s in seeded] == scenario.references[GREEDY:]


def test_surviving_pods_return_to_their_baseline_free_blocks(scenario):
    assert len(scenario.survivors) == 2 and "prefill-0" in scenario.survivors
    assert scenario.leak is None, scenario.leak


def test_max_migrations_0_ends_the_stream_with_an_error_as_before(scenario):
    cut = [s for s in scenario.unmigrated if s.open_at_kill]
    assert cut, "every stream of the --max-migrations 0 router had finished before the kill"
    for s in scenario.unmigrated:
        assert s.status == 200 and s.done and s.exception is None, s
    for s in cut:
        assert s.error is not None and s.error["code"] == 503, s
        assert "decode pod" in s.error["message"]
        assert s.chunks >= KILL_AFTER_CHUNKS
    assert scenario.nomig_migrations.get("limit", 0) == len(cut), scenario.nomig_migrations
    assert scenario.nomig_migrations.get("resumed", 0) == 0
