"""The router's HTTP/1.1 connections: uvicorn's httptools protocol with a header read timeout,
a cap on open connections and its own errors in the OpenAI envelope.

uvicorn bounds neither how long a request's headers may take nor how many connections may sit
open: 1,000 clients trickling a header a byte at a time each held a connection indefinitely.
``BoundedHttpToolsProtocol`` adds, per connection:

- a header read timeout: a fresh connection must complete its first request's headers within
  ``header_read_timeout_s`` of connecting, and a kept-alive one a later request's headers within
  ``header_read_timeout_s`` of that request's first byte (uvicorn's keep-alive timeout covers
  the idle time between requests). A connection that sent nothing is closed silently (a client
  racing to reuse it then retries on a new one); one that sent part of a request gets a 408;
- a cap on open connections: a request arriving on a connection beyond ``max_connections`` is
  answered 503 with ``Retry-After`` and the connection closed (as uvicorn's
  ``limit_concurrency`` does, but in the OpenAI envelope);
- uvicorn's 400 for a malformed request in the OpenAI envelope.

The body's size and read time are bounded per request by ``input_limits.InputLimitsMiddleware``.
"""

import asyncio
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.router.http_errors import error_json, raw_error_response


@dataclass(slots=True, frozen=True)
class ConnectionLimits:
    """What ``BoundedHttpToolsProtocol`` enforces (from ``RouterSettings``)."""

    header_read_timeout_s: float
    max_connections: int
    retry_after_s: int = 1


def bounded_http_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (``http=``), bound to ``limits``."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    limits: ConnectionLimits

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_started = False

    # ---- connection -------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    # ---- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_started = True
        if self._header_timer is None:  # a kept-alive connection's next request
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._request_started = False
        if len(self.connections) <= self.limits.max_connections:
            super().on_headers_complete()
            return
        # uvicorn starts the request's task with ``self.app``: this one answers 503 instead.
        app, self.app = self.app, self._over_capacity
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    async def _over_capacity(self, scope, receive, send) -> None:
        body = error_json(503, "the router has too many open connections; retry shortly")
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(self.limits.retry_after_s).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def send_400_response(self, msg: str) -> None:
        """A request httptools could not parse: 400 in the envelope, then close (as uvicorn)."""
        self.transport.write(raw_error_response(400, msg))
        self.transport.close()

    # ---- header read timeout ----------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(
            self.limits.header_read_timeout_s, self._header_timeout
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request trickles in behind a response still being sent: that response
            # finishes, then the connection closes.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        if self._request_started:
            timeout = self.limits.header_read_timeout_s
            message = f"the request headers did not arrive within {timeout:g} s"
            self.transport.write(raw_error_response(408, message))
        self.transport.close()
