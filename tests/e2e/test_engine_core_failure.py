"""A decode pod whose engine core process dies under load: every stream in flight ends with a
clear error (503 in the OpenAI envelope), the pod reports it and exits so that it is restarted,
and no process is left behind."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import start_cluster

pytestmark = pytest.mark.integration


def engine_core_pid(pod_pid: int) -> int:
    """The pod's engine core: its child started by multiprocessing's spawn."""
    children = Path(f"/proc/{pod_pid}/task/{pod_pid}/children").read_text().split()
    for child in children:
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            return int(child)
    raise AssertionError(f"pod {pod_pid} has no engine core child (children: {children})")


def gone_or_reaped(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" not in status


def stream(url: str, prompt: str, started: threading.Event, out: list) -> None:
    body = {"prompt": prompt, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line.removeprefix("data: "))
                started.set()


def test_killing_a_decode_core_ends_its_streams_with_503_and_the_pod_exits(e2e_model):
    cluster = start_cluster(e2e_model, prefill=1, decode=1)
    try:
        decode = cluster.pods("decode")[0]
        core = engine_core_pid(decode.proc.pid)
        runs = []
        for i in range(4):
            started, out = threading.Event(), []
            t = threading.Thread(
                target=stream, args=(cluster.router_url, f"prompt {i} " * 8, started, out)
            )
            t.start()
            runs.append((t, started, out))
        for _, started, _ in runs:
            assert started.wait(60), "a stream never started"
        os.kill(core, signal.SIGKILL)
        for t, _, _ in runs:
            t.join(60)
            assert not t.is_alive(), "a stream hung after its engine core died"
        cut = 0
        for _, _, out in runs:
            assert out[0] == 200 and out[-1] == "[DONE]"
            last = json.loads(out[-2])
            if "error" not in last:  # it had finished before the kill (a busy CI machine)
                assert any('"finish_reason":"length"' in line for line in out[1:]), out[-3:]
                continue
            cut += 1
            error = last["error"]
            assert error["code"] == 503 and "engine core process exited" in error["message"]
        assert cut >= 1, "every stream finished before the engine core was killed"
        assert decode.proc.wait(30) == 1  # the pod exits, to be restarted
        deadline = time.monotonic() + 10
        while not gone_or_reaped(core) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone_or_reaped(core)
    finally:
        cluster.stop()
