"""A router whose pods are all unreachable answers 503 (HTTP) / UNAVAILABLE (gRPC), and keeps
serving."""

import json
import subprocess
import sys
import time

import httpx
import pytest

from services.local_cluster import free_port
from tandem.api.errors import UpstreamUnavailable
from tandem.sdk import Client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lonely_router(e2e_model):
    """A real router process pointed at pods that never start."""
    http, grpc_port = free_port(), free_port()
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
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--prefill",
            json.dumps(nowhere[:1]),
            "--decode",
            json.dumps(nowhere[1:]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{http}"
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
    yield url, f"127.0.0.1:{grpc_port}"
    proc.terminate()
    proc.wait(30)


def test_no_ready_pod_is_a_503_with_the_openai_envelope(lonely_router):
    url, _ = lonely_router
    for _ in range(2):  # and the router is still there to answer the second time
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "llama", "prompt": "hi", "max_tokens": 2},
            timeout=30,
        )
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == 503 and error["type"] and "pod" in error["message"]
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=30,
            json={
                "model": "llama",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                "stream": True,
            },
        )
        assert chat.status_code == 503, chat.text


def test_no_ready_pod_is_unavailable_over_grpc(lonely_router):
    _, target = lonely_router
    with Client(target, timeout=10, max_retries=1) as client, pytest.raises(UpstreamUnavailable):
        client.generate("hi", max_tokens=2)
