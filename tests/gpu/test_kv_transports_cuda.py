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


def test_a_memory_write_never_waits_for_the_forward_queued_before_it():
    """The prefill pod's engine thread calls ``MemoryTransfer.write`` at each layer-group
    boundary while later layers are still queued: the write must only queue its copy. (It once
    uploaded the block ids with a plain host-to-device copy, which waited for every queued layer
    at every boundary: 1B prefill compute p50 42 -> 24 ms once fixed, bench/NOTES.md.)"""
    import time

    import torch

    from tandem.transfer.memory_push import MemoryTransfer
    from tandem.transfer.push_streams import KVTarget
    from tandem.transfer.transport import PoolWriter

    class Writer(PoolWriter):
        transport = "cuda-ipc"

        def write(self, src, src_ids, layers, dst_ids) -> int:
            assert src_ids.device == src.device
            return 1

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    target = KVTarget(
        "decode:1", "r1", 0, "fp", transfer_token="t", transport="cuda-ipc", block_ids=(3, 4),
        lease_expires_unix_ms=int((time.time() + 60) * 1000),
    )  # fmt: skip
    transfer = MemoryTransfer(target, 2, Writer(), lambda end, **kw: None, 5.0)
    kv = torch.zeros(1, 2, 8, 1, device="cuda")
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles queued ahead of the write
    transfer.write(kv, [0, 1], (0, 1), 0, 2)
    assert transfer.error is None and transfer.writes == 1
    assert not stream.query(), "the write waited for the queued work"
    torch.cuda.synchronize()
