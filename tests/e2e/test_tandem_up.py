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

pytestmark = pytest.mark.integration


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
        [sys.executable, "-m", "tandem.cli", "up", "--model", str(e2e_model), "--port", "0", "--decode", "2",
         "--num-kv-blocks", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 180
        url = None
        while url is None:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines[-40:])
            lines.append(line)
            if match := re.match(r"tandem ready: (http://\S+)", line):
                url = match.group(1)
        assert len(processes_mentioning(str(e2e_model))) >= 4  # tandem up + prefill + 2 decode + router
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        chat = client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0
        )
        assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.completion_tokens <= 5
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


def test_tandem_up_reports_a_service_that_cannot_start(tmp_path):
    bad_model = tmp_path / "not-a-model"
    bad_model.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "up", "--model", str(bad_model), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "no config.json" in result.stderr and "Traceback" not in result.stderr + result.stdout
