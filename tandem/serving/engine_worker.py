"""EngineWorker: runs an LLMEngine on its own thread next to an asyncio gRPC server.

The engine is single-threaded: every call into it (adding, aborting, completing remote
prefills) is a command executed on the engine thread between steps. Outputs travel back to the
asyncio side through one queue per request. When there is nothing to step the thread sleeps on
its command queue instead of spinning.
"""

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tandem.api.errors import InvalidRequest, ShuttingDown, TandemError
from tandem.api.outputs import RequestOutput
from tandem.api.stats import EngineStats
from tandem.engine.llm_engine import EngineStepError, LLMEngine

logger = logging.getLogger(__name__)
T = TypeVar("T")

Command = Callable[[LLMEngine], Any]


class EngineFailure(TandemError):
    """The engine raised while stepping; the requests in flight were aborted."""


class EngineWorker:
    def __init__(
        self,
        engine: LLMEngine,
        loop: asyncio.AbstractEventLoop,
        *,
        after_step: Callable[[LLMEngine], None] | None = None,
        release: Callable[[LLMEngine, str], None] | None = None,
    ) -> None:
        """
        Args:
            after_step: runs on the engine thread after every step and command batch.
            release: how the pod ends a request it must give up (default: abort it). Decode pods
                first stop KV writes into the request's blocks.
        """
        self.engine = engine
        self._loop = loop
        self._after_step = after_step
        self._release = release or (lambda e, rid: e.abort_request(rid))
        self._commands: queue.SimpleQueue[tuple[Command, concurrent.futures.Future]] = (
            queue.SimpleQueue()
        )
        self._streams: dict[str, asyncio.Queue] = {}
        self._stopped = threading.Event()
        self._draining = False
        self.stats: EngineStats = engine.get_stats()
        """Snapshot refreshed after every step and command (read without locking)."""
        self.steps = 0
        self._last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def seconds_since_progress(self) -> float:
        """0 while idle; otherwise how long since the engine thread last finished a step or
        command."""
        if not (self.stats.num_running or self.stats.num_waiting):
            return 0.0
        return time.monotonic() - self._last_progress

    def stop(self) -> None:
        self._stopped.set()
        self._commands.put((lambda e: None, concurrent.futures.Future()))
        self._thread.join(timeout=10)

    def start_draining(self) -> None:
        """Refuse new requests from now on; the ones in flight carry on (a pod shutting down)."""
        self._draining = True

    @property
    def open_streams(self) -> int:
        """Requests in flight on this pod (each holds an output stream until it ends)."""
        return len(self._streams)

    # ---- asyncio side -----------------------------------------------------------------------

    def open_stream(self, request_id: str) -> "asyncio.Queue[RequestOutput | BaseException]":
        """The queue that will receive the request's outputs (open it before adding the request).

        Raises:
            ShuttingDown: the pod is draining (``start_draining``).
            InvalidRequest: a request with this id is already open here. Checked first, so a
                duplicate never touches the request that owns the id.
        """
        if self._draining:
            raise ShuttingDown("this pod is shutting down")
        if request_id in self._streams:
            raise InvalidRequest(
                f"request id {request_id!r} is already in use on this pod", param="request_id"
            )
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        return q

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def end_stream(self, request_id: str, *, finished: bool) -> None:
        """Close the request's stream; unless it finished, release what it still holds (the
        pod's ``release``, on the engine thread). Every exit path of a request ends here."""
        self.close_stream(request_id)
        if not finished:
            self.submit(lambda e: self._release(e, request_id))

    def submit(self, command: Command) -> concurrent.futures.Future:
        """Run ``command(engine)`` on the engine thread; thread-safe, does not wait."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((command, future))
        return future

    async def call(self, command: Callable[[LLMEngine], T]) -> T:
        """Run ``command(engine)`` on the engine thread and await its result (or exception)."""
        return await asyncio.wrap_future(self.submit(command), loop=self._loop)

    def fail(self, request_id: str, exc: BaseException) -> None:
        """Deliver an error to the request's stream (thread-safe)."""
        self._loop.call_soon_threadsafe(self._deliver, request_id, exc)

    def dispatch(self, outputs: Iterable[RequestOutput]) -> None:
        """Deliver outputs to their streams (thread-safe; used by commands that produce output)."""
        for out in outputs:
            self._loop.call_soon_threadsafe(self._deliver, out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(item)

    # ---- engine thread ----------------------------------------------------------------------

    IDLE_WAIT_S = 0.005
    """How long to wait for a command after a step that could schedule nothing."""

    def _run(self) -> None:
        engine = self.engine
        stalled = False
        while not self._stopped.is_set():
            # Sleep on the queue when there is nothing to step, or when the last step scheduled
            # nothing (every waiting request needs blocks held by others): no busy loop.
            if not engine.has_unfinished_requests():
                self._drain(timeout=None)
            else:
                self._drain(timeout=self.IDLE_WAIT_S if stalled else 0)
            if self._stopped.is_set():
                break
            if engine.has_unfinished_requests():
                self._step()
                stalled = engine.last_step_num_tokens == 0

    def _drain(self, timeout: float | None) -> None:
        try:
            item = (
                self._commands.get(timeout=timeout) if timeout != 0 else self._commands.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            self._execute(*item)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                break
        self._after()

    def _execute(self, command: Command, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(command(self.engine))
        except BaseException as exc:  # noqa: BLE001 - the caller receives it
            future.set_exception(exc)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineStepError as exc:
            # The engine already aborted that step's requests; the others carry on.
            for request_id in exc.request_ids:
                self.fail(request_id, EngineFailure(str(exc)))
            outputs = []
        except Exception as exc:
            logger.exception("engine step failed unexpectedly; giving up every request in flight")
            self._release_all(EngineFailure(f"engine step failed: {exc}"))
            outputs = []
        self.steps += 1
        self.dispatch(outputs)
        self._after()

    def _after(self) -> None:
        self._last_progress = time.monotonic()
        self.stats = self.engine.get_stats()
        if self._after_step is not None:
            self._after_step(self.engine)

    def _release_all(self, exc: EngineFailure) -> None:
        for request_id in self.engine.request_ids():
            self._release(self.engine, request_id)
            self.fail(request_id, exc)
