"""Sampling profiles of a running system's processes with py-spy, summarised as a table.

``Profiler(dir).start(cluster)`` records every service process (and each pod's engine core,
its child) with ``py-spy record --format raw --threads --nonblocking`` until ``stop()``; then
``summary()`` gives, per process and thread, how busy it was (samples against the sampling
rate: 100 % is one core all the time) and the functions it spent that time in.
"""

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

RATE = 100


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Profiler:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.procs: dict[str, subprocess.Popen] = {}
        self.started = 0.0
        self.seconds = 0.0

    def start(self, cluster) -> None:
        # The interpreter's own scripts first (a venv or a pip --target install), then PATH.
        local = Path(sys.executable).parent / "py-spy"
        py_spy = str(local) if local.exists() else shutil.which("py-spy")
        if py_spy is None:
            raise SystemExit("--profile-dir needs py-spy (pip install py-spy)")
        self.out.mkdir(parents=True, exist_ok=True)
        targets = {"client": os.getpid()}  # the benchmark's own HTTP client
        for service in cluster.services:
            targets[service.name] = service.proc.pid
            for child in children(service.proc.pid):
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"spawn_main" in cmdline:  # a pod's engine core
                    targets[f"{service.name}-core"] = child
        for name, pid in targets.items():
            cmd = [py_spy, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw"]
            cmd += ["--threads", "--nonblocking", "--output", str(self.out / f"{name}.txt")]
            self.procs[name] = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        self.started = time.perf_counter()

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self.started
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def summary(self, top: int = 6) -> list[dict]:
        """Per process and thread: busy % of one core, and the top functions (self time)."""
        rows = []
        for name in self.procs:
            path = self.out / f"{name}.txt"
            if not path.exists():
                continue
            threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
            for line in path.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not stack:
                    continue
                frames = stack.split(";")
                thread = frames[0]
                threads[thread][frames[-1]] += int(count)
            for thread, funcs in threads.items():
                samples = sum(funcs.values())
                rows.append(
                    {
                        "process": name,
                        "thread": thread,
                        "busy_pct": 100.0 * samples / (RATE * max(self.seconds, 1e-9)),
                        "top": [
                            (f, round(100.0 * n / samples, 1)) for f, n in funcs.most_common(top)
                        ],
                    }
                )
        return sorted(rows, key=lambda r: -r["busy_pct"])
