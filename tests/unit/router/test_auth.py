"""API keys and per-key limits at the router's HTTP front door (the real app, in process)."""

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from services.router.app import create_app
from services.router.auth import (
    ApiKeyAuth,
    ApiKeyConfigError,
    ApiKeys,
    KeyLimits,
    load_api_keys,
)
from services.router.http_connections import ConnectionLimits, bounded_http_protocol
from services.router.input_limits import BodyLimits, InputLimitsMiddleware
from services.router.settings import RouterSettings

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


def _assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    error = r.json()["error"]
    assert error["type"] == "AuthenticationError" and error["code"] == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert KEY_A not in r.text


def test_keys_guard_every_route_but_health_and_metrics(llama_dir, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# one per line\n{KEY_B}\n\n")
    app = create_app(
        RouterSettings(
            model=llama_dir,
            api_key=[KEY_A],
            api_key_file=key_file,
            max_reserved_tokens_per_key=64,
        )
    )

    async def main():
        async with _client(app) as c:
            body = {"model": llama_dir.name, "prompt": "hello", "max_tokens": 4}
            for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models")):
                _assert_401(await c.request(method, path, json=body))
                _assert_401(
                    await c.request(method, path, json=body, headers={"Authorization": "x"})
                )
                _assert_401(
                    await c.request(
                        method, path, json=body, headers={"Authorization": f"Bearer {KEY_A}x"}
                    )
                )
            _assert_401(await c.get("/no-such-route"))  # no probing of routes without a key
            _assert_401(await c.get("/openapi.json"))
            for key in (KEY_A, KEY_B):
                r = await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, r.text
            # No pods: past the key check, the request meets "no decode pod" (not 401).
            r = await c.post(
                "/v1/completions", json=body, headers={"Authorization": f"bearer {KEY_A}"}
            )
            assert r.status_code == 503, r.text
            # Over the key's reserved tokens (prompt + max_tokens > 64): 429 with Retry-After.
            r = await c.post(
                "/v1/completions",
                json={**body, "max_tokens": 100},
                headers={"Authorization": f"Bearer {KEY_A}"},
            )
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["type"] == "RateLimitError"
            # Probes and Prometheus need no key.
            assert (await c.get("/metrics")).status_code == 200
            assert (await c.get("/health")).status_code == 503  # open: no pods, not 401

    asyncio.run(main())


def test_without_keys_nothing_is_asked(llama_dir):
    app = create_app(RouterSettings(model=llama_dir))

    async def main():
        async with _client(app) as c:
            assert (await c.get("/v1/models")).status_code == 200

    asyncio.run(main())


def test_concurrent_requests_per_key_are_bounded_and_released():
    """The third concurrent request of a key gets 429; another key is not affected; shares come
    back when responses end (the table then forgets the key)."""
    gate = asyncio.Event()
    inner = FastAPI()

    @inner.get("/v1/slow")
    async def slow():
        await gate.wait()
        return {"ok": True}

    limits = KeyLimits(max_requests=2, max_tokens=None)
    app = ApiKeyAuth(inner, ApiKeys((KEY_A, KEY_B)), limits, retry_after_s=3)

    async def main():
        async with _client(app) as c:
            a = {"Authorization": f"Bearer {KEY_A}"}
            held = [asyncio.create_task(c.get("/v1/slow", headers=a)) for _ in range(2)]
            while limits.usage(KEY_A)[0] < 2:
                await asyncio.sleep(0.01)
            r = await c.get("/v1/slow", headers=a)
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
            assert "in flight" in r.json()["error"]["message"]
            other = asyncio.create_task(
                c.get("/v1/slow", headers={"Authorization": f"Bearer {KEY_B}"})
            )
            while limits.usage(KEY_B)[0] < 1:
                await asyncio.sleep(0.01)
            gate.set()
            assert [t.status_code for t in await asyncio.gather(*held, other)] == [200] * 3
        assert limits.usage(KEY_A) == (0, 0) and not limits._usage

    asyncio.run(main())


def test_key_files_and_settings_are_checked_at_start(tmp_path, llama_dir):
    assert load_api_keys(["a" * 8, " ", "a" * 8], None) == ["a" * 8]
    with pytest.raises(ValueError, match="at least 8"):
        load_api_keys(["short"], None)
    with pytest.raises(ValueError, match="at least 8"):
        RouterSettings(model=llama_dir, api_key=["short"])
    with pytest.raises(ApiKeyConfigError, match="cannot read"):
        create_app(RouterSettings(model=llama_dir, api_key_file=tmp_path / "absent"))
    with pytest.raises(ValueError, match="go together"):
        RouterSettings(model=llama_dir, tls_certfile=tmp_path / "cert.pem")
    assert KEY_A not in repr(RouterSettings(model=llama_dir, api_key=[KEY_A]))


def test_api_keys_from_the_environment(monkeypatch, llama_dir):
    monkeypatch.setenv("TANDEM_ROUTER_API_KEY", f"{KEY_A},{KEY_B}")
    assert RouterSettings(model=llama_dir).api_key == [KEY_A, KEY_B]


@contextlib.contextmanager
def _uvicorn(app):
    """``app`` on a real uvicorn server with the router's HTTP protocol; yields its port."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=bounded_http_protocol(ConnectionLimits(header_read_timeout_s=2, max_connections=9)),
        lifespan="off",
        log_level="warning",
        timeout_keep_alive=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


async def _echo(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("refusal", ["401", "429"])
def test_refusals_close_the_connection_of_an_unread_body(refusal):
    """A client that declares a huge body and trickles it cannot keep the connection after its
    401 / 429: the answer says ``Connection: close`` and the server closes it (uvicorn's
    keep-alive timer alone would be cancelled by each byte that arrives)."""
    keys = ApiKeys((KEY_A,))
    limits = KeyLimits(max_requests=0 if refusal == "429" else None, max_tokens=None)
    app = ApiKeyAuth(InputLimitsMiddleware(_echo, limits=BodyLimits(1 << 20, 2.0)), keys, limits, 4)
    auth = f"authorization: Bearer {KEY_A}\r\n".encode() if refusal == "429" else b""
    with _uvicorn(app) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100000000\r\n" + auth + b"\r\n{"
        )
        head = sock.recv(65536).lower()
        assert head.startswith(f"http/1.1 {refusal}".encode()), head
        assert b"connection: close" in head
        assert (b"www-authenticate: bearer" if refusal == "401" else b"retry-after: 4") in head
        start = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(30):  # trickle on; the server must have closed within a second
                sock.sendall(b" ")
                if sock.recv(65536) == b"":
                    break
        assert time.monotonic() - start < 2
        sock.close()


def test_websockets_are_refused_when_keys_are_set():
    sent = []

    async def send(message):
        sent.append(message)

    async def never(scope, receive, send):
        raise AssertionError("reached the app")

    async def receive():
        return {"type": "websocket.connect"}

    app = ApiKeyAuth(never, ApiKeys((KEY_A,)), KeyLimits(None, None))
    scope = {"type": "websocket", "path": "/v1/completions", "headers": []}
    asyncio.run(app(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]
