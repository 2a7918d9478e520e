"""Bounded input on the router's HTTP API: what a request may cost before any handler runs.

``InputLimitsMiddleware`` (pure ASGI, outside every route) reads each request's body before the
app sees it and refuses, in the OpenAI error envelope:

- a body over ``max_request_body_bytes``: 413 at once when its ``Content-Length`` says so
  (nothing of it is read), else 413 as soon as the bytes received pass the limit;
- a body that does not arrive within ``body_read_timeout_s`` of its headers: 408;
- a body with more JSON values or containers than any servable request holds, counted before
  parsing as commas and opening brackets (each value but the first of its array or object
  follows a comma; brackets inside strings count too, so these are upper bounds):
  ``BodyLimits.max_json_values`` (prompts per request x context) and ``max_json_containers``
  (one per prompt, message and content part): 413;
- a body that is not valid UTF-8 JSON, holds a lone surrogate (``"\\ud800"``, which Python's
  ``json`` accepts and the tokenizer then fails on), ``NaN``/``Infinity``, or nests deeper than
  1,024 levels: 400. Every non-empty body is checked whatever its ``Content-Type`` says (the
  router's routes all take JSON, and a request may repeat the header: Starlette reads the first);
- a parsed body whose shape no servable request has (``BodyLimits.check_json``: more prompts
  than allowed, a token list longer than the context): 400, before pydantic validates it.

The body is parsed once, here (orjson); ``ParsedBodyRoute`` hands the parsed object to FastAPI
instead of letting it parse the bytes again.

NOTE: parsing and validating a large body hold the GIL (orjson and pydantic-core do not release
it), so doing them in a thread would not free the event loop: what bounds the time a body can
stall the loop is the body limit, the value count and the shape check before validation.

413 and 408 close the connection (``Connection: close``): the rest of that body is never read.

The limits on what a valid body asks for (prompts per request, characters per prompt, a request
chat template) are checked where the request becomes jobs (``JobBuilder``, ``OpenAIServing``);
the connection-level limits (header read timeout, connections) in ``http_connections``.
"""

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from fastapi.routing import APIRoute

from services.router.http_errors import send_error, status_for
from tandem.api.errors import InvalidRequest

REQUEST_ID_MAX_CHARS = 128
"""Longest ``x-request-id`` (HTTP header) or ``request_id`` (gRPC field) kept as given."""

_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:/+=@~-]{{1,{REQUEST_ID_MAX_CHARS}}}")
"""Letters, digits and the punctuation of UUIDs, ULIDs, base64 and prefixed ids (``req_1``)."""

MIN_CHARS_PER_TOKEN = 16
"""Floor of ``chars_per_token_bound`` (tokenizers with only short vocabulary strings)."""

_BOM = b"\xef\xbb\xbf"
JSON_BODY = "json_body"
"""``scope["state"]`` entry holding the body the middleware parsed (for ``ParsedBodyRoute``)."""
BODY_BYTES = "body_bytes"
"""``scope["state"]`` entry holding the size of the body the middleware read."""


def valid_request_id(value: str | bytes | None) -> str | None:
    """``value`` if it is a usable request id (at most ``REQUEST_ID_MAX_CHARS`` characters of
    ``[A-Za-z0-9._:/+=@~-]``), else None.

    The id travels into response headers, logs, span attributes and the pods' request ids, so
    an unbounded or arbitrary one is not kept: the HTTP API replaces it with a generated id
    (returned in the response's ``x-request-id``; a proxy's header must not fail a request),
    the gRPC RouterService, where the id is a field the caller chose, refuses the call.
    """
    if isinstance(value, bytes):
        if len(value) > REQUEST_ID_MAX_CHARS:
            return None
        value = value.decode("latin-1")
    if not value or not _REQUEST_ID.fullmatch(value):
        return None
    return value


def chars_per_token_bound(tokenizer) -> int:
    """An upper bound on the characters one token of ``tokenizer`` stands for.

    A token covers at most as many characters as its string in the vocabulary has: byte-level
    BPE (GPT-2, Llama 3, Qwen) spells each byte as one character, so its strings are at least as
    long as the text they stand for; SentencePiece spells text as itself (``▁`` for a space);
    byte-fallback pieces (``<0xE3>``) are longer than the byte they stand for; added and special
    tokens are matched in the text by their own spelling. Two things can make a token cover
    more than its string: a normalizer that drops characters (control characters, NFKC folding
    two characters into one) and an ``<unk>`` piece covering a run of unknown characters
    (SentencePiece without byte fallback). The bound is therefore the longest vocabulary string
    doubled, and at least ``MIN_CHARS_PER_TOKEN``: generous for every text the served models'
    tokenizers see in practice, and still tight enough that a prompt the context could never
    hold is refused without tokenizing it (tokenizing costs ~200 bytes of memory per
    character: a 10 MB prompt took the router's RSS up by 2 GB).
    """
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    longest = max((len(piece) for piece in vocab), default=0)
    return max(2 * longest, MIN_CHARS_PER_TOKEN)


@dataclass(slots=True, frozen=True)
class BodyLimits:
    """What ``InputLimitsMiddleware`` enforces (from ``RouterSettings``)."""

    max_body_bytes: int
    read_timeout_s: float
    max_json_values: Callable[[], int] | None = None
    """Most JSON values a body may hold (None: no bound), checked before parsing."""
    max_json_containers: Callable[[], int] | None = None
    """Most arrays and objects a body may hold (None: no bound), checked before parsing."""
    check_json: Callable[[Any], None] | None = None
    """Raises ``InvalidRequest`` for a parsed body whose shape no servable request has."""


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class InputLimitsMiddleware:
    """Pure ASGI middleware: bounds each HTTP request body's size, arrival time and JSON form
    before the app (and FastAPI's parser) sees it; the app then reads the body from memory.

    NOTE: the body is read here in full, not counted as the app reads it, so that every refusal
    is answered here (in one place, before routing) and the app's own reads never wait on the
    network; the app holds the same bytes it would have buffered anyway.
    """

    def __init__(self, app, *, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        limit = self.limits.max_body_bytes
        if declared == -1:
            await send_error(send, 400, "the Content-Length header is not a number", close=True)
            return
        if declared is not None and declared > limit:
            await send_error(send, 413, _too_large(limit), close=True)
            return
        try:
            async with asyncio.timeout(self.limits.read_timeout_s):
                body = await _read_body(receive, limit)
        except _TooLarge:
            await send_error(send, 413, _too_large(limit), close=True)
            return
        except TimeoutError:
            await send_error(
                send,
                408,
                f"the request body did not arrive within {self.limits.read_timeout_s:g} s",
                close=True,
            )
            return
        except _ClientGone:
            return
        if body:
            parsed = self._parse(body)
            if isinstance(parsed, _Refusal):
                await send_error(send, parsed.status, parsed.message, param=parsed.param)
                return
            scope.setdefault("state", {}).update({JSON_BODY: parsed, BODY_BYTES: len(body)})
        await self.app(scope, _replay(body, receive), send)

    def _parse(self, body: bytes) -> Any:
        """The body's JSON, or the ``_Refusal`` of a body that is too big a value tree, not
        strict JSON or of a shape no servable request has."""
        limits = self.limits
        containers = body.count(b"[") + body.count(b"{")  # ~1 ms a MiB each
        values = body.count(b",") + containers + 1  # each value but the first of its container
        for count, bound, what in (
            (values, limits.max_json_values, "JSON values"),
            (containers, limits.max_json_containers, "JSON arrays and objects"),
        ):
            if bound is not None and count > (most := bound()):
                return _Refusal(
                    413,
                    f"the request body holds up to {count} {what}; no request this model "
                    f"serves needs more than {most}",
                )
        try:
            parsed = orjson.loads(body[len(_BOM) :] if body.startswith(_BOM) else body)
        except orjson.JSONDecodeError as exc:
            return _Refusal(400, f"the request body is not valid JSON: {exc}")
        if limits.check_json is not None:
            try:
                limits.check_json(parsed)
            except InvalidRequest as exc:
                return _Refusal(status_for(exc)[0], exc.message, exc.param)
        return parsed


@dataclass(slots=True, frozen=True)
class _Refusal:
    status: int
    message: str
    param: str | None = None


class LargeTextGate:
    """At most ``slots`` requests whose body is over ``threshold_bytes`` are turned into jobs
    (tokenized) at once; smaller ones never wait.

    Tokenizing runs in a thread and releases the GIL, so it does not stall the event loop, but
    it costs ~1 s of CPU and ~200 bytes of memory per character of a 1 MB text: without a cap a
    few clients sending large prompts at once take every core and the worker threads that small
    requests need too.
    """

    def __init__(self, threshold_bytes: int = 64 << 10, slots: int = 2) -> None:
        self.threshold_bytes = threshold_bytes
        self._slots = asyncio.Semaphore(slots)

    @contextlib.asynccontextmanager
    async def slot(self, request: Request):
        if request.scope.get("state", {}).get(BODY_BYTES, 0) <= self.threshold_bytes:
            yield
            return
        async with self._slots:
            yield


class ParsedBodyRoute(APIRoute):
    """A FastAPI route that takes the JSON body ``InputLimitsMiddleware`` already parsed instead
    of parsing the bytes again (set as ``app.router.route_class`` before adding routes)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def parsed_body_handler(request: Request):
            return await handler(_ParsedBodyRequest(request.scope, request.receive))

        return parsed_body_handler


class _ParsedBodyRequest(Request):
    async def json(self) -> Any:
        state = self.scope.get("state") or {}
        if JSON_BODY in state:
            return state[JSON_BODY]
        return await super().json()


def _content_length(scope) -> int | None:
    """The Content-Length, or None when absent, -1 when malformed."""
    declared = None
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            declared = int(value) if value.isdigit() else -1
    return declared


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"


async def _read_body(receive, limit: int) -> bytes:
    """The whole body, counting bytes as they arrive (uvicorn hands over at most ~64 KiB a
    message); ``_TooLarge`` as soon as they pass ``limit``."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that hands the app the body already read, then waits on the client (for
    its disconnect) as the original does."""
    pending = True

    async def replay():
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
