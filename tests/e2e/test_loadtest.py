"""locust, headless, against the whole local system: every user type, bounded time, no failures."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import start_cluster, wait_idle

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).parent / "locust"
API_OF_USER = {"ChatStreamUser": "chat", "CompletionUser": "completions", "GrpcUser": "sdk"}


@pytest.fixture(scope="module")
def system(e2e_model):
    cluster = start_cluster(e2e_model, prefill=1, decode=1)
    yield cluster
    cluster.stop()


def locust(
    cluster, tmp_path: Path, *args: str, seconds: int = 8, grpc: bool = True
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    rows = tmp_path / "rows.jsonl"
    cmd = [
        str(LOCUST),
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "-H",
        cluster.router_url,
        *(["--grpc-target", cluster.router_grpc] if grpc else []),
        "-u",
        "3",
        "-r",
        "3",
        "-t",
        f"{seconds}s",
        "--stop-timeout",
        "60",
        "--only-summary",
        "--exit-code-on-error",
        "1",
        "--jsonl",
        str(rows),
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    found = [json.loads(line) for line in rows.read_text().splitlines()] if rows.exists() else []
    return result, found


@pytest.mark.parametrize("workload", ["shared-prefix", "multi-turn"])
def test_every_user_type_runs_without_failures(system, tmp_path, workload):
    result, rows = locust(
        system,
        tmp_path,
        "--workload",
        workload,
        "--max-tokens",
        "8",
        "--prompt-words-max",
        "30",
        "--system-prompt-words",
        "100",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {r["api"] for r in rows} == set(API_OF_USER.values())
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed[:3]
    for r in rows:
        assert r["workload"] == workload and r["request_id"].startswith("locust-")
        assert r["output_tokens"] == 8  # EOS ignored: every request generates max-tokens
        assert 0 < r["ttft_s"] <= r["e2e_s"] < 60
        # Fewer gaps than tokens: tokens that queued up while a reader was busy come as one chunk.
        assert 0 <= r["tpot_s"] < 5 and len(r["itl_s"]) < 8 and all(0 <= g < 5 for g in r["itl_s"])
        assert r["prompt_tokens"] > 0
    # Users share system prompts (or their own history): some prompts were served from the cache.
    assert sum(r["cached_tokens"] or 0 for r in rows) > 0
    # locust's own table has the TTFT/TPOT/ITL/TOKENS events of each user type.
    for api in API_OF_USER.values():
        for kind in ("TTFT", "TPOT", "ITL", "TOKENS"):
            assert any(line.split()[:2] == [kind, api] for line in result.stderr.splitlines()), (
                kind,
                api,
            )
    wait_idle(system)


def test_failed_requests_are_reported_with_their_error(system, tmp_path):
    """A request the router refuses is a locust failure, with the router's message in its row."""
    result, rows = locust(
        system, tmp_path, "ChatStreamUser", "--max-tokens", "100000000", seconds=3
    )
    assert result.returncode == 1
    assert rows and all(not r["ok"] for r in rows)
    assert all("HTTP 400" in r["error"] and "max_tokens" in r["error"] for r in rows), rows[0]
    wait_idle(system)


def router_requests(cluster) -> float:
    text = httpx.get(cluster.router_url + "/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "tandem_router_requests"
        for s in f.samples
        if s.name == "tandem_router_requests_total" and s.labels["route"].startswith("/v1/")
    )


@pytest.mark.parametrize(
    "bad", [["--prompt-words-min", "50", "--prompt-words-max", "10"], ["--max-tokens", "0"]]
)
def test_bad_options_stop_the_run_before_any_request(system, tmp_path, bad):
    before = router_requests(system)
    started = time.monotonic()
    result, rows = locust(system, tmp_path, *bad, seconds=60)
    assert time.monotonic() - started < 30  # it stopped at once instead of running its 60 s
    assert result.returncode == 2
    assert "bad option" in result.stderr and bad[0] in result.stderr
    assert rows == [] and router_requests(system) == before


def test_make_loadtest_as_the_readme_gives_it(system, tmp_path):
    """`make loadtest URL=<what tandem up printed>` with its defaults but a short run: no
    bootstrap, no gRPC target, so the SDK user stays off; every request succeeds (exit 0)."""
    make = ["make", "-C", str(ROOT), "loadtest", f"URL={system.router_url}"]
    plan = subprocess.run([*make, "-n"], capture_output=True, text=True, timeout=30)
    assert plan.returncode == 0 and "-m locust -f loadtest/locustfile.py" in plan.stdout, plan
    assert "bootstrap" not in plan.stdout and "--grpc-target" not in plan.stdout
    if (ROOT / ".venv" / "bin" / "python").exists():  # the project's environment is reused
        assert ".venv/bin/python -m locust" in plan.stdout
    # Run by the interpreter running this test (it has locust), whichever environment that is.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    result = subprocess.run(
        [
            *make,
            "USERS=2",
            "SPAWN=2",
            "DURATION=3s",
            f"OUT={tmp_path}",
            f"LOADTEST_PY={sys.executable}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "GrpcUser off" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]][:3]
    assert {r["api"] for r in rows} == {"chat", "completions"}
    assert all(r["output_tokens"] == 64 for r in rows)  # the default --max-tokens, EOS ignored
    assert (tmp_path / "locust_stats.csv").is_file()
    wait_idle(system)


def test_the_sdk_user_without_a_grpc_target_is_a_bad_option(system, tmp_path):
    """Named alone without --grpc-target it would have nowhere to go: exit 2, no request."""
    before = router_requests(system)
    result, rows = locust(system, tmp_path, "GrpcUser", seconds=30, grpc=False)
    assert result.returncode == 2
    assert "bad option" in result.stderr and "--grpc-target" in result.stderr
    assert rows == [] and router_requests(system) == before
