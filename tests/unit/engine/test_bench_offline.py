"""bench/offline.py: prints a table and the JSON result, and writes the same JSON to --out-dir."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # runs the benchmark script in a new process

BENCH = Path(__file__).resolve().parents[3] / "bench" / "offline.py"


def test_offline_bench_prints_table_and_json(llama_dir, tmp_path):
    args = ["--model", str(llama_dir), "--num-requests", "4", "--min-len", "4", "--max-len", "12"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table, brace, rest = proc.stdout.partition("\n{\n")
    assert table.splitlines()[0].split()[:3] == ["engine", "requests", "in"]
    assert table.splitlines()[2].split()[:2] == ["tandem", "4"]
    printed = json.loads(brace + rest)
    (written,) = tmp_path.glob("*_offline.json")
    assert json.loads(written.read_text()) == printed
    assert f"wrote {written}" in proc.stderr
    assert (
        printed["num_requests"] == 4
        and printed["output_tokens"] > 0
        and printed["output_tok_per_s"] > 0
    )
