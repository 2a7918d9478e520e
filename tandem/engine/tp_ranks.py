"""The other ranks of a tensor-parallel engine: started with it, fed its steps, stopped with it.

Rank 0 is the engine's own ``ModelRunner``: it schedules, samples and speaks for the group. Ranks
1..N-1 are follower processes (``follower_main``), one per device. Each
builds its runner over its shard exactly as rank 0 does, so the constructors' collectives (the
profiled step, the pool's size) meet; then it runs the forward of every step rank 0 sends.

Why these choices:

- Followers are ``subprocess`` children, not ``multiprocessing`` ones: a pod's engine core is a
  daemonic process, which ``multiprocessing`` forbids to have children.
- Each follower talks to rank 0 over one end of a socket pair it inherits (``pass_fds``): no
  listening port, nothing another process on the host can connect to, and the follower sees
  end-of-file, and exits, as soon as rank 0's process is gone.
- A step's host inputs (``StepPlan``: a few small arrays) are pickled once and written to every
  follower; tokens that are on rank 0's device already (async scheduling) follow as a
  ``broadcast`` over the group.
- The group meets at a ``file://`` rendezvous in a private temporary directory: no port to race
  for.
"""

import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from tandem.api.errors import ModelLoadError
from tandem.engine.config import EngineConfig
from tandem.engine.parallel import TPConfig, TPGroup, TPInitError, init_tp_group
from tandem.engine.runner import ModelRunner, StepPlan
from tandem.model_dir import load_model_config

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
"""How long rank 0 waits for every follower to load its shard and allocate its pool."""
STOP_TIMEOUT_S = 10.0
_FOLLOWER_MAIN = (
    "import sys; from tandem.engine.tp_ranks import follower_main; "
    "sys.exit(follower_main(int(sys.argv[1])))"
)
"""A follower's command (``-c``, not ``-m``: the package imports this module before ``runpy``
would run it as ``__main__``)."""


def rank_device(device: str, rank: int) -> str:
    """The device of rank ``rank`` when rank 0 runs on ``device``: CPU for CPU, else the
    ``rank``-th CUDA device after rank 0's (``cuda`` counts from cuda:0)."""
    d = torch.device(device)
    if d.type != "cuda":
        return device
    if rank == 0:
        return device
    return f"cuda:{(d.index or 0) + rank}"


@dataclass(slots=True, frozen=True)
class _Start:
    """What a follower needs to build its rank (the first message it receives)."""

    config: dict
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    tp: TPConfig


class FollowerRanks:
    """Rank 0's handle on ranks 1..N-1 (``runner.StepFollowers``)."""

    def __init__(self, procs: list[subprocess.Popen], conns: list[Connection], tmpdir: str):
        self._procs = procs
        self._conns = conns
        self._tmpdir = tmpdir
        self._closed = False
        self.group: TPGroup | None = None
        """Rank 0's group (set by ``start``): tokens on the device are broadcast over it."""

    @classmethod
    def start(
        cls,
        config: EngineConfig,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        *,
        timeout_s: float = START_TIMEOUT_S,
    ) -> tuple["FollowerRanks", TPGroup]:
        """Start ranks 1..N-1, join the group as rank 0, and return (the followers, rank 0's
        group). Rank 0's runner must then be built (its collectives meet the followers'), then
        ``wait_ready``."""
        world = config.tensor_parallel_size
        tmpdir = tempfile.mkdtemp(prefix="tandem-tp-")
        tp0 = TPConfig(
            world_size=world,
            rank=0,
            init_method=f"file://{os.path.join(tmpdir, 'rendezvous')}",
            timeout_s=timeout_s,
        )
        procs: list[subprocess.Popen] = []
        conns: list[Connection] = []
        ranks = cls(procs, conns, tmpdir)
        try:
            for rank in range(1, world):
                ours, theirs = socket.socketpair()
                proc = subprocess.Popen(
                    [sys.executable, "-c", _FOLLOWER_MAIN, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    env={**os.environ, "NCCL_NVLS_ENABLE": "0"},
                )
                theirs.close()
                procs.append(proc)
                conn = Connection(ours.detach())
                conns.append(conn)
                tp = TPConfig(
                    world_size=world,
                    rank=rank,
                    init_method=tp0.init_method,
                    timeout_s=timeout_s,
                )
                # kv_pool_path names rank 0's pool file (a decode pod shares it): never another's.
                cfg = config.model_copy(
                    update={"device": rank_device(config.device, rank), "kv_pool_path": None}
                )
                conn.send(_Start(cfg.model_dump(), eos_token_ids, max_model_len, tp))
            group = ranks.group = init_tp_group(tp0, config.device)
        except BaseException as exc:
            failure = ranks.failure()
            ranks.close()
            if failure is not None:
                raise ModelLoadError(failure) from exc
            raise
        return ranks, group

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until every follower has its runner; raises ``ModelLoadError`` with a
        follower's own error if one failed."""
        deadline = time.monotonic() + timeout_s
        for rank, conn in enumerate(self._conns, start=1):
            while not conn.poll(0.2):
                if self._procs[rank - 1].poll() is not None or time.monotonic() > deadline:
                    raise ModelLoadError(
                        self.failure() or f"tensor-parallel rank {rank} did not start"
                    )
            reply = conn.recv()
            if reply[0] != "ready":
                raise ModelLoadError(f"tensor-parallel rank {rank}: {reply[1]}")

    def failure(self) -> str | None:
        """A follower's error message, if one reported one (or exited)."""
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns, strict=True), start=1):
            try:
                while conn.poll(0):
                    reply = conn.recv()
                    if reply[0] == "error":
                        return f"tensor-parallel rank {rank}: {reply[1]}"
            except (EOFError, OSError):
                pass
            if proc.poll() not in (None, 0):
                return f"tensor-parallel rank {rank} exited with status {proc.returncode}"
        return None

    def filenos(self) -> list[int]:
        """The followers' connections: readable only when one failed (its error, or end-of-file
        when its process is gone), for a serving loop to poll beside its own sockets."""
        return [conn.fileno() for conn in self._conns]

    # ---- per step (runner.StepFollowers) -------------------------------------------------------

    def _send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self._conns:
            conn.send_bytes(data)

    def step(self, plan: StepPlan, device_input_ids: torch.Tensor | None) -> None:
        self._send(("step", plan, None if device_input_ids is None else device_input_ids.numel()))
        if device_input_ids is not None:
            self.group.broadcast(device_input_ids)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        self._send(("copy", src, dst))

    # ---- stop ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the followers (told to, then killed after ``STOP_TIMEOUT_S``)."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            try:
                conn.send_bytes(pickle.dumps(("stop",)))
            except OSError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)


# ---- the follower process ------------------------------------------------------------------------


def _follow(conn: Connection, runner: ModelRunner, group: TPGroup) -> None:
    """Run rank 0's steps until it says stop or is gone."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # rank 0's process ended
        kind = message[0]
        if kind == "stop":
            return
        if kind == "step":
            _, plan, num_device_ids = message
            ids = None
            if num_device_ids is not None:
                ids = torch.empty(num_device_ids, dtype=torch.long, device=runner.device)
                group.broadcast(ids)
            runner.follow(plan, ids)
        elif kind == "copy":
            runner.copy_block_ids(message[1], message[2])
        else:
            raise RuntimeError(f"unknown message {kind!r} from rank 0")


def follower_main(fd: int) -> int:
    """A follower rank's life: read its start message, join, build, report, follow."""
    conn = Connection(fd)
    start: _Start = conn.recv()
    rank = start.tp.rank
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s [tp rank {rank}]: %(message)s",
    )
    config = EngineConfig(**start.config)
    if torch.device(config.device).type == "cpu":
        # The ranks share the host's cores: one rank must not take them all.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // start.tp.world_size))
    group = None
    try:
        group = init_tp_group(start.tp, config.device)
        runner = ModelRunner(
            config,
            load_model_config(config.model),
            start.eos_token_ids,
            start.max_model_len,
            tp=group,
        )
        conn.send(("ready", runner.kv_cache.num_blocks))
        _follow(conn, runner, group)
        return 0
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then the process ends
        if not isinstance(exc, TPInitError):
            logger.exception("tensor-parallel rank %d failed", rank)
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return 1
    finally:
        if group is not None:
            group.destroy()
