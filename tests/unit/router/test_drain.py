"""The router's SIGTERM drain: new requests get 503 in the envelope while those in flight run on.

The whole path (a real router process, SIGTERM, streams open) is tests/chaos/test_faults.py's
``test_router_sigterm_drains_streams_and_answers_503``; these pin the parts.
"""

import asyncio
import signal
import time

import grpc
import httpx
import pytest
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.router.app import create_app
from services.router.drain import DrainGate, DrainingServer
from services.router.settings import RouterSettings
from tandem.serving.grpc_server import GrpcServer


class SlowApp:
    """An ASGI app whose requests last until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_gate_counts_requests_in_flight_and_refuses_new_ones_while_draining():
    async def main():
        app = SlowApp()
        gate = DrainGate(app, retry_after_s=7)
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            in_flight = asyncio.ensure_future(client.get("/v1/models"))
            while gate.in_flight == 0:
                await asyncio.sleep(0.01)
            gate.draining = True
            refused = await client.post("/v1/completions", json={"prompt": "x"})
            health = await client.get("/health")
            assert gate.in_flight == 1 and app.calls == 1  # the refused never reached the app
            app.release.set()
            assert (await in_flight).status_code == 200
        assert gate.in_flight == 0 and gate.refused == 2
        for resp in (refused, health):
            assert resp.status_code == 503
            assert resp.headers["retry-after"] == "7"
            assert resp.headers["connection"] == "close"
            err = resp.json()["error"]
            assert err["code"] == 503 and err["type"] == "ServiceUnavailableError"
            assert "shutting down" in err["message"]

    asyncio.run(main())


def test_the_routers_drain_503s_carry_the_request_id_and_are_counted(llama_dir):
    """In the router's app the gate sits inside RequestIdAndMetrics: a drain 503 echoes (or
    assigns) x-request-id and shows in tandem_router_requests like any other answer."""
    app = create_app(RouterSettings(model=llama_dir, api_key=["key-a-0123456789"]))
    gate, metrics = app.state.drain_gate, app.state.metrics

    def refused_503s() -> float:
        value = metrics.registry.get_sample_value(
            "tandem_router_requests_total", {"route": "unmatched", "status": "503"}
        )
        return value or 0.0

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            assert (await client.get("/metrics")).status_code == 200  # builds the stack
            gate.draining = True
            mine = await client.post(
                "/v1/completions", json={"prompt": "x"}, headers={"x-request-id": "req-42"}
            )
            theirs = await client.get("/health")
        # Refused before the key check and before any route: nothing else ran.
        for resp in (mine, theirs):
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["type"] == "ServiceUnavailableError"
        assert mine.headers["x-request-id"] == "req-42"
        assert len(theirs.headers["x-request-id"]) == 32  # assigned (uuid4 hex)
        assert gate.refused == 2 and gate.in_flight == 0
        assert refused_503s() == 2

    assert refused_503s() == 0
    asyncio.run(main())


def _server(grace_s: float) -> DrainingServer:
    gate = DrainGate(SlowApp())
    config = uvicorn.Config(gate, log_level="warning")
    config.load()
    return DrainingServer(config, gate, grace_s)


def test_first_sigterm_drains_a_second_one_or_sigint_stops_at_once():
    server = _server(30)
    server.handle_exit(signal.SIGTERM, None)
    assert server.gate.draining and not server.should_exit
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit

    server = _server(30)
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and not server.gate.draining

    server = _server(0)  # no grace: uvicorn's own shutdown at once
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and not server.gate.draining


def test_drain_ends_when_nothing_is_in_flight_or_the_grace_is_over():
    async def main():
        server = _server(30)
        server.gate.in_flight = 1
        server.handle_exit(signal.SIGTERM, None)
        await server.on_tick(1)
        assert not server.should_exit  # a request still runs, grace left
        server.gate.in_flight = 0
        await server.on_tick(2)
        assert server.should_exit
        assert signal.SIGTERM in server._captured_signals  # re-raised after shutdown, as uvicorn

        server = _server(0.05)
        server.gate.in_flight = 3
        server.handle_exit(signal.SIGTERM, None)
        time.sleep(0.06)
        await server.on_tick(1)
        assert server.should_exit  # out of grace with requests still running
        assert server.config.timeout_graceful_shutdown == 1.0

    asyncio.run(main())


def test_sigterm_drains_the_grpc_server_too():
    """The first SIGTERM also turns the gRPC health NOT_SERVING and refuses new calls with
    UNAVAILABLE (the SDK retries those elsewhere), while a call in flight streams to its end."""

    async def main():
        release = asyncio.Event()

        async def stream(request, context):
            yield b"first"
            await release.wait()
            yield b"last"

        grpc_server = GrpcServer("127.0.0.1", 0, ["t.S"])
        grpc_server.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "t.S", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
                )
            ]
        )
        await grpc_server.start()
        gate = DrainGate(SlowApp())
        config = uvicorn.Config(gate, log_level="warning")
        config.load()

        async def drain_grpc():
            grpc_server.begin_stop(30)

        server = DrainingServer(config, gate, 30, on_drain=drain_grpc)
        address = f"127.0.0.1:{grpc_server.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_stream("/t.S/Stream")(b"", timeout=10)
            assert await call.read() == b"first"
            health = health_pb2_grpc.HealthStub(channel)
            server.handle_exit(signal.SIGTERM, None)
            await server.on_tick(1)
            await asyncio.sleep(0.2)
            try:
                status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in channel.unary_stream("/t.S/Stream")(b"", timeout=5):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            release.set()
            assert await call.read() == b"last"  # the call in flight finished
            assert await call.code() == grpc.StatusCode.OK
        await grpc_server.stop(30)  # the lifespan's stop waits for the one the drain began

    asyncio.run(main())
