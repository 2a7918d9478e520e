"""Third-party client trial: start ``tandem up`` as a user does and drive it with the clients
users already run -- the official ``openai`` client, an agent framework (LangGraph's ReAct agent
over LangChain's ChatOpenAI), an evaluation harness (lm-eval: loglikelihood tasks on a local
dataset through ``local-completions``, generation through ``local-chat-completions``) and a
gateway library (LiteLLM's SDK, ``openai/`` provider) -- then print one row per scenario.

A manual check, not part of ``make test``: the clients live in their own virtualenv, outside
the repository (they pin versions Tandem's venv must not get), and the trial takes minutes.

    python scripts/client_trial.py --setup --clients-venv /work/clients-venv   # once
    .venv/bin/python scripts/client_trial.py --clients-venv /work/clients-venv --out /tmp/t.json

Nothing is downloaded: the model is the generated tiny random one (``tandem up``'s default),
lm-eval's tokenizer and datasets come from the model directory and files written here, and
every client runs with ``HF_HUB_OFFLINE=1``. ``scripts/client_trial_scenarios.py`` runs one
scenario (each in its own process, under a time limit; the scenarios are in
``client_trial_openai.py`` and ``client_trial_frameworks.py``); docs/client_trial.md says what
each checks. ``tandem up`` and every process it started are
stopped when the trial ends, whatever happens.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = Path(__file__).with_name("client_trial_scenarios.py")
CLIENTS = ["openai", "langgraph", "langchain-openai", "lm-eval", "litellm", "transformers"]
"""What ``--setup`` installs (transformers: lm-eval's tokenizer, read from the model dir)."""
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # litellm fetches its price list at import otherwise
    "LANGSMITH_TRACING": "false",
    "OPENAI_API_KEY": "unused",
    "TOKENIZERS_PARALLELISM": "false",
}


def setup(venv: Path) -> None:
    """Create the clients' venv (if missing) and install the clients into it."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-U", "pip"], check=True)
    subprocess.run([*pip, *CLIENTS], check=True)


class TandemUp:
    """``tandem up`` in its own session, its output in a log file; ``stop()`` ends it and, should
    it leave any behind, each process it started (found by parent id, killed by pid)."""

    def __init__(self, python: str, args: list[str], log: Path) -> None:
        self.log_path = log
        self.log = log.open("w")
        cmd = [python, "-m", "services.cli", "up", *args]
        print(f"starting: {' '.join(cmd)}", flush=True)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.children: dict[int, str] = {}
        """pid -> its start time (so a pid reused by another process is never killed)."""

    def wait_ready(self, timeout_s: float) -> str:
        """The router's URL once ``tandem up`` says it is ready."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.children.update(descendants(self.proc.pid))
            found = re.search(r"tandem ready: (http://\S+)", self.log_path.read_text())
            if found:
                return found.group(1).rstrip("/")
            if self.proc.poll() is not None:
                raise RuntimeError(f"tandem up exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.5)
        raise RuntimeError(f"tandem up not ready after {timeout_s:g} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.children.update(descendants(self.proc.pid))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # as Ctrl-C: it stops its services in order
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 10
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.leftovers():  # anything it left behind is a bug: say so
            try:
                cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                cmd = b"?"
            os.kill(pid, signal.SIGKILL)
            print(f"tandem up left process {pid} running: {cmd.decode()[:200]}", flush=True)
        self.log.close()

    def leftovers(self) -> list[int]:
        return [pid for pid, started in self.children.items() if start_time(pid) == started]


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...), None if gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    """A live process's start time (its identity with the pid), None if gone or a zombie."""
    fields = _stat(pid)
    return fields[19] if fields and fields[0] != "Z" else None


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``, with its start time (children start their own
    sessions, so a process group would miss them)."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(entry.name) if entry.name.isdigit() else None
        if fields:
            parents.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child, started in parents.get(todo.pop(), []):
            if child not in found:
                found[child] = started
                todo.append(child)
    return found


def list_scenarios(python: str) -> dict[str, list[str]]:
    out = subprocess.run(
        [python, str(SCENARIOS), "--list"], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def run_scenario(python: str, name: str, ctx_args: list[str], timeout_s: float, log: Path):
    """(ok, detail) of one scenario, run in its own process; its output goes to ``log``."""
    env = {**os.environ, **OFFLINE_ENV}
    proc = subprocess.Popen(
        [python, str(SCENARIOS), name, *ctx_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # its own group: a timeout ends what it started (lm_eval) too
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        log.write_text(f"{stdout}\n{stderr}")
        return False, f"timed out after {timeout_s:g} s"
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): leave nothing behind
            os.killpg(proc.pid, signal.SIGKILL)
    log.write_text(stdout + "\n" + stderr)
    for line in reversed(stdout.splitlines()):
        if line.startswith("TRIAL-RESULT "):
            result = json.loads(line.removeprefix("TRIAL-RESULT "))
            return result["ok"], result["detail"]
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1:] or ["no output"]
    return False, f"exited {proc.returncode}: {last[0]}"


def router_flags(python: str) -> list[str]:
    """The flags a vLLM user passes, when this router has them: auto tool choice with the Hermes
    parser (the tiny model's template is ChatML), and the tokenizer-info route."""
    help_text = subprocess.run(
        [python, "-m", "services.cli", "router", "--help"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    flags = []
    if "--enable-auto-tool-choice" in help_text:
        flags.append("--enable-auto-tool-choice")
    if "--tool-call-parser" in help_text:
        flags += ["--tool-call-parser", "hermes"]
    if "--enable-tokenizer-info-endpoint" in help_text:  # lm-eval's remote tokenizer reads it
        flags.append("--enable-tokenizer-info-endpoint")
    return flags


def print_table(rows: list[dict]) -> None:
    width = max(len(r["scenario"]) for r in rows)
    print(f"\n{'client':<10} {'scenario':<{width}} result")
    for r in rows:
        result = "ok" if r["ok"] else "FAILED"
        print(f"{r['client']:<10} {r['scenario']:<{width}} {result}: {r['detail']}")
    passed = sum(r["ok"] for r in rows)
    print(f"\n{passed} ok, {len(rows) - passed} failed")


def start_tandem(args: argparse.Namespace, model: Path, work: Path) -> TandemUp:
    flags = json.loads(args.up_args) + ["--port", "0"]
    router = router_flags(sys.executable)
    if router:
        flags += ["--router-args", json.dumps(router)]
    if args.model:
        flags += ["--model", str(model)]
    print(f"router flags: {router or 'none'}", flush=True)
    return TandemUp(sys.executable, flags, work / "tandem-up.log")


def trial(args, python: str, model: Path, scenarios: dict, work: Path) -> tuple[str, list[dict]]:
    """(the server's URL, one row per scenario run); ``tandem up`` is stopped before it returns."""
    up = start_tandem(args, model, work) if args.url is None else None
    rows: list[dict] = []
    try:
        try:
            url = args.url or up.wait_ready(600)
        except RuntimeError as e:
            print(e, flush=True)
            row = {"client": "tandem", "scenario": "tandem up", "what": "start", "ok": False}
            return "", [{**row, "detail": str(e).splitlines()[0]}]
        print(f"tandem ready at {url}", flush=True)
        ctx = ["--base-url", url, "--model", args.model_name or model.name]
        ctx += ["--model-dir", str(model), "--work-dir", str(work / "scenarios")]
        for name, (client, what) in scenarios.items():
            start = time.monotonic()
            ok, detail = run_scenario(python, name, ctx, args.timeout_s, work / f"{name}.log")
            row = {"client": client, "scenario": name, "what": what, "ok": ok, "detail": detail}
            row["seconds"] = round(time.monotonic() - start, 1)
            rows.append(row)
            print(f"{'ok    ' if ok else 'FAILED'} {name} ({row['seconds']} s): {detail}")
            if up is not None and up.proc.poll() is not None:
                print(f"tandem up died (exit {up.proc.returncode}):\n{up.tail()}")
                break
        return url, rows
    finally:
        if up is not None:
            up.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients-venv",
        type=Path,
        default=os.environ.get("TANDEM_CLIENTS_VENV"),
        help="virtualenv holding the clients (default $TANDEM_CLIENTS_VENV)",
    )
    parser.add_argument(
        "--setup", action="store_true", help="create it, install the clients and exit"
    )
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--only", help="run the scenarios whose names match this regex")
    parser.add_argument("--url", help="use this running server instead of starting tandem up")
    parser.add_argument("--model", type=Path, help="model directory (default: tandem up's tiny)")
    parser.add_argument("--model-name", help="served model name (default: the directory's name)")
    parser.add_argument(
        "--up-args",
        default='["--prefill", "1", "--decode", "1"]',
        help="JSON list of extra `tandem up` flags (default: 1 prefill and 1 decode worker)",
    )
    parser.add_argument("--timeout-s", type=float, default=180, help="per scenario")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop tandem up on the way out
    if args.clients_venv is None:
        parser.error("--clients-venv (or TANDEM_CLIENTS_VENV) is required")
    if args.setup:
        setup(args.clients_venv)
        print(f"clients installed in {args.clients_venv}")
        return 0
    python = str(args.clients_venv / "bin" / "python")
    model = (args.model or ROOT / ".tandem/models/tiny-llama").resolve()
    if args.model is None and args.url is None:
        subprocess.run(  # tandem up's default model, generated now so lm-eval can read it
            [sys.executable, "-c", "from tandem.model_gen import ensure_default_model as e; e()"],
            cwd=ROOT,
            check=True,
        )
    scenarios = list_scenarios(python)
    if args.only:
        scenarios = {k: v for k, v in scenarios.items() if re.search(args.only, k)}
    work = Path(tempfile.mkdtemp(prefix="tandem-client-trial-"))
    print(f"work directory (logs): {work}", flush=True)
    url, rows = trial(args, python, model, scenarios, work)
    if rows:
        print_table(rows)
    if args.out:
        args.out.write_text(json.dumps({"url": url, "model": str(model), "rows": rows}, indent=1))
    if args.keep or not all(r["ok"] for r in rows):
        print(f"logs kept in {work} (tandem-up.log, one log per scenario)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
