"""The SDK's retry rule and deadline, against a scripted RouterService on a real gRPC socket.

UNAVAILABLE is retried only before the first chunk (after it the caller already holds tokens a
retry would repeat); ``timeout`` bounds the whole call, retries and backoff included.
"""

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest

from tandem.api.errors import DeadlineExceeded, InvalidRequest, UpstreamUnavailable
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.sdk import AsyncClient, Client


def chunk(token: int, last: bool = False) -> router_pb2.GenerateResponse:
    resp = router_pb2.GenerateResponse(
        request_id="r", chunk=common_pb2.TokenChunk(token_ids=[token], text=f"<{token}>")
    )
    if last:
        resp.chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
        resp.usage.prompt_tokens, resp.usage.completion_tokens = 1, 2
    return resp


class ScriptedRouter(router_pb2_grpc.RouterServiceServicer):
    """Each Generate call plays the next script: "unavailable", "one-then-unavailable",
    "slow-unavailable" (0.3 s, then UNAVAILABLE) or "ok" (two chunks)."""

    def __init__(self, scripts: list[str]) -> None:
        self.scripts = scripts
        self.calls = 0
        self.lock = threading.Lock()

    def Generate(self, request, context):
        with self.lock:
            script = self.scripts[min(self.calls, len(self.scripts) - 1)]
            self.calls += 1
        if script == "slow-unavailable":
            time.sleep(0.3)
        if script == "one-then-unavailable":
            yield chunk(7)
        if script != "ok":
            context.abort(grpc.StatusCode.UNAVAILABLE, "pod went away")
        yield chunk(7)
        yield chunk(8, last=True)


@pytest.fixture
def router():
    servers = []

    def start(scripts: list[str]) -> tuple[ScriptedRouter, str]:
        servicer = ScriptedRouter(scripts)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def test_unavailable_before_the_first_chunk_is_retried(router):
    servicer, target = router(["unavailable", "unavailable", "ok"])
    with Client(target, timeout=10) as client:
        result = client.generate([1], max_tokens=2)
    assert list(result.token_ids) == [7, 8] and result.finish_reason == "length"
    assert servicer.calls == 3


def test_async_client_retries_the_same_way(router):
    servicer, target = router(["unavailable", "ok"])

    async def main():
        async with AsyncClient(target, timeout=10) as client:
            return await client.generate([1], max_tokens=2)

    assert list(asyncio.run(main()).token_ids) == [7, 8]
    assert servicer.calls == 2


def test_unavailable_after_the_first_chunk_is_not_retried(router):
    servicer, target = router(["one-then-unavailable", "ok"])
    with Client(target, timeout=10) as client:
        stream = client.stream([1], max_tokens=2)
        assert list(next(stream).token_ids) == [7]
        with pytest.raises(UpstreamUnavailable, match="pod went away"):
            next(stream)
    assert servicer.calls == 1


def test_retries_give_up_after_max_retries(router):
    servicer, target = router(["unavailable"])
    with Client(target, timeout=10, max_retries=2) as client, pytest.raises(UpstreamUnavailable):
        client.generate([1], max_tokens=2)
    assert servicer.calls == 3


def test_timeout_bounds_the_whole_call_retries_included(router):
    servicer, target = router(["slow-unavailable"])
    start = time.monotonic()
    with Client(target, timeout=3.0, max_retries=50) as client:
        with pytest.raises((DeadlineExceeded, UpstreamUnavailable)):
            client.generate([1], max_tokens=2)
    elapsed = time.monotonic() - start
    # Per-attempt deadlines would allow 51 attempts of 0.3 s and backoff (over a minute); one
    # overall deadline ends the call at ~3 s.
    assert elapsed < 5.0 and 2 <= servicer.calls <= 10, (elapsed, servicer.calls)


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_a_timeout_that_leaves_no_time_is_refused(router, timeout):
    servicer, target = router(["ok"])
    with Client(target) as client, pytest.raises(InvalidRequest, match="timeout"):
        client.generate([1], max_tokens=2, timeout=timeout)
    assert servicer.calls == 0
