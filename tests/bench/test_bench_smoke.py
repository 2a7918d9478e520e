"""The serving benchmarks still run end to end (tiny shapes, CPU) and record what they measured.

Speed is not asserted here (BENCHMARKS.md: performance is measured in bench/, not in timed
tests); these catch a benchmark broken by a change elsewhere, e.g. a page check that no longer
matches the KV pool's layout.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.integration


def run_bench(script: str, tmp_path: Path, *args: str, timeout: int = 240) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (written,) = tmp_path.glob("*.json")
    return json.loads(written.read_text())


def test_kv_transfer_bench_moves_verified_pages(tmp_path):
    result = run_bench(
        "kv_transfer.py",
        tmp_path,
        "--transports",
        "grpc",
        "shm",
        "--shapes",
        "tiny",
        "--tokens",
        "256",
        "--streams",
        "1",
        "2",
        "--repeats",
        "1",
    )
    assert [(row["transport"], row.get("streams")) for row in result["rows"]] == [
        ("grpc", 1),
        ("grpc", 2),
        ("shm", None),
    ]
    for row in result["rows"]:
        assert (
            row["bytes"] == 4 * 2 * 256 * 2 * 32 * 2
        )  # layers x K/V x tokens x heads x dim x bf16
        assert row["gb_s"] > 0 and row["baseline_gb_s"] > 0 and row["ratio"] > 0
        assert row["failed_transfers"] == 0 and row["verified"].startswith("OK")
    grpc_row, _, shm_row = result["rows"]
    assert grpc_row["grpc_gb_s"] > 0 and grpc_row["raw_tcp_gb_s"] > 0
    # shm: every transfer (warm-up included) checked page by page by the receiver process
    assert shm_row["transfers"] == 2 and shm_row["mismatched_pages"] == 0
    assert shm_row["baseline"] == "memcpy" and shm_row["gather_scatter_gb_s"] > 0


def test_kvstore_bench_compares_lookups_with_a_redis_get(tmp_path):
    result = run_bench(
        "kvstore.py",
        tmp_path,
        "--requests",
        "50",
        "--concurrency",
        "4",
        "--lengths",
        "16",
        "--memory-entries",
        "2000",
    )
    ops = {row["op"] for row in result["rows"]}
    assert len(ops) >= 3 and any("GET" in op for op in ops)
    assert all(row["p50_ms"] > 0 for row in result["rows"])
    assert result["memory"]["entries"] == 2000 and result["memory"]["bytes_per_entry"] > 50


def test_serve_bench_runs_both_modes_and_reports_pod_hit_rates(tmp_path, tiny_model):
    result = run_bench(
        "serve.py",
        tmp_path,
        "--model",
        str(tiny_model("llama")),
        "--workload",
        "prefix-repetition",
        "--modes",
        "prefix-aware",
        "load-only",
        "--num-prefixes",
        "2",
        "--prefix-len",
        "32",
        "--suffix-len",
        "8",
        "--num-prompts",
        "8",
        "--output-len",
        "4",
        "--rate",
        "4",
        "--worker-args",
        "--max-num-seqs 8",
        "--num-kv-blocks",
        "128",
        timeout=300,
    )
    assert set(result["results"]) == {"prefix-aware", "load-only"}
    assert result["workers"]["prefix-aware"] == {"prefill": 2, "decode": 1}
    for mode in result["results"].values():
        assert mode["completed"] == 8 and mode["failed"] == 0
        assert mode["ttft_ms"]["median"] > 0 and mode["tpot_ms"]["median"] > 0
        # Spread over ~2 s: each prefix misses on a pod once, later requests find it there.
        assert 0 < mode["pod_cache_hit_rate"]["prefill"] < 1


def test_goodput_study_sweeps_rates_for_both_modes_against_one_slo(tmp_path, tiny_model):
    result = run_bench(
        "goodput.py",
        tmp_path,
        "--model",
        str(tiny_model("llama")),
        "--rates",
        "2",
        "50",
        "--num-prompts",
        "6",
        "--output-len",
        "4",
        "--unloaded-requests",
        "2",
        "--num-kv-blocks",
        "128",
        timeout=400,
    )
    assert result["unloaded_tpot_ms"] > 0
    assert result["slo"]["tpot_ms"] == pytest.approx(1.5 * result["unloaded_tpot_ms"])
    assert [(r["mode"], r["rate"]) for r in result["rows"]] == [
        ("colocated", 2.0),
        ("colocated", 50.0),
        ("disaggregated", 2.0),
        ("disaggregated", 50.0),
    ]
    for row in result["rows"]:
        assert row["failed"] == 0 and 0 <= row["attainment"] <= 1
        assert row["summary"]["completed"] == 6
    for mode, best in result["goodput"].items():
        good = [r["rate"] for r in result["rows"] if r["mode"] == mode and r["attainment"] >= 0.9]
        assert best == (max(good) if good else None)


def test_serve_bench_sharegpt_workload_against_the_offline_engine(tmp_path, tiny_model):
    """W4 (lognormal lengths) through the router, and the offline engine on the same requests."""
    result = run_bench(
        "serve.py",
        tmp_path,
        "--model",
        str(tiny_model("llama")),
        "--workload",
        "sharegpt",
        "--modes",
        "colocated",
        "--workers",
        "1",
        "--num-prompts",
        "6",
        "--offline",
        "--num-kv-blocks",
        "256",
        timeout=300,
    )
    online = result["results"]["colocated"]
    assert online["completed"] == 6 and online["failed"] == 0
    assert result["offline"]["completed"] == 6
    # Both ran the same requests: the same output tokens, from the usage field and the engine.
    assert online["output_tokens"] == result["offline"]["output_tokens"]
    assert online["vs_offline"] == pytest.approx(
        online["output_throughput"] / result["offline"]["output_throughput"]
    )


def test_engine_bench_micro_reports_each_step_against_its_floor(tmp_path):
    result = run_bench(
        "engine.py",
        tmp_path,
        "--shapes",
        "tiny",
        "--batches",
        "1",
        "4",
        "--contexts",
        "64",
        "--prefill",
        "64",
        "--prefill-after",
        "40:24",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--loop-batches",
        "4",
        "--loop-context",
        "64",
        "--loop-steps",
        "5",
    )
    kinds = [
        (r["kind"], r.get("async_mode"), r.get("batch"), r.get("context", r.get("tokens")))
        for r in result["results"]
    ]
    assert kinds == [
        ("decode", None, 1, 64),
        ("decode", None, 4, 64),
        ("engine-loop", "off", 4, 64),
        ("engine-loop", "scheduling", 4, 64),
        ("prefill", None, None, 0),  # a prompt's first chunk
        ("prefill", None, None, 40),  # a chunk after 40 cached tokens
    ]
    assert [r["tokens"] for r in result["results"] if r["kind"] == "prefill"] == [64, 24]
    assert all(r["seconds"] > 0 and r["floor_seconds"] > 0 for r in result["results"])


def test_engine_bench_offline_compares_async_modes_and_transformers(tmp_path):
    result = run_bench(
        "engine.py",
        tmp_path,
        "--section",
        "offline",
        "--shapes",
        "tiny",
        "--num-requests",
        "6",
        "--min-len",
        "8",
        "--max-len",
        "24",
        "--hf-modes",
        "generate",
        "--async",
        "scheduling",
        "off",
        "--untimed",
        timeout=300,
    )
    (row,) = result["results"]
    runs = row["tandem_by_async_mode"]
    # --untimed: each mode once more without per-step timing, its own row
    assert runs["off, untimed"]["timing"] is None and runs["off, untimed"]["tok_s"] > 0
    assert [
        (runs[m]["timing"]["async_output_processing"], runs[m]["timing"]["async_scheduling"])
        for m in ("scheduling", "off")
    ] == [(True, True), (False, False)]
    assert row["output_tokens"] > 6 and row["hf_generate_output_tokens"] >= row["output_tokens"]
    assert row["tandem_over_hf_generate_tok_s"] > 0
    # The run against its per-step roofline floor: each group that ran with a floor.
    roof = row["tandem_roofline"]
    groups = roof["groups"]
    assert (
        groups["prefill-containing"]["steps"] >= 1 and groups["decode <= 64 seqs (tail)"]["steps"]
    )
    assert all(g["floor_s"] > 0 for g in groups.values() if g["steps"])
    assert roof["floor_s"] == pytest.approx(sum(g["floor_s"] for g in groups.values()))
    assert roof["ceiling_output_tok_s"] == pytest.approx(row["output_tokens"] / roof["floor_s"])
