"""Authentication end to end (real processes): the cluster secret on every RPC of every service,
API keys at both router front doors and in the SDK, per-key limits, the embedded Redis's
password, and no secret on any command line."""

import importlib
import pkgutil
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tandem.proto
from tandem.api import cluster_auth
from tandem.api.cluster_auth import METADATA_KEY
from tandem.api.errors import Unauthenticated
from tandem.sdk import AsyncClient, Client

from .conftest import start_cluster, wait_idle

pytestmark = pytest.mark.integration


def every_rpc():
    """(service full name, method descriptor) of every service the generated stubs define."""
    found = []
    for mod in pkgutil.walk_packages(tandem.proto.__path__, "tandem.proto."):
        if mod.name.endswith("_pb2"):
            for service in importlib.import_module(mod.name).DESCRIPTOR.services_by_name.values():
                found += [(service.full_name, m) for m in service.methods]
    return found


RPCS = every_rpc()


def _call_sync(channel: grpc.Channel, service: str, m) -> grpc.StatusCode:
    """Call ``m`` with empty message(s), whatever its kind; the status it ended with."""
    path = f"/{service}/{m.name}"
    try:
        if m.client_streaming and m.server_streaming:
            list(channel.stream_stream(path)(iter([b""]), timeout=10))
        elif m.client_streaming:
            channel.stream_unary(path)(iter([b""]), timeout=10)
        elif m.server_streaming:
            list(channel.unary_stream(path)(b"", timeout=10))
        else:
            channel.unary_unary(path)(b"", timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


KEY_A, KEY_B = "e2e-key-a-0123456789", "e2e-key-b-0123456789"
MAX_TOKENS_PER_KEY = 1900


@pytest.fixture(scope="module")
def secured(e2e_model):
    """1 prefill + 1 decode pod, kvstore over a password-protected Redis, a router with two API
    keys, one request in flight and 1900 reserved tokens per key."""
    c = start_cluster(
        e2e_model,
        prefill=1,
        decode=1,
        api_key=[KEY_A, KEY_B],
        router_args=[
            "--max-requests-per-key",
            "1",
            "--max-reserved-tokens-per-key",
            str(MAX_TOKENS_PER_KEY),
        ],
    )
    yield c
    c.stop()


def _address(cluster, service: str) -> str:
    return {
        "tandem.prefill.v1.PrefillService": cluster.by_name("prefill-0").address,
        "tandem.decode.v1.DecodeService": cluster.by_name("decode-0").address,
        "tandem.kvstore.v1.KVStoreService": cluster.by_name("kvstore").address,
        "tandem.router.v1.RouterService": cluster.router_grpc,
    }[service]  # a new service must be added here (and be protected)


def _call_with(address: str, service: str, m, metadata) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        if metadata:
            channel = grpc.intercept_channel(channel, cluster_auth._SyncInterceptor(metadata))
        return _call_sync(channel, service, m)


def test_every_rpc_of_every_service_needs_credentials(secured):
    for service, m in RPCS:
        address = _address(secured, service)
        wrong = (
            (("authorization", f"Bearer {KEY_A}-wrong"),)
            if service.startswith("tandem.router.")
            else ((METADATA_KEY, secured.cluster_secret + "-wrong"),)
        )
        for metadata in ((), wrong):
            got = _call_with(address, service, m, metadata)
            assert got == grpc.StatusCode.UNAUTHENTICATED, (service, m.name, metadata, got)
    # Probes carry no credentials: the standard health service answers everyone.
    for name in ("prefill-0", "decode-0", "kvstore"):
        with grpc.insecure_channel(secured.by_name(name).address) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    wait_idle(secured)  # with the secret, GetStats answers (and nothing was admitted)


def test_http_needs_a_key_except_health_and_metrics(secured):
    url = secured.router_url
    body = {"model": secured.model.name, "prompt": "auth test", "max_tokens": 4}
    for headers in ({}, {"Authorization": f"Bearer {KEY_A}x"}, {"Authorization": KEY_A}):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "AuthenticationError"
    for key in (KEY_A, KEY_B):
        r = httpx.post(
            f"{url}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    metrics = httpx.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200 and 'status="401"' in metrics.text


def test_sdk_with_and_without_a_key(secured, monkeypatch):
    monkeypatch.delenv("TANDEM_API_KEY", raising=False)
    with Client(secured.router_grpc, api_key=KEY_A, timeout=60) as client:
        assert len(client.generate("sdk auth", max_tokens=3).token_ids) == 3
        assert client.models()[0].id == secured.model.name
    with Client(secured.router_grpc, timeout=60) as client:
        with pytest.raises(Unauthenticated, match="no API key was sent.*TANDEM_API_KEY"):
            client.generate("sdk auth", max_tokens=3)
    with Client(secured.router_grpc, api_key="wrong-key-0123456", timeout=60) as client:
        with pytest.raises(Unauthenticated, match="the API key was refused"):
            client.models()
    monkeypatch.setenv("TANDEM_API_KEY", KEY_B)

    async def from_env():
        async with AsyncClient(secured.router_grpc, timeout=60) as client:
            return await client.generate("sdk auth", max_tokens=2)

    import asyncio

    assert len(asyncio.run(from_env()).token_ids) == 2


def test_per_key_limits(secured):
    url = secured.router_url
    a = {"Authorization": f"Bearer {KEY_A}"}
    b = {"Authorization": f"Bearer {KEY_B}"}
    body = {"model": secured.model.name, "prompt": "limits", "max_tokens": 4}
    # Over the reserved tokens of a key (prompt + max_tokens > 1900): 429 at once.
    r = httpx.post(
        f"{url}/v1/completions", json={**body, "max_tokens": 1950}, headers=a, timeout=30
    )
    assert r.status_code == 429 and r.headers["retry-after"], r.text
    assert "reserved" in r.json()["error"]["message"]
    # One request in flight per key: a second one of the same key waits its turn (429), another
    # key's does not.
    stream = {**body, "max_tokens": 1800, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json=stream, headers=a) as open_stream:
            assert open_stream.status_code == 200
            lines = open_stream.iter_lines()
            first = next(lines)
            assert first.startswith("data: {"), first  # the stream is under way
            r = http.post(f"{url}/v1/completions", json=body, headers=a)
            if r.status_code != 429:  # say why the stream was over already
                rest = "\n".join(lines)
                pytest.fail(f"{r.status_code} {r.text}; the stream: {first}\n{rest[-2000:]}")
            assert r.headers["retry-after"], r.text
            assert "in flight" in r.json()["error"]["message"]
            assert http.post(f"{url}/v1/completions", json=body, headers=b).status_code == 200
    # The stream's client left: once the router has cancelled it, the key's share is back.
    deadline = time.monotonic() + 20
    while True:
        r = httpx.post(f"{url}/v1/completions", json=body, headers=a, timeout=60)
        if r.status_code != 429:
            break
        assert time.monotonic() < deadline, "the key's share was not given back"
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    wait_idle(secured)


def test_redis_needs_its_password_and_no_secret_is_on_a_command_line(secured):
    import redis

    assert secured.redis is not None and secured.redis.password
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(secured.redis.url).ping()
    assert redis.Redis.from_url(secured.redis.url, password=secured.redis.password).ping()
    secrets = (secured.cluster_secret, secured.redis.password, KEY_A, KEY_B)
    for proc in [s.proc for s in secured.services] + [secured.redis.proc]:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            cmdline = f.read().decode()
        assert not any(s in cmdline for s in secrets), proc.args
    assert not any(s in line for line in secured.log for s in secrets)


def _forge_kv(decode_address: str, prompt: list[int], metadata) -> tuple[grpc.StatusCode, ...]:
    """The issue's cache-poisoning attack: reserve the prompt's blocks in REMOTE mode, then push
    random pages for it (and close the transfer with a made-up first token) under a guessed
    transfer token. The status each of the two calls ended with."""
    from tandem.proto.common.v1 import common_pb2
    from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc

    rid = f"forged-{time.monotonic_ns()}"
    codes = []
    with grpc.insecure_channel(decode_address) as channel:
        if metadata:
            channel = grpc.intercept_channel(channel, cluster_auth._SyncInterceptor(metadata))
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        generate = stub.Generate(
            decode_pb2.GenerateRequest(
                request_id=rid,
                prompt_token_ids=prompt,
                sampling_params=common_pb2.SamplingParams(max_tokens=4),
                prefill_mode=decode_pb2.PREFILL_MODE_REMOTE,
            ),
            timeout=10,
        )
        try:
            next(generate)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
        chunk = common_pb2.KVChunk(
            request_id=rid, layer_start=0, layer_end=1, block_start=0, block_end=1,
            data=bytes(range(256)) * 64, transfer_token="1.guessed",
        )  # fmt: skip
        end = common_pb2.KVTransferEnd(request_id=rid, first_token_id=1)
        try:
            stub.PushKV(
                iter([decode_pb2.PushKVRequest(chunk=chunk), decode_pb2.PushKVRequest(end=end)]),
                timeout=10,
            )
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
        generate.cancel()
    return tuple(codes)


def test_forged_kv_cannot_poison_another_clients_output(secured):
    """The issue's demonstration: a forged Generate(REMOTE) + PushKV for a 96-token prompt
    changed the next ordinary request's text. Without the cluster secret both calls are refused
    before anything is reserved or written, and the same prompt gives the same greedy text."""
    prompt = [(7 * i + 3) % 200 + 10 for i in range(96)]
    headers = {"authorization": f"Bearer {KEY_A}"}
    body = {"model": secured.model.name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    url = f"{secured.router_url}/v1/completions"
    before = httpx.post(url, json=body, headers=headers, timeout=60)
    assert before.status_code == 200, before.text
    decode = secured.by_name("decode-0").address
    for metadata in ((), ((METADATA_KEY, secured.cluster_secret + "-wrong"),)):
        codes = _forge_kv(decode, prompt, metadata)
        assert codes == (grpc.StatusCode.UNAUTHENTICATED,) * 2, codes
    # A caller with the secret but not the reservation's transfer token writes nothing either.
    codes = _forge_kv(decode, prompt, ((METADATA_KEY, secured.cluster_secret),))
    assert codes == (grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED), codes
    wait_idle(secured)  # the forger's reservation is gone
    after = httpx.post(url, json=body, headers=headers, timeout=60)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
