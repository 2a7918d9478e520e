"""Graceful drain on SIGTERM: keep the HTTP listener, answer new requests 503, let streams finish.

uvicorn on its own closes the listening socket at the first SIGTERM, so a client that connects
while streams in flight finish gets "connection refused" instead of an HTTP answer it can act
on. ``DrainingServer`` instead turns the first SIGTERM into a drain: ``DrainGate`` answers every
new HTTP request with 503 in the OpenAI error envelope (``Retry-After``, ``Connection: close``),
``/health`` included so that readiness probes take the pod out of its Service, while the
requests already in flight run on. The gRPC RouterService drains at the same moment
(``on_drain``: its health turns NOT_SERVING and new calls get UNAVAILABLE, which the SDK retries
on another replica, while calls in flight get the same grace). Once no HTTP request is left, or
``grace_s`` has passed, the server shuts down as uvicorn does (the app's lifespan then waits for
the gRPC server's stop). A second SIGTERM, or SIGINT, stops at once as before.
"""

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable

import orjson
import uvicorn

from services.router.http_errors import error_body

logger = logging.getLogger(__name__)


class DrainGate:
    """Pure ASGI middleware: counts HTTP requests in flight; while draining, refuses new ones.

    The router's app installs it inside ``RequestIdAndMetrics`` (``app.add_middleware(gate.wrap)``)
    so that its 503s carry ``x-request-id`` and are counted like any other answer; the server
    takes the same instance from ``app.state.drain_gate`` to start and watch the drain.
    """

    def __init__(self, app=None, retry_after_s: int = 1) -> None:
        self.app = app
        self.retry_after_s = retry_after_s
        self.draining = False
        self.in_flight = 0
        self.refused = 0

    def wrap(self, app) -> "DrainGate":
        """A middleware factory (Starlette calls it with the inner app when it builds the stack)."""
        self.app = app
        return self

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            self.refused += 1
            body = orjson.dumps(
                error_body(
                    "the router is shutting down; retry on another replica",
                    503,
                    "ServiceUnavailableError",
                )
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", str(self.retry_after_s).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM drains through ``gate`` for up to ``grace_s``."""

    def __init__(
        self,
        config: uvicorn.Config,
        gate: DrainGate,
        grace_s: float,
        on_drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """
        Args:
            on_drain: run on the event loop once, when the drain starts (the router stops its
                gRPC server's intake).
        """
        super().__init__(config)
        self.gate = gate
        self.grace_s = grace_s
        self.on_drain = on_drain
        self._drain_deadline: float | None = None
        self._drain_started: asyncio.Future | None = None

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and self._drain_deadline is None and self.grace_s > 0:
            # Runs in the signal handler: only flags; on_tick (on the loop) does the rest.
            self._drain_deadline = time.monotonic() + self.grace_s
            self.gate.draining = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and not self.should_exit:
            if self._drain_started is None and self.on_drain is not None:
                self._drain_started = asyncio.ensure_future(self.on_drain())
            left = self._drain_deadline - time.monotonic()
            if counter % 10 == 0:
                logger.info(
                    "draining: %d HTTP request(s) in flight, %d refused",
                    self.gate.in_flight,
                    self.gate.refused,
                )
            if self.gate.in_flight == 0 or left <= 0:
                # What is left of the grace goes to uvicorn's own wait (kept-alive connections),
                # then the lifespan stops the gRPC server. SIGTERM is re-raised at the end, as
                # uvicorn does for a signal it handled.
                self.config.timeout_graceful_shutdown = max(1.0, left)
                super().handle_exit(signal.SIGTERM, None)
        return await super().on_tick(counter)
