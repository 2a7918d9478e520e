"""The cluster secret on every RPC of every Tandem gRPC service (real sockets): refused without it
or with a wrong one, served with it through both channel kinds; health stays open."""

import asyncio
import importlib
import pkgutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tandem.proto
from tandem.api import cluster_auth
from tandem.api.channel_options import (
    CLIENT_OPTIONS,
    GRPC_MAX_MESSAGE_BYTES,
    KV_MESSAGE_SLACK_BYTES,
    SMALL_MESSAGE_BYTES,
    server_options,
)
from tandem.api.cluster_auth import METADATA_KEY, ClusterAuth
from tandem.serving.grpc_server import GrpcServer

SECRET = "unit-test-secret-0123456789"


def every_rpc():
    """(service full name, method descriptor) of every service the generated stubs define: a new
    service or RPC is covered without touching this test."""
    found = []
    for mod in pkgutil.walk_packages(tandem.proto.__path__, "tandem.proto."):
        if not mod.name.endswith("_pb2"):
            continue
        for service in importlib.import_module(mod.name).DESCRIPTOR.services_by_name.values():
            found += [(service.full_name, m) for m in service.methods]
    return found


RPCS = every_rpc()


def test_every_service_is_enumerated():
    services = {s for s, _ in RPCS}
    assert {
        "tandem.prefill.v1.PrefillService",
        "tandem.decode.v1.DecodeService",
        "tandem.kvstore.v1.KVStoreService",
        "tandem.router.v1.RouterService",
    } <= services
    assert ("tandem.decode.v1.DecodeService", "PushKV") in {(s, m.name) for s, m in RPCS}


def _echo_handlers():
    """Every RPC answered with an empty message (proves the call got past the check)."""

    async def unary(request, context):
        return b""

    async def server_stream(request, context):
        yield b""

    async def client_stream(requests, context):
        async for _ in requests:
            pass
        return b""

    async def bidi(requests, context):
        async for _ in requests:
            yield b""

    by_service: dict[str, dict] = {}
    for service, m in RPCS:
        kind = (m.client_streaming, m.server_streaming)
        handler = {
            (False, False): grpc.unary_unary_rpc_method_handler(unary),
            (False, True): grpc.unary_stream_rpc_method_handler(server_stream),
            (True, False): grpc.stream_unary_rpc_method_handler(client_stream),
            (True, True): grpc.stream_stream_rpc_method_handler(bidi),
        }[kind]
        by_service.setdefault(service, {})[m.name] = handler
    return [grpc.method_handlers_generic_handler(s, h) for s, h in by_service.items()]


async def _call_aio(channel: grpc.aio.Channel, service: str, m, metadata=None) -> grpc.StatusCode:
    path = f"/{service}/{m.name}"
    try:
        if m.client_streaming and m.server_streaming:
            async for _ in channel.stream_stream(path)(iter([b""]), metadata=metadata, timeout=5):
                pass
        elif m.client_streaming:
            await channel.stream_unary(path)(iter([b""]), metadata=metadata, timeout=5)
        elif m.server_streaming:
            async for _ in channel.unary_stream(path)(b"", metadata=metadata, timeout=5):
                pass
        else:
            await channel.unary_unary(path)(b"", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _call_sync(channel: grpc.Channel, service: str, m) -> grpc.StatusCode:
    path = f"/{service}/{m.name}"
    try:
        if m.client_streaming and m.server_streaming:
            list(channel.stream_stream(path)(iter([b""]), timeout=5))
        elif m.client_streaming:
            channel.stream_unary(path)(iter([b""]), timeout=5)
        elif m.server_streaming:
            list(channel.unary_stream(path)(b"", timeout=5))
        else:
            channel.unary_unary(path)(b"", timeout=5)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_every_rpc_needs_the_cluster_secret():
    auth = ClusterAuth(SECRET)

    async def main():
        server = GrpcServer("127.0.0.1", 0, [s for s, _ in RPCS], auth=auth.check)
        server.server.add_generic_rpc_handlers(_echo_handlers())
        await server.start()
        address = f"127.0.0.1:{server.port}"
        try:
            async with grpc.aio.insecure_channel(address) as plain:
                for service, m in RPCS:
                    got = await _call_aio(plain, service, m)
                    assert got == grpc.StatusCode.UNAUTHENTICATED, (service, m.name, got)
                    wrong = ((METADATA_KEY, SECRET + "x"),)
                    got = await _call_aio(plain, service, m, wrong)
                    assert got == grpc.StatusCode.UNAUTHENTICATED, (service, m.name, got)
                # Kubernetes probes carry no credentials: health stays open.
                health = health_pb2_grpc.HealthStub(plain)
                resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            async with cluster_auth.aio_channel(address, [], auth) as authed:
                for service, m in RPCS:
                    got = await _call_aio(authed, service, m)
                    assert got == grpc.StatusCode.OK, (service, m.name, got)
            with cluster_auth.channel(address, [], auth) as authed_sync:
                for service, m in RPCS:
                    got = await asyncio.to_thread(_call_sync, authed_sync, service, m)
                    assert got == grpc.StatusCode.OK, (service, m.name, got)
            with cluster_auth.channel(address, [], ClusterAuth("another-secret-987654321")) as c:
                for service, m in RPCS:
                    got = await asyncio.to_thread(_call_sync, c, service, m)
                    assert got == grpc.StatusCode.UNAUTHENTICATED, (service, m.name, got)
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_an_explicitly_unauthenticated_server_serves_anyone():
    async def main():
        server = GrpcServer("127.0.0.1", 0, [], auth=None)
        server.server.add_generic_rpc_handlers(_echo_handlers())
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as plain:
                service, m = next((s, m) for s, m in RPCS if m.name == "PushKV")
                assert await _call_aio(plain, service, m) == grpc.StatusCode.OK
        finally:
            await server.stop(0)

    asyncio.run(main())


@pytest.fixture
def clean_install(monkeypatch):
    """``install`` changes this process's default and environment: put both back."""
    monkeypatch.setattr(cluster_auth, "_installed", None)
    monkeypatch.setenv(cluster_auth.SECRET_ENV, "restored-after-the-test-000")


def test_install_hands_the_secret_to_child_processes(clean_install):
    import os

    cluster_auth.install(ClusterAuth("installed-secret-0123456"))
    assert os.environ[cluster_auth.SECRET_ENV] == "installed-secret-0123456"
    assert cluster_auth.process_auth().secret == "installed-secret-0123456"
    cluster_auth.install(ClusterAuth(None))
    assert cluster_auth.SECRET_ENV not in os.environ
    assert not cluster_auth.process_auth().enabled


def test_the_routers_grpc_refuses_a_message_over_its_http_body_limit(llama_dir):
    """Before reading it, and before any credentials are checked: an unauthenticated caller
    cannot make the router buffer more than an HTTP body."""
    from services.router.app import create_app
    from services.router.settings import RouterSettings

    settings = RouterSettings(
        model=llama_dir,
        decode=["127.0.0.1:1"],
        api_key=["key-a-0123456789"],
        allow_unauthenticated=True,
        grpc_port=0,
        max_request_body_bytes=1 << 20,
    )
    app = create_app(settings)

    async def main():
        async with app.router.lifespan_context(app):
            address = f"127.0.0.1:{app.state.grpc_port}"
            async with grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
                generate = channel.unary_stream("/tandem.router.v1.RouterService/Generate")

                async def code(payload: bytes) -> grpc.StatusCode:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        async for _ in generate(payload, timeout=10):
                            pass
                    return refused.value.code()

                assert await code(b"\n" + b"\x00" * (2 << 20)) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED
                )
                assert await code(b"") == grpc.StatusCode.UNAUTHENTICATED  # small: checked

    asyncio.run(main())


def test_each_server_accepts_what_its_calls_need():
    from services.decode.settings import DecodeSettings
    from services.prefill.settings import PrefillSettings
    from tandem.serving.pod import max_receive_bytes

    decode = DecodeSettings.model_construct(kv_max_chunk_bytes=40 << 20)
    assert max_receive_bytes(decode) == (40 << 20) + KV_MESSAGE_SLACK_BYTES
    assert max_receive_bytes(PrefillSettings.model_construct()) == SMALL_MESSAGE_BYTES
    options = dict(server_options(3 << 20))
    assert options["grpc.max_receive_message_length"] == 3 << 20
    assert options["grpc.max_send_message_length"] == GRPC_MAX_MESSAGE_BYTES
