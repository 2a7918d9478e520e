"""The cuda-ipc transport's page-copy kernel, run by Triton's interpreter on CPU (the GPU
conformance suite runs it compiled)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

CHECK = """
import torch
from tandem.transfer.page_copy import copy_pages

g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16):
    for (block, heads, dim) in ((4, 2, 8), (16, 1, 20)):  # a page of 64 and of 320 elements
        src = torch.randn(4, 2, 9, block, heads, dim, generator=g).to(dtype)
        dst = torch.randn(4, 2, 13, block, heads, dim, generator=g).to(dtype)
        want = dst.clone()
        si, di = torch.tensor([3, 0, 7, 8]), torch.tensor([12, 5, 0, 6])
        copy_pages(src, si, dst, di, (1, 3))
        want[1:3, :, di] = src[1:3, :, si]
        assert torch.equal(dst, want), (dtype, block, heads, dim)  # nothing else touched
        copy_pages(src, si[:0], dst, di[:0], (0, 4))  # no pages: nothing happens
        assert torch.equal(dst, want)
print("ok")
"""


def test_pages_land_in_their_blocks_and_nothing_else_moves():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
