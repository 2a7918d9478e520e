"""The engine core process: a pod's ``LLMEngine`` alone in its own interpreter (vLLM V1's
EngineCore).

The pod's front process (gRPC server, KV control plane, detokenization) spawns it with a
``CoreSpec`` and talks to it over two ZeroMQ sockets: commands in (``core_protocol``), one
``CoreUpdate`` out per step. Nothing else runs here, so nothing else takes this interpreter's GIL
between steps: no gRPC server, no HTTP, no text. NOTE: a prefill core also runs its KV sender,
which needs the engine's pages as each layer group finishes (memory transports copy them
straight into the decode pod's pool; gRPC stages them for PushKV streams).

The loop sleeps on its sockets while there is nothing to step (no busy polling) and exits when
told to or when its front process goes away (the handshake pipe closes).
"""

import logging
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal

import msgspec
import torch
import zmq
from opentelemetry import propagate

from tandem import telemetry
from tandem.api import proto_convert
from tandem.api.errors import CapacityExceeded, KVPoolUnmappable, TandemError
from tandem.api.sampling_params import SamplingParams
from tandem.api.step_outputs import StepOutputs
from tandem.engine.config import EngineConfig
from tandem.engine.kv_cache import KVCacheSpec
from tandem.engine.llm_engine import EngineStepError, LLMEngine
from tandem.engine.parallel_sampling import prefill_params
from tandem.proto.common.v1 import common_pb2
from tandem.serving import core_protocol as proto
from tandem.transfer.push_streams import KVTarget, TransferResult
from tandem.transfer.sender import KVSender
from tandem.transfer.transport import (
    TransportUnavailable,
    descriptor_decoder,
    descriptor_encoder,
    export_pool,
)

logger = logging.getLogger(__name__)

IDLE_WAIT_MS = 5
"""How long to sleep on the sockets after a step that could schedule nothing (every waiting
request needs blocks that others hold): no busy loop while stalled."""

STATS_INTERVAL_S = 0.1
"""Steps that produce nothing to report (chunks of a long prefill, stalled steps) still send the
stats this often, so the front's GetStats (and the router's stall detection) stay current."""


@dataclass(frozen=True, slots=True)
class SenderOptions:
    """A prefill core's KV sender (see ``PrefillSettings``)."""

    layers_per_group: int
    max_chunk_bytes: int
    num_streams: int
    push_timeout_s: float
    staging_buffers: int


@dataclass(frozen=True, slots=True)
class CoreSpec:
    """Everything an engine core process needs to start (sent when it is spawned)."""

    role: Literal["prefill", "decode"]
    engine: EngineConfig
    commands_address: str = ""
    updates_address: str = ""
    """ZeroMQ addresses the front process binds (``EngineCoreClient`` chooses them)."""
    pod_id: str | None = None
    enable_kv_events: bool = False
    sender: SenderOptions | None = None
    """Prefill cores: stream each prompt's KV to the decode pod its request names."""
    share_kv_pool: bool = False
    """Decode cores: hand the KV pool to the front process, whose KV receiver writes pushed
    pages straight into it (shared memory on CPU, a CUDA IPC handle on GPUs)."""


@dataclass(frozen=True)
class EngineInfo:
    """What the front process learns from its core at start-up (through the handshake pipe)."""

    pid: int
    block_size: int
    num_kv_blocks: int
    max_model_len: int
    vocab_size: int
    enable_prefix_caching: bool
    fingerprint: str
    kv_dtype: str
    device: str
    async_scheduling: bool
    kv_spec: KVCacheSpec
    """Rank 0's pool (under tensor parallelism every rank's pool has this shape)."""
    kv_wire_spec: KVCacheSpec
    """The pages as KV transfers carry them: every kv head of the model."""
    tensor_parallel_size: int = 1
    """Ranks of the engine; above 1 a shared CPU pool has a file per rank besides rank 0's
    (``kv_cache.rank_pool_path``), each holding that rank's kv heads."""
    kv_pool: torch.Tensor | None = None
    """The shared KV pool (``share_kv_pool``)."""
    engine_event: bytes | None = None
    """CUDA IPC handle of an event the core records on its stream whenever it hands blocks to a
    remote prefill: pushed pages are written after it (a step in flight may still write there)."""
    kv_pool_path: str | None = None
    """A CPU pool allocated in a shared-memory file (``EngineConfig.kv_pool_path``): the front
    maps it by name (``kv_pool`` is then None: such memory does not travel through pickling)."""
    kv_rank_pools: list[bytes] = field(default_factory=list)
    """GPUs, tensor parallelism: ranks 1..N-1's pools as each rank shared it over CUDA IPC
    (``LLMEngine.rank_kv_pools``; ``pickle.loads`` maps one). On CPU the front maps the ranks'
    pool files instead."""
    kv_exports: list[bytes] = field(default_factory=list)
    """Encoded ``PoolDescriptor``s the core made of its pool (cuda-ipc: only the owner can)."""


@dataclass(slots=True)
class _Outbox:
    """What the next ``CoreUpdate`` carries besides the step's tokens and the stats."""

    replies: list[proto.Reply] = field(default_factory=list)
    failures: list[proto.Failure] = field(default_factory=list)
    prefills: list[proto.PrefillDone] = field(default_factory=list)
    touched: bool = False
    """A command ran (stats changed even if nothing else did)."""

    def is_empty(self) -> bool:
        return not (self.touched or self.replies or self.failures or self.prefills)


def run_engine_core(spec: CoreSpec, handshake: Connection) -> None:
    """The process's entry point: build the engine, tell the front about it, serve until told
    to stop or the front goes away."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s"
    )
    # Ctrl-C or a SIGTERM sent to the whole process group is the front's to handle: it drains
    # the pod, then tells the core to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    telemetry.setup_tracing(spec.role, instance=spec.pod_id)
    try:
        core = EngineCore(spec)
    except BaseException as exc:
        handshake.send(proto.error_info(exc))
        raise
    handshake.send(core.info())
    try:
        core.run(handshake)
    finally:
        core.close()


class RankFailed(RuntimeError):
    """Another tensor-parallel rank of this engine failed or exited: the core stops."""


class EngineCore:
    def __init__(self, spec: CoreSpec) -> None:
        self.spec = spec
        self.engine = LLMEngine(
            spec.engine, enable_kv_events=spec.enable_kv_events, detokenize=False
        )
        try:
            self._attach_kv(spec)
        except BaseException:
            self.engine.close()  # the other tensor-parallel ranks, if any
            raise
        self.steps = 0
        self._last_update = 0.0
        self._targets: dict[str, KVTarget] = {}
        """Prefill cores: each request's target (its id and token on the decode pod, named in
        the transfer's end)."""
        self._outbox = _Outbox()
        self._transfers_done: queue.SimpleQueue[proto.PrefillDone] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._zmq = zmq.Context()
        self._commands = self._zmq.socket(zmq.PULL)
        self._commands.connect(spec.commands_address)
        self._updates = self._zmq.socket(zmq.PUSH)
        self._updates.setsockopt(zmq.SNDHWM, 0)  # never drop or block: the front drains them
        self._updates.connect(spec.updates_address)

    def _attach_kv(self, spec: CoreSpec) -> None:
        """The pod's KV side: a prefill pod's sender, a decode pod's shared pool, and a decode
        pod's CUDA graphs, captured before serving."""
        runner = self.engine.runner
        self.sender: KVSender | None = None
        if spec.sender is not None:
            o = spec.sender
            self.sender = KVSender(
                runner.kv_wire_spec,
                self.engine.fingerprint.digest(),
                layers_per_group=o.layers_per_group,
                max_chunk_bytes=o.max_chunk_bytes,
                num_streams=o.num_streams,
                push_timeout_s=o.push_timeout_s,
                staging_buffers=o.staging_buffers,
                device=runner.device,
                memory_transports=runner.tp.world_size == 1,
            )
            self.sender.attach_pool(runner.kv_cache.tensor)
            self.engine.set_kv_layer_hook(self.sender)
        self._engine_event: torch.cuda.Event | None = None
        self._kv_exports: list[bytes] = []
        if spec.share_kv_pool:
            pool = runner.kv_cache.tensor
            if runner.device.type == "cuda":
                self._engine_event = torch.cuda.Event(interprocess=True)
                self._engine_event.record(torch.cuda.current_stream(runner.device))
                # Only the allocation's owner can export it (CUDA refuses to re-export).
                try:
                    export = export_pool("cuda-ipc", pool)
                    self._kv_exports.append(descriptor_encoder.encode(export.descriptor()))
                except TransportUnavailable as exc:
                    logger.warning("the KV pool cannot be exported over cuda-ipc: %s", exc)
            elif runner.kv_cache.path is None:
                # In place: the model's views of the pool see the shared memory too.
                pool.share_memory_()
        if spec.role == "decode":
            runner.capture_decode_graphs()  # before serving: no request pays for the captures

    def info(self) -> EngineInfo:
        e = self.engine
        return EngineInfo(
            pid=os.getpid(),
            block_size=e.config.block_size,
            num_kv_blocks=e.limits.num_kv_blocks,
            max_model_len=e.limits.max_model_len,
            vocab_size=e.model_config.vocab_size,
            enable_prefix_caching=e.config.enable_prefix_caching,
            fingerprint=e.fingerprint.digest(),
            kv_dtype=e.fingerprint.dtype,
            device=str(e.runner.device),
            async_scheduling=e.async_scheduling,
            kv_spec=e.runner.kv_spec,
            kv_wire_spec=e.runner.kv_wire_spec,
            tensor_parallel_size=e.runner.tp.world_size,
            kv_pool=(
                e.runner.kv_cache.tensor
                if self.spec.share_kv_pool and e.runner.kv_cache.path is None
                else None
            ),
            engine_event=(
                bytes(self._engine_event.ipc_handle()) if self._engine_event is not None else None
            ),
            kv_pool_path=e.runner.kv_cache.path if self.spec.share_kv_pool else None,
            kv_rank_pools=e.rank_kv_pools(),
            kv_exports=self._kv_exports,
        )

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, handshake: Connection) -> None:
        poller = zmq.Poller()
        poller.register(self._commands, zmq.POLLIN)
        poller.register(handshake.fileno(), zmq.POLLIN)  # readable only once the front is gone
        poller.register(self._wake_r, zmq.POLLIN)
        ranks = self.engine.rank_filenos()  # readable only when a tensor-parallel rank failed
        for fd in ranks:
            poller.register(fd, zmq.POLLIN)
        stalled = False
        while True:
            if not self.engine.has_unfinished_requests():
                timeout = None
            else:
                timeout = IDLE_WAIT_MS if stalled else 0
            ready = dict(poller.poll(timeout))
            if handshake.fileno() in ready:
                logger.warning("the pod's front process went away; stopping")
                return
            if any(fd in ready for fd in ranks):
                # The group cannot step without it: exit, so the pod is restarted whole.
                failure = self.engine.rank_failure() or "a tensor-parallel rank failed"
                raise RankFailed(failure)
            if self._commands in ready and not self._execute_commands():
                return
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
                while not self._transfers_done.empty():
                    self._outbox.prefills.append(self._transfers_done.get())
            if self._outbox.replies or self._outbox.prefills:
                # Out before the step: a reservation, an admission, a remote prefill's first
                # token or a finished prefill would otherwise wait a whole step.
                self._flush(stepped=False)
            stepped = self.engine.has_unfinished_requests()
            if stepped:
                self._step()
                stalled = self.engine.last_step_num_tokens == 0
            self._flush(stepped=stepped)

    def _execute_commands(self) -> bool:
        """Run every command waiting on the socket; False once told to shut down."""
        while True:
            try:
                raw = self._commands.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            for cmd in proto.commands_decoder.decode(raw):
                if isinstance(cmd, proto.Shutdown):
                    return False
                self._outbox.touched = True
                self._execute(cmd)

    def _execute(self, cmd: proto.Command) -> None:
        if isinstance(cmd, proto.Abort):  # answered by nobody: a failure is only logged
            try:
                self._release(cmd.request_id)
            except Exception:  # noqa: BLE001 - the loop must go on
                logger.exception("aborting request %s failed", cmd.request_id)
            return
        call_id = cmd.call_id
        try:
            value = self._run_command(cmd)
        except Exception as exc:  # noqa: BLE001 - the front's caller receives it
            if not isinstance(exc, TandemError):
                logger.exception("command %s failed", type(cmd).__name__)
            self._outbox.replies.append(proto.Reply(call_id, error=proto.error_info(exc)))
            return
        self._outbox.replies.append(proto.Reply(call_id, value=value))

    def _run_command(self, cmd: proto.Command):
        engine = self.engine
        if isinstance(cmd, proto.AddRequest):
            self._add(cmd)
            return None
        if isinstance(cmd, proto.ReserveRemote):
            r = engine.reserve_remote_prefill(
                cmd.request_id,
                cmd.prompt_token_ids,
                SamplingParams(**cmd.sampling),
                priority=cmd.priority,
                cache_salt=cmd.cache_salt,
                num_output_tokens=cmd.num_output_tokens,
            )
            if self._engine_event is not None:
                self._engine_event.record(torch.cuda.current_stream(engine.runner.device))
            return [list(r.block_ids), r.num_cached_tokens]
        if isinstance(cmd, proto.CompleteRemote):
            engine.complete_remote_prefill(
                cmd.request_id,
                cmd.first_token_id,
                logprob=cmd.logprob,
                num_cached_tokens=cmd.num_cached_tokens,
                prompt_logprobs=cmd.prompt_logprobs,
            )
            return None
        if isinstance(cmd, proto.KVSnapshot):
            engine.take_kv_events()  # superseded by the snapshot
            return engine.cached_block_hashes()
        raise TypeError(f"unknown command {type(cmd).__name__}")

    def _add(self, cmd: proto.AddRequest) -> None:
        engine = self.engine
        params = SamplingParams(**cmd.sampling)
        if cmd.kv_target is not None:
            if self.sender is None:
                raise TypeError("a KV target sent to an engine core without a KV sender")
            # One prefill and one first token whatever n is: the decode pod runs the samples.
            params = prefill_params(params)
            context = propagate.extract(cmd.trace_carrier) if cmd.trace_carrier else None
            target = self._kv_target(cmd.kv_target)
            try:
                self.sender.start(cmd.request_id, target, len(cmd.prompt_token_ids), context)
            except TransportUnavailable as exc:
                # The front claimed the lease for this transport (it checked it could reach the
                # pool): release it at once rather than let it run out.
                self.sender.notify_abort(target)
                raise KVPoolUnmappable(
                    f"KV transport {target.transport} to {target.address} failed here: {exc}"
                ) from None
            self._targets[cmd.request_id] = target
        try:
            engine.add_request(
                cmd.request_id,
                cmd.prompt_token_ids,
                params,
                priority=cmd.priority,
                cache_salt=cmd.cache_salt,
                num_output_tokens=cmd.num_output_tokens,
            )
        except BaseException:
            if cmd.kv_target is not None:
                self.sender.abort(cmd.request_id)
                self._targets.pop(cmd.request_id, None)
            raise
        n = len(cmd.prompt_token_ids)
        if cmd.require_room and not engine.has_room_for(n):
            engine.abort_request(cmd.request_id)
            bm = engine.block_manager
            raise CapacityExceeded(
                f"no room for a {n}-token prompt now: "
                f"{bm.num_free_blocks} of {bm.num_total_blocks} blocks free"
            )

    def _kv_target(self, t: proto.KVTargetSpec) -> KVTarget:
        return KVTarget(
            t.address,
            t.request_id,
            t.skip_blocks,
            self.engine.fingerprint.digest(),
            transfer_token=t.transfer_token,
            transport=t.transport,
            descriptor=(
                descriptor_decoder.decode(t.descriptor)
                if t.descriptor is not None and t.transport != "grpc"
                else None
            ),
            block_ids=tuple(t.block_ids),
            lease_expires_unix_ms=t.lease_expires_unix_ms,
            incarnation=t.incarnation,
            checksum=t.checksum,
        )

    def _release(self, request_id: str) -> None:
        """Give up a request: stop its KV transfer (prefill), then free its blocks."""
        if self.sender is not None:
            self.sender.abort(request_id)
            self._targets.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _step(self) -> None:
        try:
            self.engine.step()
        except EngineStepError as exc:
            # The engine already aborted that step's requests; the others carry on.
            for rid in exc.request_ids:
                if self.sender is not None:
                    self.sender.abort(rid)
                    self._targets.pop(rid, None)
            self._outbox.failures.append(proto.Failure(list(exc.request_ids), str(exc)))
        except Exception as exc:
            logger.exception("engine step failed unexpectedly; giving up every request")
            ids = self.engine.request_ids()
            for rid in ids:
                # Blocks a prefill pod may still be writing into are freed by the front once
                # its writes stopped (its release ends with an Abort).
                if not self.engine.is_waiting_for_kv(rid):
                    self._release(rid)
            self._outbox.failures.append(proto.Failure(ids, f"engine step failed: {exc}"))
        self.steps += 1

    def _flush(self, *, stepped: bool) -> None:
        """Send what happened since the last update. A step with nothing to report still sends
        the stats now and then (``STATS_INTERVAL_S``): the router watches them move."""
        outputs = self.engine.take_step_outputs()
        if self.sender is not None and len(outputs):
            self._finish_transfers(outputs)
            outputs = StepOutputs()  # a prefill pod's front needs only PrefillDone
        events = self.engine.take_kv_events() if self.spec.enable_kv_events else []
        box = self._outbox
        now = time.monotonic()
        if not len(outputs) and not events and box.is_empty():
            if not stepped or now - self._last_update < STATS_INTERVAL_S:
                return
        update = proto.CoreUpdate(
            stats=self.engine.get_stats(),
            steps=self.steps,
            outputs=outputs if len(outputs) else None,
            replies=box.replies,
            failures=box.failures,
            prefills=box.prefills,
            kv_events=proto.events_to_wire(events),
        )
        self._outbox = _Outbox()
        self._last_update = now
        self._updates.send(proto.update_encoder.encode(update), copy=False)

    # ---- prefill: KV transfers ------------------------------------------------------------------

    def _finish_transfers(self, outputs: StepOutputs) -> None:
        """Close the KV transfer of every prefill that produced its first token; its result
        reaches the front as a ``PrefillDone`` once the decode pod acknowledged it."""
        now = time.monotonic()
        for row in outputs.rows():
            if row.finish_reason is None or row.finish_reason == "abort" or not row.token_ids:
                continue
            target_id = self._targets.pop(row.request_id, None)
            if target_id is None:  # its transfer was aborted meanwhile
                continue
            end = common_pb2.KVTransferEnd(
                request_id=target_id.request_id,
                transfer_token=target_id.transfer_token,
                model_fingerprint=self.engine.fingerprint.digest(),
                first_token_id=row.token_ids[0],
                num_cached_tokens=row.num_cached_tokens,
            )
            lp = row.logprobs[0]
            if lp is not None:
                end.first_token_logprob.CopyFrom(proto_convert.logprob_to_proto(lp))
            if row.prompt_logprobs is not None:  # to the decode pod, which streams them first
                end.prompt_logprobs.extend(map(proto_convert.logprob_to_proto, row.prompt_logprobs))
            done = proto.PrefillDone(
                request_id=row.request_id,
                first_token_id=row.token_ids[0],
                num_cached_tokens=row.num_cached_tokens,
                scheduled_time=row.scheduled_time,
                first_token_time=now,
            )
            future = self.sender.finish(row.request_id, end)
            future.add_done_callback(lambda f, d=done: self._transfer_finished(d, f))

    def _transfer_finished(self, done: proto.PrefillDone, future) -> None:
        """A sender thread: hand the transfer's outcome to the loop and wake it."""
        try:
            result: TransferResult = future.result()
            done = msgspec.structs.replace(
                done,
                transfer_bytes=result.bytes,
                transfer_chunks=result.chunks,
                transfer_seconds=result.seconds,
                transport=result.transport,
            )
        except BaseException as exc:  # noqa: BLE001 - the front's Prefill call reports it
            done = msgspec.structs.replace(done, error=proto.error_info(exc))
        self._transfers_done.put(done)
        os.write(self._wake_w, b"\0")

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        self.engine.close()  # the other tensor-parallel ranks, if any
        self._commands.close(linger=0)
        self._updates.close(linger=1000)
        self._zmq.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
