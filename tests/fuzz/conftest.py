"""Fuzz-suite fixtures: one real cluster, the example budget, and the figures the suite reports.

The suite throws generated hostile input at real servers over real sockets: the router's HTTP
API (schemathesis, from the router's own ``/openapi.json``) and every gRPC service (hypothesis
strategies built from the protobuf descriptors). Its checks: no 5xx and no UNKNOWN/INTERNAL
status (an unhandled exception), every 4xx in the OpenAI error envelope, no process crashed, no
call hung past its deadline, and every pod back at its baseline free KV blocks at the end.

Budget: ``TANDEM_FUZZ_EXAMPLES`` generated inputs per test (default 300, which keeps the suite
within CI's budget); set e.g. ``TANDEM_FUZZ_EXAMPLES=5000`` for a long manual run. The figures
(inputs tried, outcomes by class, crashes, leaked blocks) are printed and written to
``fuzz-figures.json`` in pytest's temporary directory.
"""

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from services.local_cluster import LocalCluster, pod_stats

from ..e2e.conftest import start_cluster

EXAMPLES_ENV = "TANDEM_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 300


def fuzz_examples() -> int:
    """Generated inputs per fuzz test (``TANDEM_FUZZ_EXAMPLES``, default 300)."""
    return max(1, int(os.environ.get(EXAMPLES_ENV, DEFAULT_EXAMPLES)))


class Figures:
    """Outcome counts of one fuzz test, and the inputs that failed a check."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tried = 0
        self.outcomes: Counter[str] = Counter()
        self.failures: list[dict] = []
        self.crashed: list[str] = []
        self.leaked_blocks: dict[str, int] = {}
        self.seconds = 0.0
        self.slowest: list[tuple[float, str]] = []
        self.reasons: Counter[str] = Counter()
        """Why inputs were refused (the start of each 4xx message / error status's details)."""

    def record(
        self,
        outcome: str,
        failure: dict | None = None,
        seconds: float = 0.0,
        what: str = "",
        reason: str = "",
    ) -> None:
        self.tried += 1
        if reason:
            self.reasons[reason[:70]] += 1
        if seconds > 0:
            self.slowest = sorted([*self.slowest, (round(seconds, 2), what[:300])], reverse=True)
            del self.slowest[5:]
        self.outcomes[outcome] += 1
        if failure is not None and len(self.failures) < 50:
            self.failures.append(failure)

    def as_dict(self) -> dict:
        return {
            "inputs_tried": self.tried,
            "outcomes": dict(sorted(self.outcomes.items())),
            "server_errors": sum(
                n for k, n in self.outcomes.items() if " 5xx " in k or k.split()[-1] in _BAD_CODES
            ),
            "failures": len(self.failures),
            "crashes": self.crashed,
            "leaked_blocks": self.leaked_blocks,
            "seconds": round(self.seconds, 1),
            "slowest_calls": self.slowest,
            "top_refusal_reasons": dict(self.reasons.most_common(15)),
            "failing_inputs": self.failures[:10],
        }


_ALL: dict[str, Figures] = {}
_BAD_CODES = {"UNKNOWN", "INTERNAL"}


@pytest.fixture(scope="session")
def figures_file(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "fuzz-figures.json"


@pytest.fixture
def figures(request, figures_file):
    """This test's Figures; written (with every earlier test's) to fuzz-figures.json and printed
    when the test ends, whatever its outcome."""
    fig = Figures(request.node.name)
    _ALL[fig.name] = fig
    start = time.monotonic()
    yield fig
    fig.seconds = time.monotonic() - start
    figures_file.write_text(
        json.dumps({k: v.as_dict() for k, v in _ALL.items()}, indent=2, default=repr)
    )
    summary = {
        k: v
        for k, v in fig.as_dict().items()
        if k not in ("failing_inputs", "slowest_calls", "top_refusal_reasons")
    }
    print(f"\nfuzz figures {fig.name}: {json.dumps(summary)}")
    print(f"  top refusal reasons: {json.dumps(dict(fig.reasons.most_common(8)))}")
    print(f"  (all in {figures_file})")


@pytest.fixture(scope="session")
def fuzz_model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="session")
def fuzz_cluster(fuzz_model):
    """1 prefill + 1 decode pod, kvstore on Redis, the router: real processes."""
    c = start_cluster(fuzz_model, prefill=1, decode=1)
    yield c
    c.stop()


def pods(cluster: LocalCluster):
    return [s for s in cluster.services if s.name.split("-")[0] in ("prefill", "decode")]


def idle_free_blocks(cluster: LocalCluster, timeout_s: float = 20.0) -> dict[str, int]:
    """Every pod's free KV blocks once it is idle (no request; every block free or merely
    cached). Polls: an engine core's stats snapshot lags up to ~100 ms. Returns what it saw
    last, idle or not, after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = {s.name: pod_stats(s) for s in pods(cluster)}
        free = {name: st.num_free_blocks for name, st in stats.items()}
        idle = all(
            st.num_running + st.num_waiting + st.num_waiting_for_kv == 0
            and st.num_free_blocks == st.num_total_blocks > 0
            for st in stats.values()
        )
        if idle:
            return free
        if time.monotonic() > deadline:
            print(f"pods not idle after {timeout_s:g} s: {stats}")
            return free
        time.sleep(0.1)


def check_cluster(cluster: LocalCluster, baseline: dict[str, int], fig: Figures) -> None:
    """Record crashed services and pods not back at their baseline free blocks."""
    fig.crashed = [
        f"{s.name} (exit {s.proc.returncode})"
        for s in cluster.services
        if s.proc.poll() is not None
    ]
    if fig.crashed:
        return
    now = idle_free_blocks(cluster, timeout_s=30.0)
    fig.leaked_blocks = {
        name: baseline[name] - free for name, free in now.items() if free != baseline[name]
    }
