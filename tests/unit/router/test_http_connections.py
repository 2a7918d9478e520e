"""The router's HTTP protocol on a real uvicorn server and real sockets: header read timeout,
connection cap, malformed requests, all answered in the OpenAI envelope."""

import contextlib
import json
import socket
import threading
import time

import pytest
import uvicorn

from services.router.http_connections import ConnectionLimits, bounded_http_protocol


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


@contextlib.contextmanager
def serving(limits: ConnectionLimits):
    config = uvicorn.Config(
        hello,
        host="127.0.0.1",
        port=0,
        loop="uvloop",
        http=bounded_http_protocol(limits),
        lifespan="off",
        log_level="warning",
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


REQUEST = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def read_all(sock: socket.socket) -> tuple[bytes, float]:
    """Everything until the server closes, and when it closed (monotonic)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic()


def envelope(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower() and b"connection: close" in head
    return json.loads(body)["error"]


@pytest.fixture(scope="module")
def port():
    with serving(ConnectionLimits(header_read_timeout_s=0.3, max_connections=100)) as p:
        yield p


def test_a_connection_that_sends_nothing_is_closed_silently(port):
    sock = connect(port)
    start = time.monotonic()
    data, closed = read_all(sock)
    assert data == b"" and 0.25 < closed - start < 2


def test_headers_trickling_past_the_timeout_get_408_and_a_close(port):
    socks = [connect(port) for _ in range(20)]
    start = time.monotonic()
    for sock in socks:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")  # never the blank line
    for sock in socks:
        data, closed = read_all(sock)
        assert data.startswith(b"HTTP/1.1 408") and closed - start < 2
        error = envelope(data)
        assert error["code"] == 408 and error["type"] == "RequestTimeoutError"


def test_a_kept_alive_connection_times_out_its_next_requests_headers(port):
    sock = connect(port)
    sock.sendall(REQUEST)
    time.sleep(0.5)  # longer than the header timeout: it counts from the request's first byte
    sock.sendall(b"GET / HTTP/1.1\r\n")
    data, _ = read_all(sock)
    statuses = [line[:3] for line in data.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [b"200", b"408"]


def test_headers_in_pieces_within_the_timeout_are_served(port):
    sock = connect(port)
    for piece in (b"GET / HT", b"TP/1.1\r\nhost: x\r\n", b"\r\n"):
        sock.sendall(piece)
        time.sleep(0.05)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.close()


def test_a_malformed_request_gets_400_in_the_envelope(port):
    sock = connect(port)
    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    data, _ = read_all(sock)
    assert data.startswith(b"HTTP/1.1 400") and envelope(data)["code"] == 400


def test_a_request_beyond_the_connection_cap_gets_503_with_retry_after():
    limits = ConnectionLimits(header_read_timeout_s=5, max_connections=2, retry_after_s=7)
    with serving(limits) as port:
        held = [connect(port) for _ in range(2)]
        time.sleep(0.1)
        extra = connect(port)
        extra.sendall(REQUEST)
        data, _ = read_all(extra)
        assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 7" in data.lower()
        assert envelope(data)["type"] == "ServiceUnavailableError"
        held[0].close()
        time.sleep(0.1)
        again = connect(port)  # a connection freed: served again
        again.sendall(REQUEST)
        assert again.recv(65536).startswith(b"HTTP/1.1 200")
        for sock in (*held, again):
            sock.close()
