"""The README's run command: `tandem up` starts everything, serves, and stops cleanly."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from services.local_cluster import grpc_healthy
from tandem.sdk import Client

pytestmark = pytest.mark.integration

READY = re.compile(r"tandem ready: (http://\S+)\n")
"""The one line `tandem up` prints once every service is healthy (exactly this, for scripts)."""


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline and int(proc.name) != os.getpid():
                found.append(int(proc.name))
    return found


def test_tandem_up_serves_the_openai_api_and_stops_on_ctrl_c(e2e_model):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--model",
            str(e2e_model),
            "--port",
            "0",
            "--decode",
            "2",
            "--num-kv-blocks",
            "64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        url = wait_ready_line(proc, lines, 180)
        assert (
            len(processes_mentioning(str(e2e_model))) >= 4
        )  # tandem up + prefill + 2 decode + router
        check_start_up_output(lines, url, e2e_model)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        chat = client.chat.completions.create(
            model="llama",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
            temperature=0,
        )
        assert (
            chat.choices[0].finish_reason in ("length", "stop")
            and chat.usage.completion_tokens <= 5
        )
        streamed = client.completions.create(model="llama", prompt="hi", max_tokens=4, stream=True)
        assert [c.choices[0].finish_reason for c in streamed][-1] in ("length", "stop")
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines[-40:])
    deadline = time.monotonic() + 10
    while processes_mentioning(str(e2e_model)):
        assert time.monotonic() < deadline, "children outlived tandem up"
        time.sleep(0.2)


SERVICE_LINE = re.compile(
    r"tandem: (?P<name>\S+) +grpc (?P<grpc>\S+) +metrics (?P<metrics>http://\S+/metrics)(?P<rest>.*)\n"
)
ROUTER_LINE = re.compile(
    r"tandem: router +http (?P<url>http://\S+) \(OpenAI API\) +grpc (?P<grpc>\S+) \(SDK\) +"
    r"metrics (?P<metrics>http://\S+/metrics)\n"
)


def check_start_up_output(lines: list[str], url: str, model: Path) -> None:
    """What `tandem up` printed up to its ready line: one line per service with its address and
    metrics endpoint (each answering), the model's place, progress, and no health-poll noise."""
    out = "".join(lines)
    services = {m["name"]: m for line in lines if (m := SERVICE_LINE.fullmatch(line))}
    assert set(services) == {"kvstore", "prefill-0", "decode-0", "decode-1"}, out
    assert "(embedded)" in services["kvstore"]["rest"]
    router = next(m for line in lines if (m := ROUTER_LINE.fullmatch(line)))
    assert router["url"] == url and router["metrics"] == f"{url}/metrics"
    for m in [*services.values(), router]:
        r = httpx.get(m["metrics"], timeout=10)
        assert r.status_code == 200 and "# TYPE" in r.text, m["metrics"]
    for name in ("kvstore", "prefill-0", "decode-0", "decode-1"):  # the printed address serves
        assert grpc_healthy(services[name]["grpc"]), name
    with Client(router["grpc"], timeout=60) as sdk:
        assert sdk.generate("hello", max_tokens=2).usage.completion_tokens <= 2
    assert f"tandem: load test: make loadtest URL={url} GRPC={router['grpc']}\n" in lines
    assert any(
        line.startswith("tandem: model ") and line.rstrip().endswith(f"from {model.resolve()}")
        for line in lines
    ), out
    # Progress: each service's ready line, and the pods' model loading, instead of health polls.
    for name in [*services, "router"]:
        assert re.search(rf"^tandem: {name} ready \(\d+\.\d s\)$", out, re.M), name
    assert re.search(r"^\[decode-1\] .*engine core process \d+ starting: loading ", out, re.M)
    assert "HTTP Request" not in out and "Service Unavailable" not in out, out
    # The router counts the pods it discovered, not only those already up.
    startup = next(line for line in lines if "router gRPC on port" in line)
    assert "prefill pods 1 (" in startup and "decode pods 2 (" in startup, startup
    assert not re.search(r"\b0 prefill, 0 decode", out)


def test_tandem_up_reports_a_service_that_cannot_start(tmp_path):
    bad_model = tmp_path / "not-a-model"
    bad_model.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--model", str(bad_model), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "no config.json" in result.stderr and "Traceback" not in result.stderr + result.stdout


def wait_ready_line(proc: subprocess.Popen, lines: list[str], timeout_s: float = 240) -> str:
    """The router URL from `tandem up`'s ready line (every line read is kept in ``lines``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, "".join(lines[-40:])
        lines.append(line)
        if match := READY.fullmatch(line):
            return match.group(1)


def processes_in(directory: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if Path(os.readlink(proc / "cwd")) == directory:
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def instance_env(i: int) -> dict[str, str]:
    """The environment of side-by-side instance ``i`` of 2: under pytest-xdist each takes half
    of this worker's port range (tests/conftest.py); two processes drawing from one range could
    both pick a port neither has bound yet. Without a range the kernel hands out the ports."""
    from services.local_cluster import PORT_RANGE_ENV

    env = dict(os.environ)
    if span := env.get(PORT_RANGE_ENV):
        lo, hi = (int(p) for p in span.split("-"))
        half = (hi - lo + 1) // 2
        env[PORT_RANGE_ENV] = f"{lo + i * half}-{lo + (i + 1) * half - 1}"
    return env


def test_two_instances_run_side_by_side_and_stop_on_sigterm(tmp_path):
    """Both generate the default model at once (one wins the rename), pick their own ports, serve,
    and stop every child on SIGTERM."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--port", "0", "--num-kv-blocks", "64"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=instance_env(i),
        )
        for i in range(2)
    ]
    logs: list[list[str]] = [[], []]
    try:
        urls = [wait_ready_line(proc, lines) for proc, lines in zip(procs, logs, strict=True)]
        assert len(set(urls)) == 2
        for url in urls:
            r = httpx.post(
                f"{url}/v1/completions",
                json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 3},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] <= 3
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in procs]
    assert codes == [0, 0], "".join(logs[0][-20:] + logs[1][-20:])
    deadline = time.monotonic() + 10
    while processes_in(tmp_path):
        assert time.monotonic() < deadline, "children outlived tandem up"
        time.sleep(0.2)
