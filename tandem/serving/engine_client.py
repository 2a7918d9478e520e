"""EngineCoreClient: a pod front process's handle on its engine core process.

It spawns the core (``engine_core``), sends it commands, and turns its per-step updates into
per-request streams: each request has an ``asyncio.Queue`` of items -- ``RequestOutput`` deltas
for requests it detokenizes (decode pods), ``PrefillDone`` for prefill pods, or the exception
that ended the request. Detokenization and stop strings run here, on a mirror ``Sequence`` per
request fed with the core's tokens, through the engine's own ``OutputProcessor`` (so text,
stop strings and logprobs are exactly the offline engine's); a stop string found here ends the
request in the core with an abort.

If the core process dies, every stream in flight ends with ``UpstreamUnavailable`` and
``on_core_exit`` runs (the pod reports NOT_SERVING and exits).
"""

import asyncio
import dataclasses
import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch.multiprocessing
import zmq
import zmq.asyncio

from tandem.api.errors import InvalidRequest, ShuttingDown, TandemError, UpstreamUnavailable
from tandem.api.kv_events import KVEvent
from tandem.api.outputs import (
    OutputKind,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
    merge_deltas,
)
from tandem.api.requests import check_num_output_tokens
from tandem.api.sampling_params import SAMPLING_FIELDS, SamplingParams
from tandem.api.stats import EngineStats
from tandem.api.step_outputs import StepOutputs
from tandem.engine.output_processor import OutputProcessor, RequestState
from tandem.engine.parallel_sampling import ParentRequest, is_parallel
from tandem.engine.sequence import Sequence, SequenceStatus
from tandem.serving import core_protocol as proto
from tandem.serving.engine_core import CoreSpec, EngineInfo, run_engine_core
from tandem.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

StreamItem = RequestOutput | proto.PrefillDone | BaseException

_FINISHED = {
    "stop": SequenceStatus.FINISHED_STOPPED,
    "length": SequenceStatus.FINISHED_LENGTH,
    "abort": SequenceStatus.FINISHED_ABORTED,
}
_EMPTY_STATS = EngineStats(0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0)


class EngineFailure(TandemError):
    """The engine gave up on the request (a failed forward, or the core process died)."""


class OutputStream(asyncio.Queue):
    """One request's items, in order; the consumer may look at the next without taking it."""

    def peek_nowait(self) -> StreamItem:
        return self._queue[0]  # the deque asyncio.Queue keeps for its subclasses


def coalesce(first: StreamItem, stream: OutputStream) -> StreamItem:
    """``first`` merged with the outputs already queued behind it (a consumer that fell behind
    sends one message, nothing dropped, order kept). An exception ends the merge: it stays
    queued, to be taken once the outputs before it were sent."""
    if not isinstance(first, RequestOutput) or stream.empty():
        return first
    outputs = [first]
    while not stream.empty() and isinstance(stream.peek_nowait(), RequestOutput):
        outputs.append(stream.get_nowait())
    return merge_deltas(outputs)


def sampling_fields(params: SamplingParams) -> dict[str, Any]:
    """``params`` as the core rebuilds it (``SamplingParams(**fields)``)."""
    return {name: getattr(params, name) for name in SAMPLING_FIELDS}


class EngineCoreClient:
    def __init__(
        self,
        spec: CoreSpec,
        *,
        tokenizer: Tokenizer | None = None,
        before_release: Callable[[str], Awaitable[None]] | None = None,
        on_kv_events: Callable[[list[KVEvent]], None] | None = None,
        on_core_exit: Callable[[int | None], None] | None = None,
    ) -> None:
        """
        Args:
            spec: the core to start (its sockets' addresses are chosen here).
            tokenizer: detokenize the core's tokens (decode pods); None: no text (prefill pods).
            before_release: what must stop before a given-up request's blocks are freed (a
                decode pod's KV receiver); the core's Abort follows it.
            on_kv_events: prefix-cache events of the core (prefill pods with kvstore).
            on_core_exit: called once if the core process ends while this client runs.
        """
        self._dir = tempfile.mkdtemp(prefix="tandem-core-")
        self.spec = CoreSpec(
            **{
                **{f: getattr(spec, f) for f in spec.__dataclass_fields__},
                "commands_address": f"ipc://{self._dir}/commands",
                "updates_address": f"ipc://{self._dir}/updates",
            }
        )
        self._processor = OutputProcessor(tokenizer) if tokenizer is not None else None
        self._before_release = before_release
        self._on_kv_events = on_kv_events
        self._on_core_exit = on_core_exit
        self._ctx = zmq.asyncio.Context()
        self._commands = self._ctx.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.SNDHWM, 0)
        self._commands.bind(self.spec.commands_address)
        self._updates = self._ctx.socket(zmq.PULL)
        self._updates.setsockopt(zmq.RCVHWM, 0)
        self._updates.bind(self.spec.updates_address)
        self._call_ids = itertools.count()
        self._calls: dict[int, asyncio.Future] = {}
        self._core_ids: dict[str, str] = {}
        """Open request id -> its id in the core, new for every stream (``open_stream``): rows
        and failures of a stream that ended can never reach a later one with the same id."""
        self._core_id_seq = itertools.count()
        self._streams: dict[str, OutputStream] = {}
        """By core id."""
        self._mirrors: dict[str, RequestState] = {}
        """By core id (a parallel-sampling request's: by each sample's id in the core)."""
        self._families: dict[str, ParentRequest] = {}
        """Parallel-sampling requests (n or best_of above 1) by core id: their streams carry
        every sample's outputs, each under its index (``parallel_sampling``)."""
        self._sample_of: dict[str, tuple[str, int]] = {}
        """A mirrored sample's id in the core -> (its request's core id, its index)."""
        self._releasing: dict[str, asyncio.Task] = {}
        """Requests given up whose release (KV writes stopped, then the core's Abort) is under
        way: their ids stay taken until it is done."""
        self._draining = False
        self._stopping = False
        self._dead: UpstreamUnavailable | None = None
        self._process = None
        self._receiver: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.info: EngineInfo | None = None
        self.stats: EngineStats = _EMPTY_STATS
        """The core's latest snapshot (refreshed with every update it sends)."""
        self.steps = 0
        self._last_progress = time.monotonic()

    # ---- lifetime -------------------------------------------------------------------------------

    async def start(self) -> EngineInfo:
        """Spawn the core and wait until its engine is built (model loaded, graphs captured).

        Raises:
            TandemError: the core failed to start (its error, e.g. a bad model directory).
        """
        self._loop = asyncio.get_running_loop()
        mp = torch.multiprocessing.get_context("spawn")
        parent, child = mp.Pipe()
        self._process = mp.Process(
            target=run_engine_core,
            args=(self.spec, child),
            name=f"{self.spec.role}-engine-core",
            daemon=True,
        )
        self._process.start()
        logger.info(
            "engine core process %d starting: loading %s on %s",
            self._process.pid,
            self.spec.engine.model,
            self.spec.engine.device,
        )
        child.close()
        self._handshake = parent  # closes when this process ends: the core then exits too
        reply = await self._loop.run_in_executor(None, self._wait_ready, parent)
        if isinstance(reply, proto.ErrorInfo):
            await self._reap()
            raise proto.error_from_info(reply)
        self.info = reply
        # An idle core sends no update: until its first, it is an empty pool of this size (a
        # pod reporting 0 free blocks would get no request from a router choosing by room).
        self.stats = dataclasses.replace(
            _EMPTY_STATS, num_free_blocks=reply.num_kv_blocks, num_total_blocks=reply.num_kv_blocks
        )
        self._loop.add_reader(self._process.sentinel, self._core_exited)
        self._receiver = asyncio.create_task(self._receive(), name="engine-core-updates")
        logger.info("engine core process %d ready", self._process.pid)
        return reply

    def _wait_ready(self, conn):
        while not conn.poll(0.5):
            if not self._process.is_alive():
                code = self._process.exitcode
                return proto.ErrorInfo("UpstreamUnavailable", f"engine core exited with {code}")
        return conn.recv()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def stop(self) -> None:
        """Stop the core (it finishes nothing more) and release the sockets."""
        self._stopping = True
        if self._releasing:  # their Aborts first (KV writes into their blocks stop before)
            await asyncio.wait(list(self._releasing.values()), timeout=10)
        if self._process is not None:
            self._loop.remove_reader(self._process.sentinel)
            if self._process.is_alive():
                self._send(proto.Shutdown())
            await self._reap()
        if self._receiver is not None:
            self._receiver.cancel()
        self._fail_everything(ShuttingDown("this pod is shutting down"))
        self._commands.close(linger=0)
        self._updates.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _reap(self) -> None:
        proc = self._process
        await self._loop.run_in_executor(None, proc.join, 10)
        if proc.is_alive():
            logger.warning("engine core %d did not stop in 10 s; killing it", proc.pid)
            proc.kill()
            await self._loop.run_in_executor(None, proc.join, 5)

    def _core_exited(self) -> None:
        self._loop.remove_reader(self._process.sentinel)
        # The sentinel closes as the process ends, a moment before it can be reaped.
        self._process.join(2)
        code = self._process.exitcode
        if self._stopping:
            return
        logger.error("the engine core process exited (code %s); failing every request", code)
        self._dead = UpstreamUnavailable(f"the engine core process exited (code {code})")
        self._fail_everything(self._dead)
        if self._on_core_exit is not None:
            self._on_core_exit(code)

    def _fail_everything(self, exc: TandemError) -> None:
        for future in self._calls.values():
            if not future.done():
                future.set_exception(exc)
        self._calls.clear()
        for core_id in list(self._streams):
            self._fail_core(core_id, exc)

    # ---- streams --------------------------------------------------------------------------------

    def start_draining(self) -> None:
        """Refuse new requests from now on; the ones in flight carry on (a pod shutting down)."""
        self._draining = True

    @property
    def open_streams(self) -> int:
        """Requests in flight on this pod (each holds an output stream until it ends)."""
        return len(self._streams)

    @property
    def seconds_since_progress(self) -> float:
        """0 while idle; otherwise how long since the core last reported a step or command."""
        if not (self.stats.num_running or self.stats.num_waiting):
            return 0.0
        return time.monotonic() - self._last_progress

    def open_stream(self, request_id: str) -> OutputStream:
        """The queue of the request's items (open it before adding the request).

        Raises:
            ShuttingDown: the pod is draining. UpstreamUnavailable: the core is gone.
            InvalidRequest: a request with this id is already open here (checked first, so a
                duplicate never touches the request that owns the id).
        """
        if self._dead is not None:
            raise self._dead
        if self._draining:
            raise ShuttingDown("this pod is shutting down")
        if request_id in self._core_ids or request_id in self._releasing:
            raise InvalidRequest(
                f"request id {request_id!r} is already in use on this pod", param="request_id"
            )
        core_id = f"{request_id}#{next(self._core_id_seq)}"
        self._core_ids[request_id] = core_id
        q = OutputStream()
        self._streams[core_id] = q
        return q

    def end_stream(self, request_id: str, *, finished: bool) -> None:
        """Close the request's stream; unless it finished, release what it still holds
        (``before_release``, then the core's Abort). Every exit path of a request ends here."""
        core_id = self._core_ids.pop(request_id, None)
        if core_id is None:
            return
        self._streams.pop(core_id, None)
        self._forget(core_id)
        if not finished and self._dead is None:
            self._releasing[request_id] = asyncio.ensure_future(self._release(request_id, core_id))

    async def _release(self, request_id: str, core_id: str) -> None:
        try:
            if self._before_release is not None:
                await self._before_release(request_id)
        except Exception:  # noqa: BLE001 - the blocks must be freed all the same
            logger.exception("releasing request %s", request_id)
        finally:
            self._abort_core(core_id)
            self._releasing.pop(request_id, None)

    def _core_id(self, request_id: str) -> str:
        core_id = self._core_ids.get(request_id)
        if core_id is None:
            raise InvalidRequest(f"request {request_id!r} is not open here", param="request_id")
        return core_id

    def fail(self, request_id: str, exc: BaseException) -> None:
        """End the request's stream with ``exc``."""
        core_id = self._core_ids.get(request_id)
        if core_id is not None:
            self._fail_core(core_id, exc)

    def _forget(self, core_id: str) -> None:
        """Drop the request's mirrors (every sample's, for a parallel-sampling request)."""
        self._mirrors.pop(core_id, None)
        family = self._families.pop(core_id, None)
        for sid in family.sample_ids if family is not None else ():
            self._mirrors.pop(sid, None)
            self._sample_of.pop(sid, None)

    def _fail_core(self, core_id: str, exc: BaseException) -> None:
        """End the stream of the request ``core_id`` is (or of the request whose sample it is).
        A failed sample fails its request."""
        core_id = self._sample_of.get(core_id, (core_id, 0))[0]
        self._forget(core_id)
        q = self._streams.get(core_id)
        if q is not None:
            q.put_nowait(exc)

    def _deliver(self, core_id: str, item: StreamItem) -> None:
        q = self._streams.get(core_id)
        if q is not None:
            q.put_nowait(item)

    # ---- commands -------------------------------------------------------------------------------

    def _send(self, *commands: proto.Command) -> None:
        self._commands.send(proto.command_encoder.encode(list(commands)), copy=False)

    async def _call(self, make: Callable[[int], proto.Command]):
        if self._dead is not None:
            raise self._dead
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._calls[call_id] = future
        self._send(make(call_id))
        return await future

    def _mirror(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        num_output_tokens: int = 0,
        num_text_chars: int | None = None,
    ) -> str:
        """The request's core id, with its mirror if this client detokenizes.

        A migrated request's mirror starts with its output so far (``num_output_tokens``) as
        text already sent, up to ``num_text_chars`` characters (what its client has): the
        stream goes on from there, the held-back rest of that text included.
        """
        core_id = self._core_id(request_id)
        if self._processor is not None and is_parallel(params):
            self._mirror_samples(core_id, prompt, params)
        elif self._processor is not None:
            split = len(prompt) - num_output_tokens
            seq = Sequence(
                request_id,
                prompt[:split],
                params,
                arrival_time=time.monotonic(),
                arrival_index=0,
                output_token_ids=prompt[split:],
            )
            metrics = RequestMetrics(arrival_time=seq.arrival_time)
            state = self._processor.new_state(seq, OutputKind.DELTA, None, metrics)
            if num_text_chars is not None:
                state.sent_chars = min(num_text_chars, len(state.text))
            self._mirrors[core_id] = state
        return core_id

    def _mirror_samples(self, core_id: str, prompt: list[int], params: SamplingParams) -> None:
        """A mirror per sample of a parallel-sampling request, under the ids the core gives its
        samples; their outputs reach the request's stream through its ``ParentRequest``."""
        parent = ParentRequest(core_id, params, OutputKind.DELTA)
        now = time.monotonic()
        for i, sid in enumerate(parent.sample_ids):
            seq = Sequence(sid, prompt, parent.sample_params(i), arrival_time=now, arrival_index=0)
            metrics = RequestMetrics(arrival_time=now)
            self._mirrors[sid] = self._processor.new_state(seq, parent.sample_kind(), None, metrics)
            self._sample_of[sid] = (core_id, i)
        self._families[core_id] = parent

    async def add(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        require_room: bool = False,
        kv_target: proto.KVTargetSpec | None = None,
        trace_carrier: dict[str, str] | None = None,
        num_output_tokens: int = 0,
        num_text_chars: int | None = None,
    ) -> None:
        """Queue a request in the core.

        Args:
            num_output_tokens: a migrated request: the last this many ``prompt`` tokens are
                output it generated already (``LLMEngine.add_request``).
            num_text_chars: of that output's text, the characters its client has (``_mirror``).

        Raises:
            InvalidRequest: refused by the engine's validation. CapacityExceeded: with
                ``require_room``, its blocks do not fit now.
        """
        core_id = self._checked_mirror(
            request_id, prompt, params, num_output_tokens, num_text_chars
        )
        try:
            await self._call(
                lambda call_id: proto.AddRequest(
                    call_id,
                    core_id,
                    prompt,
                    sampling_fields(params),
                    priority,
                    cache_salt,
                    require_room,
                    kv_target,
                    trace_carrier,
                    num_output_tokens,
                )
            )
        except BaseException:
            self._forget(core_id)
            raise

    async def reserve(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        num_output_tokens: int = 0,
        num_text_chars: int | None = None,
    ) -> tuple[list[int], int]:
        """Hold the prompt's blocks for a remote prefill: (block ids, prompt tokens cached here).

        ``num_output_tokens``, ``num_text_chars``: a migrated request's, as ``add``.

        Raises:
            InvalidRequest, CapacityExceeded: as the engine's ``reserve_remote_prefill``.
        """
        core_id = self._checked_mirror(
            request_id, prompt, params, num_output_tokens, num_text_chars
        )
        try:
            block_ids, cached = await self._call(
                lambda call_id: proto.ReserveRemote(
                    call_id,
                    core_id,
                    prompt,
                    sampling_fields(params),
                    priority,
                    cache_salt,
                    num_output_tokens,
                )
            )
        except BaseException:
            self._forget(core_id)
            raise
        return block_ids, cached

    def _checked_mirror(self, request_id, prompt, params, num_output_tokens, num_text_chars):
        """``_mirror``, once the output count is one the engine accepts (it checks it again)."""
        check_num_output_tokens(num_output_tokens, len(prompt), params.max_tokens)
        return self._mirror(request_id, prompt, params, num_output_tokens, num_text_chars)

    async def complete_remote(
        self,
        request_id: str,
        first_token_id: int,
        *,
        logprob: TokenLogprob | None,
        num_cached_tokens: int,
        prompt_logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        """The reserved blocks hold the prompt's KV: the request joins the decode batch.
        ``prompt_logprobs``: the prefill pod's (its first output carries them).

        Raises:
            InvalidRequest: the request is not open here (it ended meanwhile).
        """
        core_id = self._core_id(request_id)
        await self._call(
            lambda call_id: proto.CompleteRemote(
                call_id, core_id, first_token_id, logprob, num_cached_tokens, prompt_logprobs
            )
        )

    async def kv_snapshot(self) -> list[bytes]:
        """Every block hash cached in the core now (its pending KV events are dropped)."""
        return await self._call(lambda call_id: proto.KVSnapshot(call_id))

    def _abort_core(self, core_id: str) -> None:
        """Free whatever the request holds in the core (no answer)."""
        if self._dead is None and not self._commands.closed:
            self._send(proto.Abort(core_id))

    # ---- updates from the core ------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            raw = await self._updates.recv(copy=False)
            try:
                update = proto.update_decoder.decode(raw.buffer)
            except Exception:  # noqa: BLE001 - requests' state is lost: end them all
                logger.exception("an update from the engine core could not be decoded")
                self._fail_everything(EngineFailure("an engine core update was lost"))
                continue
            self._on_update(update)

    def _on_update(self, update: proto.CoreUpdate) -> None:
        self.stats = update.stats
        self.steps = update.steps
        self._last_progress = time.monotonic()
        for reply in update.replies:
            future = self._calls.pop(reply.call_id, None)
            if future is None or future.done():
                continue
            if reply.error is not None:
                future.set_exception(proto.error_from_info(reply.error))
            else:
                future.set_result(reply.value)
        for failure in update.failures:
            for core_id in failure.request_ids:
                self._fail_core(core_id, EngineFailure(failure.message))
        for done in update.prefills:
            self._deliver(done.request_id, done)
        if update.outputs is not None:
            self._detokenize(update.outputs)
        if update.kv_events and self._on_kv_events is not None:
            self._on_kv_events(proto.events_from_wire(update.kv_events))

    def _detokenize(self, outputs: StepOutputs) -> None:
        """Feed each mirrored request its new tokens; deliver the text deltas. (Walks the
        columns by index: this runs for every request of every step.)"""
        mirrors = self._mirrors
        start = 0
        for i, rid in enumerate(outputs.request_ids):
            end = start + outputs.num_new_tokens[i]
            begin, start = start, end
            state = mirrors.get(rid)
            if state is None:
                continue  # not mirrored here, or already ended (a stop string, an abort)
            try:
                self._feed(state, outputs, i, begin, end)
            except Exception:  # noqa: BLE001 - one request's failure is not the others'
                logger.exception("detokenizing request %s failed", rid)
                self._fail_core(rid, EngineFailure("detokenizing this request failed"))
                self._abort_core(rid)

    def _feed(self, state: RequestState, outputs: StepOutputs, i: int, begin: int, end: int):
        """One request's part of a step: tokens into its mirror, its text delta out."""
        processor, rid, seq = self._processor, outputs.request_ids[i], state.seq
        token_ids, logprobs = outputs.token_ids, outputs.logprobs
        seq.num_cached_tokens = outputs.num_cached_tokens[i]
        seq.num_preemptions = outputs.num_preemptions[i]
        if state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = outputs.scheduled_times[i]
        if outputs.prompt_logprobs[i] is not None:  # the request's first tokens
            seq.prompt_logprobs = outputs.prompt_logprobs[i]
        finish = outputs.finish_reasons[i]
        stop_string = False
        for j in range(begin, end):
            seq.token_ids.append(token_ids[j])
            if j == end - 1 and finish is not None:
                seq.status = _FINISHED[finish]
                seq.stop_reason = outputs.stop_token_ids[i]
            stop = processor.on_new_token(state, logprobs[j])
            if stop is not None:  # as LLMEngine._apply_stop: the string outranks a length end
                seq.status = stop
                stop_string = True
                break
        if begin == end and finish is not None:
            seq.status = _FINISHED[finish]
        out = processor.make_output(state)
        target = rid
        sample = self._sample_of.get(rid)
        if sample is not None:  # a sample's output, as its request's (under its index)
            target, index = sample
            out = self._families[target].on_output(index, out) if out is not None else None
            if seq.is_finished:
                del self._sample_of[rid]
        if out is not None:
            self._deliver(target, out)
        if seq.is_finished:
            del self._mirrors[rid]
            if stop_string and finish is None:
                self._abort_core(rid)  # the core would generate on
