"""The KV transport conformance suite (tests/integration/test_kv_transports.py) on a GPU: the
same tests for every transport the machine has, cuda-ipc among them (GPU pools, each pod's
engine core in its own process, pages copied device to device into the decode pod's pool)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


def test_transport_conformance_suite_on_cuda():
    env = dict(os.environ, TANDEM_TEST_DEVICE="cuda")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            "tests/integration/test_kv_transports.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-8000:]
    assert "[cuda-ipc] PASSED" in out, out[-8000:]
