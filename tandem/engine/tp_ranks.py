"""The other ranks of a tensor-parallel engine: started with it, fed its steps, stopped with it.

Rank 0 is the engine's own ``ModelRunner``: it schedules, samples and speaks for the group. Ranks
1..N-1 are follower processes (``follower_main``), one per device. Each
builds its runner over its shard exactly as rank 0 does, so the constructors' collectives (the
profiled step, the pool's size) meet; then it runs the forward of every step rank 0 sends.

Why these choices:

- Followers are ``subprocess`` children, not ``multiprocessing`` ones: a pod's engine core is a
  daemonic process, which ``multiprocessing`` forbids to have children.
- Each follower talks to rank 0 over one end of a socket pair it inherits (``pass_fds``): no
  listening port for this control channel, and the follower sees end-of-file, and exits, as
  soon as rank 0's process is gone (``PR_SET_PDEATHSIG`` too, for a follower stuck in a
  collective). The collectives' own sockets (gloo's pairs, NCCL's bootstrap) listen on
  loopback only (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` default to ``lo``).
- A step's host inputs (``StepPlan``: a few small arrays) are pickled once and written to every
  follower; tokens that are on rank 0's device already (async scheduling) follow as a
  ``broadcast`` over the group.
- The group meets at a ``file://`` rendezvous in a private temporary directory: no port to race
  for.
"""

import dataclasses
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401 - registers torch's CUDA IPC reductions for pickling

from tandem.api.errors import ModelLoadError
from tandem.engine.config import EngineConfig
from tandem.engine.kv_cache import rank_pool_path
from tandem.engine.parallel import TPConfig, TPGroup, TPInitError, init_tp_group
from tandem.engine.runner import ModelRunner, StepPlan
from tandem.model_dir import load_model_config

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 120.0
"""How long rank 0 waits for every follower process to start (import torch, reach its device)
before any rank joins the group: a follower that cannot is reported, not waited for."""
START_TIMEOUT_S = 600.0
"""How long any rank waits in a collective: loading the shards and the profiled step included
(ranks may load at different speeds), and every step after."""
STOP_TIMEOUT_S = 10.0
"""How long a told-to-stop follower may take to exit before it is killed."""
_FOLLOWER_MAIN = (
    "import sys; from tandem.engine.tp_ranks import follower_main; "
    "sys.exit(follower_main(int(sys.argv[1])))"
)
"""A follower's command (``-c``, not ``-m``: the package imports this module before ``runpy``
would run it as ``__main__``)."""
_PRIVATE_ENV = ("TANDEM_CLUSTER_SECRET",)
"""Variables a follower never needs (``cluster_auth.SECRET_ENV``): not passed on."""


def rank_device(device: str, rank: int) -> str:
    """The device of rank ``rank`` when rank 0 runs on ``device`` (a resolved ``cuda:N``, or
    ``cpu``): the ``rank``-th CUDA device after rank 0's."""
    d = torch.device(device)
    if d.type != "cuda" or rank == 0:
        return device
    return f"cuda:{(d.index or 0) + rank}"


def resolve_devices(device: str, world_size: int) -> str:
    """Rank 0's device with its index made explicit (``cuda`` -> the current device), checked to
    leave room for ``world_size`` ranks; raises ``ModelLoadError`` before any process starts."""
    d = torch.device(device)
    if d.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ModelLoadError("device cuda was requested but no CUDA GPU is available")
    index = torch.cuda.current_device() if d.index is None else d.index
    count = torch.cuda.device_count()
    if index + world_size > count:
        raise ModelLoadError(
            f"tensor_parallel_size {world_size} from cuda:{index} needs GPUs cuda:{index} to "
            f"cuda:{index + world_size - 1}, but {count} are visible"
        )
    return f"cuda:{index}"


@dataclass(slots=True, frozen=True)
class _Start:
    """What a follower needs to build its rank (the first message it receives)."""

    config: dict
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    tp: TPConfig
    parent_pid: int
    """Rank 0's pid, to die with (0: not tied, see ``_die_with_parent``)."""


class FollowerRanks:
    """Rank 0's handle on ranks 1..N-1 (``runner.StepFollowers``).

    After the group is joined, a watcher thread reads everything the followers send: their
    "ready" (with their pool's size) and, on failure, their error or end-of-file. A failure is
    recorded (``failure``) and, on NCCL, aborts rank 0's process group, so that a collective
    rank 0 is waiting in raises instead of waiting out the timeout (gloo notices the closed
    connections by itself).
    """

    def __init__(self, procs: list[subprocess.Popen], conns: list[Connection], tmpdir: str):
        self._procs = procs
        self._conns = conns
        self._tmpdir = tmpdir
        self._closed = False
        self.group: TPGroup | None = None
        """Rank 0's group (set by ``start``): tokens on the device are broadcast over it."""
        self._failure: str | None = None
        self._ready: dict[int, int] = {}
        """Rank -> the KV blocks its pool holds, as each follower reports ready."""
        self._shared_pools: dict[int, bytes] = {}
        """Rank -> its pool shared over CUDA IPC (``EngineConfig.share_rank_pools``), pickled
        by the follower (torch's CUDA IPC reduction) and relayed unopened."""
        self._changed = threading.Condition()
        self._watcher: threading.Thread | None = None

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
        group). ``config.device`` must be resolved (``resolve_devices``). Rank 0's runner must
        then be built (its collectives meet the followers'), then ``wait_ready``."""
        world = config.tensor_parallel_size
        tmpdir = tempfile.mkdtemp(prefix="tandem-tp-")
        tp0 = TPConfig(
            world_size=world,
            rank=0,
            init_method=f"file://{os.path.join(tmpdir, 'rendezvous')}",
            timeout_s=timeout_s,
        )
        # Every rank is on this host: the collectives' sockets listen on loopback only, not on
        # an interface other hosts (the pod network) could reach.
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(name, "lo")
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        env["NCCL_NVLS_ENABLE"] = "0"
        procs: list[subprocess.Popen] = []
        conns: list[Connection] = []
        ranks = cls(procs, conns, tmpdir)
        try:
            for rank in range(1, world):
                ours, theirs = socket.socketpair()
                proc = subprocess.Popen(
                    [sys.executable, "-c", _FOLLOWER_MAIN, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    env=env,
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
                # A shared pool file (a decode pod's front writes pushed KV there): one per rank.
                path = config.kv_pool_path and rank_pool_path(config.kv_pool_path, rank)
                cfg = config.model_copy(
                    update={"device": rank_device(config.device, rank), "kv_pool_path": path}
                )
                # PR_SET_PDEATHSIG fires when the starting THREAD ends: only tie the followers
                # to it when that is the main thread (an LLM built in a worker thread keeps them).
                main = threading.current_thread() is threading.main_thread()
                parent = os.getpid() if main else 0
                try:
                    conn.send(_Start(cfg.model_dump(), eos_token_ids, max_model_len, tp, parent))
                except OSError:  # it already died: _wait_for below reports how
                    continue
            ranks._wait_for("joining", JOIN_TIMEOUT_S)
            group = ranks.group = init_tp_group(tp0, config.device)
        except BaseException as exc:
            failure = ranks.failure()
            ranks.close()
            if failure is not None:
                raise ModelLoadError(failure) from exc
            raise
        ranks._watcher = threading.Thread(target=ranks._watch, name="tp-ranks", daemon=True)
        ranks._watcher.start()
        return ranks, group

    def _wait_for(self, what: str, timeout_s: float) -> None:
        """Before the watcher runs: every follower's ``what`` message, or ``ModelLoadError``
        as soon as one fails or exits."""
        deadline = time.monotonic() + timeout_s
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns, strict=True), start=1):
            while not conn.poll(0.1):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ModelLoadError(
                        self.failure() or f"tensor-parallel rank {rank} did not start in time"
                    )
            try:
                reply = conn.recv()
            except (EOFError, OSError):  # gone (a reset when it died with our message unread)
                try:
                    proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    pass
                raise ModelLoadError(
                    self.failure() or f"tensor-parallel rank {rank} closed its connection"
                ) from None
            if reply[0] != what:
                raise ModelLoadError(f"tensor-parallel rank {rank}: {reply[1]}")

    def _watch(self) -> None:
        live = dict(zip(self._conns, range(1, len(self._conns) + 1), strict=True))
        while live and not self._closed:
            for conn in wait(list(live), timeout=0.5):
                rank = live[conn]
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    del live[conn]
                    if not self._closed:
                        self._fail(f"tensor-parallel rank {rank} exited ({self._exit_of(rank)})")
                    continue
                if reply[0] == "ready":
                    with self._changed:
                        self._ready[rank] = reply[1]
                        if reply[2] is not None:
                            self._shared_pools[rank] = reply[2]
                        self._changed.notify_all()
                else:
                    del live[conn]
                    self._fail(f"tensor-parallel rank {rank}: {reply[1]}")

    def _exit_of(self, rank: int) -> str:
        try:
            code = self._procs[rank - 1].wait(1.0)
        except subprocess.TimeoutExpired:
            return "its connection closed"
        return f"status {code}"

    def _fail(self, message: str) -> None:
        with self._changed:
            if self._failure is None:
                self._failure = message
                logger.error("%s: the tensor-parallel group cannot step without it", message)
            self._changed.notify_all()
        group = self.group
        if group is not None and group.backend == "nccl":
            abort = getattr(torch.distributed.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                try:
                    abort()  # rank 0's pending NCCL collective raises instead of timing out
                except Exception:  # noqa: BLE001 - best effort; the timeout still ends it
                    logger.exception("aborting the NCCL process group failed")

    def wait_ready(self, num_blocks: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until every follower has its runner, with a pool of ``num_blocks`` blocks as
        rank 0's; raises ``ModelLoadError`` with a follower's own error if one failed."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self._ready) < len(self._procs) and self._failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ModelLoadError("tensor-parallel ranks did not become ready in time")
                self._changed.wait(min(left, 0.5))
            if self._failure is not None:
                raise ModelLoadError(self._failure)
        sizes = set(self._ready.values())
        if sizes != {num_blocks}:
            raise ModelLoadError(
                f"tensor-parallel ranks allocated different KV pools: rank 0 {num_blocks} "
                f"blocks, the others {sorted(sizes)}"
            )

    def shared_pools(self) -> list[bytes]:
        """Ranks 1..N-1's pools as each shared it (``EngineConfig.share_rank_pools`` on GPUs):
        ``pickle.loads`` opens one in the process that needs it; [] when not shared."""
        return [self._shared_pools[r] for r in sorted(self._shared_pools)]

    def failure(self) -> str | None:
        """Why a follower failed, if one did: what it reported, or how it exited. Before the
        watcher runs, this reads (and so consumes) the messages waiting on the connections."""
        if self._failure is not None:
            return self._failure
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns, strict=True), start=1):
            if self._watcher is None:
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
        wire = _narrow(plan)
        self._send(("step", wire, None if device_input_ids is None else device_input_ids.numel()))
        if device_input_ids is not None:
            self.group.broadcast(device_input_ids)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        self._send(("copy", src, dst))

    def kill(self, reason: str) -> None:
        """Rank 0 failed inside a step the followers take part in: they are out of step with it
        for good, so end them (a serving loop polling ``filenos`` then stops too)."""
        self._fail(f"rank 0 failed during a step ({reason})")
        for proc in self._procs:
            proc.kill()

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
        if self._watcher is not None:
            self._watcher.join(2.0)
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)


_WIRE_FIELDS = (
    "input_ids",
    "positions",
    "slot_mapping",
    "block_tables",
    "seq_lens",
    "sample_rows",
    "export_block_ids",
)


def _narrow(plan: StepPlan) -> StepPlan:
    """``plan`` with its int64 arrays as int32 for the wire (half the bytes: the block tables
    of a large batch are megabytes a step). Token ids, positions, block and slot ids all fit
    (a pool of 2**31 slots is far beyond any device's memory); ``_widen`` restores them."""
    return _with_dtype(plan, np.int32)


def _widen(plan: StepPlan) -> StepPlan:
    """A received plan with rank 0's dtypes back (int64), as its own upload has them."""
    return _with_dtype(plan, np.int64)


def _with_dtype(plan: StepPlan, dtype) -> StepPlan:
    return dataclasses.replace(
        plan,
        **{
            name: getattr(plan, name).astype(dtype)
            for name in _WIRE_FIELDS
            if getattr(plan, name) is not None
        },
    )


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
            runner.follow(_widen(plan), ids)
        elif kind == "copy":
            runner.copy_block_ids(message[1], message[2])
        else:
            raise RuntimeError(f"unknown message {kind!r} from rank 0")


def _die_with_parent(parent_pid: int) -> None:
    """End this process when rank 0's does, even if it is stuck in a collective then (Linux:
    ``PR_SET_PDEATHSIG``; end-of-file on the connection covers the idle case everywhere).
    ``parent_pid`` 0: rank 0 started this rank from a thread other than its main one, whose end
    would trigger the signal while rank 0 lives on."""
    if not parent_pid:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # rank 0 was gone before the request took effect
        os._exit(1)


def follower_main(fd: int) -> int:
    """A follower rank's life: read its start message, join, build, report, follow.

    A failure is reported to rank 0 and ends the process at once (``os._exit``): leaving an
    NCCL group cleanly can itself hang when a peer is gone.
    """
    conn = Connection(fd)
    start: _Start = conn.recv()
    rank = start.tp.rank
    # A pod's engine core ignores SIGINT/SIGTERM (its front drains first); its ranks must not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(start.parent_pid)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s [tp rank {rank}]: %(message)s",
    )
    config = EngineConfig(**start.config)
    if torch.device(config.device).type == "cpu":
        # The ranks share the host's cores: one rank must not take them all.
        torch.set_num_threads(cpu_threads_per_rank(start.tp.world_size))
    try:
        if torch.device(config.device).type == "cuda":
            torch.cuda.set_device(config.device)  # a device that cannot be used fails here
        conn.send(("joining",))
        group = init_tp_group(start.tp, config.device)
        runner = ModelRunner(
            config,
            load_model_config(config.model),
            start.eos_token_ids,
            start.max_model_len,
            tp=group,
        )
        conn.send(("ready", runner.kv_cache.num_blocks, _shared_pool(config, runner)))
        _follow(conn, runner, group)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then the process ends
        if not isinstance(exc, TPInitError):
            logger.exception("tensor-parallel rank %d failed", rank)
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        os._exit(1)
    group.destroy()
    return 0


def _shared_pool(config: EngineConfig, runner: ModelRunner) -> bytes | None:
    """This rank's KV pool pickled with torch's CUDA IPC reduction (the handle, not the data),
    when the engine shares its ranks' pools (a decode pod on GPUs); None otherwise. The pool
    lives as long as this process: the opener's mapping stays valid while the rank runs."""
    pool = runner.kv_cache.tensor
    if not (config.share_rank_pools and pool.is_cuda):
        return None
    return bytes(ForkingPickler.dumps(pool))


def cpu_threads_per_rank(world_size: int) -> int:
    """Torch threads of each rank of a CPU group: the host's cores shared out."""
    return max(1, (os.cpu_count() or 1) // world_size)
