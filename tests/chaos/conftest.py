"""Chaos-suite helpers: a cluster of real processes, streaming load, pod baselines, kill targets.

Every chaos test runs the whole system as real processes (``LocalCluster`` through
``tests/e2e/conftest.py``'s ``start_cluster``) and breaks a part of it for real: ``kill -9``,
SIGTERM, a Redis server stopped, clients that drop their connections. Its checks are the
user-visible ones: every request completes or gets a clean HTTP status (never a lost stream or a
connection error), and every surviving pod returns to its baseline of free KV blocks.

Helpers:

- ``stream_load`` / ``stream_one``: N concurrent OpenAI streaming completions through the
  router; each result records the HTTP status, the text, whether the stream ended with
  ``[DONE]`` and any in-stream error event.
- ``pod_baseline`` / ``wait_for_baseline``: the free KV blocks of every pod, polled (an engine
  core's stats snapshot lags up to ~100 ms, so one reading right after a request ends can still
  count its blocks) until they settle.
- ``service_pid`` / ``kill9``: the process of a named service (``prefill-0``, ``router``, ...).
- ``pod_channel``: a gRPC channel to a pod carrying whatever credentials the cluster hands out.
"""

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field

import grpc
import httpx
import pytest

from services.local_cluster import LocalCluster, Service, pod_stats

from ..e2e.conftest import start_cluster

__all__ = [
    "StreamResult",
    "completion_body",
    "kill9",
    "pod_baseline",
    "pod_channel",
    "service_pid",
    "start_cluster",
    "stream_load",
    "stream_one",
    "wait_for_baseline",
]

POD_ROLES = ("prefill", "decode")


@pytest.fixture(scope="session")
def chaos_model(tiny_model):
    return tiny_model("llama")


# ---------------------------------------------------------------------------------------------
# Streaming load


@dataclass
class StreamResult:
    """One streaming request's outcome, as its client saw it."""

    index: int
    status: int | None = None
    """HTTP status, None when the connection itself failed."""
    text: str = ""
    chunks: int = 0
    done: bool = False
    """The stream ended with ``data: [DONE]``."""
    error: dict | None = None
    """An in-stream error event's ``error`` object, or a non-2xx body."""
    exception: str | None = None
    """A transport error (refused, reset, timeout): never acceptable."""
    dropped: bool = False
    """The client closed the stream on purpose (disconnect storms)."""
    headers: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.chunks > 0


def completion_body(model: str, index: int, *, max_tokens: int = 24, words: int = 40) -> dict:
    """A greedy completion of a prompt of its own (long enough to run disaggregated)."""
    prompt = " ".join(f"w{(index * 7919 + i) % 997}" for i in range(words))
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


async def stream_one(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    index: int = 0,
    *,
    drop_after_chunks: int | None = None,
    headers: dict | None = None,
) -> StreamResult:
    """POST a streaming completion and read it to the end (or drop it after some chunks)."""
    result = StreamResult(index)
    try:
        async with client.stream(
            "POST", f"{url}/v1/completions", json=body, headers=headers
        ) as response:
            result.status = response.status_code
            result.headers = dict(response.headers)
            if response.status_code != 200:
                raw = await response.aread()
                try:
                    result.error = json.loads(raw).get("error")
                except (ValueError, AttributeError):
                    result.error = {"raw": raw[:200].decode(errors="replace")}
                return result
            if drop_after_chunks == 0:
                result.dropped = True
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    result.done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = event["error"]
                    continue
                result.chunks += 1
                result.text += "".join(c.get("text", "") for c in event.get("choices", []))
                if drop_after_chunks is not None and result.chunks >= drop_after_chunks:
                    result.dropped = True
                    return result  # leaving the context manager closes the connection
    except httpx.HTTPError as exc:
        result.exception = f"{type(exc).__name__}: {exc}"
    return result


async def stream_load(
    url: str,
    bodies: list[dict],
    *,
    concurrency: int = 16,
    timeout_s: float = 120.0,
    drop_after: list[int | None] | None = None,
) -> list[StreamResult]:
    """Run every body as a streaming completion, ``concurrency`` at a time; ``drop_after[i]``
    chunks read before request i is dropped (None: read to the end)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def one(i: int, body: dict) -> StreamResult:
            async with gate:
                drop = drop_after[i] if drop_after else None
                return await stream_one(client, url, body, i, drop_after_chunks=drop)

        return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


# ---------------------------------------------------------------------------------------------
# Pod baselines


def pods(cluster: LocalCluster, *, alive_only: bool = True) -> list[Service]:
    return [
        s
        for s in cluster.services
        if s.name.split("-")[0] in POD_ROLES and (not alive_only or s.proc.poll() is None)
    ]


def _reading(cluster: LocalCluster) -> dict[str, tuple[int, int, int]]:
    """name -> (free blocks, running + waiting + waiting-for-KV requests, total blocks)."""
    out = {}
    for s in pods(cluster):
        st = pod_stats(s)
        busy = st.num_running + st.num_waiting + st.num_waiting_for_kv
        out[s.name] = (st.num_free_blocks, busy, st.num_total_blocks)
    return out


def pod_baseline(cluster: LocalCluster, timeout_s: float = 20.0) -> dict[str, int]:
    """Every live pod's free KV blocks once it is idle (no request, every block free or merely
    cached: a fresh pod reports 0 of 0 blocks until its engine's first snapshot) and two
    readings 0.3 s apart agree."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        reading = _reading(cluster)
        idle = all(busy == 0 and free == total > 0 for free, busy, total in reading.values())
        if idle and reading == last:
            return {name: free for name, (free, _, _) in reading.items()}
        if time.monotonic() > deadline:
            raise AssertionError(f"pods never settled idle: {reading}")
        last = reading if idle else None
        time.sleep(0.3)


def wait_for_baseline(
    cluster: LocalCluster, baseline: dict[str, int], timeout_s: float = 30.0
) -> dict[str, int]:
    """Poll until every live pod of ``baseline`` is idle with its baseline free blocks again;
    fail naming the pods that are not. Returns the final free blocks."""
    deadline = time.monotonic() + timeout_s
    while True:
        reading = _reading(cluster)
        off = {
            name: {"free": free, "baseline": baseline[name], "busy": busy}
            for name, (free, busy, _) in reading.items()
            if name in baseline and (free != baseline[name] or busy)
        }
        if not off:
            return {name: free for name, (free, _, _) in reading.items()}
        if time.monotonic() > deadline:
            raise AssertionError(f"pods did not return to their baseline free blocks: {off}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Processes


def service_pid(cluster: LocalCluster, name: str) -> int:
    """The pid of a running service's process (its engine core is a child that exits with it)."""
    service = cluster.by_name(name)
    assert service.proc is not None and service.proc.poll() is None, f"{name} is not running"
    return service.proc.pid


def kill9(cluster: LocalCluster, name: str) -> None:
    """``kill -9`` a service and reap it."""
    pid = service_pid(cluster, name)
    os.kill(pid, signal.SIGKILL)
    cluster.by_name(name).proc.wait(10)


def cluster_auth_of(cluster: LocalCluster):
    """The cluster secret ``LocalCluster`` handed its services (else this process's)."""
    from tandem.api import cluster_auth

    secret = getattr(cluster, "cluster_secret", None)
    return cluster_auth.ClusterAuth(secret) if secret else cluster_auth.process_auth()


def pod_channel(cluster: LocalCluster, address: str) -> grpc.Channel:
    """A blocking gRPC channel to a pod or kvstore whose calls carry the cluster's secret."""
    from tandem.api import cluster_auth

    return cluster_auth.channel(address, [], cluster_auth_of(cluster))
