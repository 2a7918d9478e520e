"""Hostile input against a real router process: what it may cost in time and memory, and that
every refusal comes in the OpenAI envelope (services/router/input_limits.py,
http_connections.py).

The router's pods never start: everything here is refused before any pod would be asked.
"""

import concurrent.futures
import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import psutil
import pytest

from services.local_cluster import free_port
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
"""The router's header and body read timeouts here."""

TEN_MB = 10_000_000


@pytest.fixture(scope="module")
def router(e2e_model):
    """(HTTP base URL, gRPC address, the router's process)."""
    http_port, grpc_port = free_port(), free_port()
    nowhere = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "router",
            "--model",
            str(e2e_model),
            "--host",
            "127.0.0.1",
            "--port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--prefill",
            json.dumps(nowhere[:1]),
            "--decode",
            json.dumps(nowhere[1:]),
            "--allow-unauthenticated",
            "--enable-tokenizer-info-endpoint",
            "--header-read-timeout-s",
            str(TIMEOUT_S),
            "--body-read-timeout-s",
            str(TIMEOUT_S),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.stdout.read() if proc.poll() is not None else "slow"
        )
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield url, f"127.0.0.1:{grpc_port}", psutil.Process(proc.pid)
    proc.terminate()
    proc.wait(30)


def assert_envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def huge_bodies() -> list[tuple[str, bytes]]:
    prompt = "word " * (TEN_MB // 5)
    return [
        ("/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 1}).encode()),
        (
            "/v1/chat/completions",
            json.dumps({"messages": [{"role": "user", "content": prompt}]}).encode(),
        ),
    ]


def send_raw(sock: socket.socket, path: str, body: bytes, barrier) -> bytes:
    """POST ``body`` as a client does (headers and the body's first 64 KiB), read the answer,
    and only then offer the rest: the answer's first bytes.

    An answer read here was sent before the body was: the router refused from the headers. A
    router that waited for the body would answer 408 after its body timeout instead.
    """
    head = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    barrier.wait()
    sock.sendall(head + body[:65536])
    answer = sock.recv(65536)
    with contextlib.suppress(OSError):  # the router closed the connection: the rest is refused
        sock.sendall(body[65536:])
    sock.close()
    return answer


def test_a_10mb_prompt_is_refused_from_its_headers_and_costs_no_memory(router):
    url, _, process = router
    rss_before = process.memory_info().rss
    for path, body in huge_bodies():
        response = httpx.post(
            url + path, content=body, headers={"content-type": "application/json"}, timeout=30
        )
        assert assert_envelope(response, 413)["type"] == "RequestTooLargeError"
    # One, then four at once, twice over, on raw sockets that send the body only after the
    # answer came: a 413 (not the 408 of a body that never came) shows the refusal needed no body.
    port = int(url.rsplit(":", 1)[1])
    for path, body in huge_bodies():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = send_raw(sock, path, body, threading.Barrier(1))
        assert head.startswith(b"HTTP/1.1 413"), head
    for _ in range(2):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        barrier = threading.Barrier(4)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            runs = [
                pool.submit(send_raw, sock, path, body, barrier)
                for sock, (path, body) in zip(socks, huge_bodies() * 2, strict=True)
            ]
            for run in runs:
                head = run.result()
                assert head.startswith(b"HTTP/1.1 413"), head
    growth = process.memory_info().rss - rss_before
    assert growth < 50 << 20, f"router RSS grew {growth >> 20} MB"


def test_a_10mb_prompt_without_a_length_is_refused_when_it_passes_the_limit(router):
    url, _, process = router
    rss_before = process.memory_info().rss

    def chunks():
        for _ in range(TEN_MB // 65536):
            yield b" " * 65536

    response = httpx.post(
        url + "/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert_envelope(response, 413)
    assert process.memory_info().rss - rss_before < 50 << 20


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", rb'{"prompt": "a\ud800b", "max_tokens": 1}'),
        ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\udc00"}]}'),
        ("/v1/completions", b'{"prompt": "a\xffb", "max_tokens": 1}'),
    ],
    ids=["completion-surrogate", "chat-surrogate", "invalid-utf8"],
)
def test_lone_surrogates_and_invalid_utf8_are_a_400_on_a_kept_alive_connection(router, path, body):
    url, _, _ = router
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    for _ in range(2):  # the same connection serves the next request
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 400 and error["type"] == "BadRequestError"
        assert response.getheader("connection") != "close"
    sock = conn.sock
    conn.request("GET", "/v1/models")
    assert conn.getresponse().status == 200 and conn.sock is sock
    conn.close()


def test_unknown_routes_and_wrong_methods_answer_in_the_envelope(router):
    url, _, _ = router
    assert_envelope(httpx.get(url + "/v1/nothing"), 404)
    assert assert_envelope(httpx.get(url + "/v1/completions"), 405)["type"] == (
        "MethodNotAllowedError"
    )


def test_trickling_connections_are_closed_after_the_header_timeout(router):
    url, _, _ = router
    port = int(url.rsplit(":", 1)[1])
    # A router that never closed them would fail this on the sockets' 10 s timeout.
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
    for i, sock in enumerate(socks):
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" if i % 2 else b"P")
    for sock in socks:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 408") and b'"RequestTimeoutError"' in data
        sock.close()


def test_a_body_shorter_than_its_length_gets_408_after_the_body_timeout(router):
    url, _, _ = router
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    start = time.monotonic()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 100\r\n\r\n{"prompt": '
    )
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 408") and b"connection: close" in data
    assert TIMEOUT_S - 0.1 < time.monotonic() - start  # the router waited its body timeout


def test_grpc_refuses_what_http_refuses(router):
    _, address, _ = router
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for request, code, detail in [
            # Over the router's gRPC message limit (the HTTP body limit, 2 MiB): never parsed.
            (
                router_pb2.GenerateRequest(text="word " * 600_000),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "",
            ),
            # Under it, but more text than the context could ever hold: refused on its count of
            # characters, untokenized.
            (
                router_pb2.GenerateRequest(text="word " * 400_000),
                grpc.StatusCode.OUT_OF_RANGE,
                "the prompt has 2000000 characters",
            ),
            (
                router_pb2.GenerateRequest(text="hi", request_id="x" * 1000),
                grpc.StatusCode.INVALID_ARGUMENT,
                "request_id must be",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(request, timeout=30))
            assert refused.value.code() == code, refused.value.details()
            assert detail in refused.value.details()


def test_tokenizer_info_gives_what_a_remote_tokenizer_reads(router, e2e_model):
    """lm-eval's remote tokenizer reads the special tokens and the chat template here (the
    router above runs with --enable-tokenizer-info-endpoint; off, the route is a 404 envelope:
    tests/e2e/test_utility_routes.py)."""
    from transformers import AutoTokenizer

    url, _, _ = router
    hf = AutoTokenizer.from_pretrained(str(e2e_model), local_files_only=True)
    info = httpx.get(url + "/tokenizer_info", timeout=10).json()
    assert (info["eos_token"], info["bos_token"], info["pad_token"]) == (
        hf.eos_token,
        hf.bos_token,
        hf.pad_token,
    )
    assert info["chat_template"] == hf.chat_template and info["chat_template"]
    assert info["tokenizer_class"] == type(hf).__name__
