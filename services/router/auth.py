"""API keys and per-key limits of the router's two front doors (HTTP and gRPC RouterService).

As vLLM's ``--api-key``: when keys are configured, every HTTP route but ``/health`` and
``/metrics`` (which Kubernetes probes and Prometheus call without credentials; they share the
HTTP port with ``/v1``, so no NetworkPolicy fences them apart: docs/kubernetes.md, "Credentials")
needs ``Authorization: Bearer <key>``, else 401 in the OpenAI error
envelope; every RouterService call needs the same in its ``authorization`` metadata, else
UNAUTHENTICATED. Keys are compared in constant time, against every configured key.

Per-key limits (``KeyLimits``): how many requests one key may have in flight and how many tokens
(prompt + max_tokens of each) they may reserve together; over either, 429 / RESOURCE_EXHAUSTED
with Retry-After. A request's share is held from its start to the end of its response (the last
SSE chunk). Without API keys every request counts against one shared budget.
"""

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from services.router.http_errors import send_error
from tandem.api.cluster_auth import metadata_has_secret
from tandem.api.errors import CapacityExceeded, TandemError
from tandem.api.requests import Job

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics"})
"""HTTP paths served without a key (probes and Prometheus), as vLLM does."""
AUTHORIZATION = "authorization"
"""HTTP header and gRPC metadata key carrying ``Bearer <key>``."""
LEASE_STATE = "key_lease"
"""``scope["state"]`` entry holding a request's ``KeyLease``."""


class ApiKeyConfigError(TandemError, ValueError):
    """The API keys cannot be used: an unreadable key file, a key too short to be secret."""


def load_api_keys(keys: Iterable[str], key_file: Path | None) -> list[str]:
    """The keys given directly plus those of ``key_file`` (one per line; blank lines and lines
    starting with ``#`` skipped).

    Raises:
        ApiKeyConfigError: the file cannot be read, or a key is shorter than 8 characters.
    """
    found = [k.strip() for k in keys if k.strip()]
    if key_file is not None:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as exc:
            raise ApiKeyConfigError(
                f"cannot read --api-key-file {key_file}: {exc.strerror}"
            ) from None
        found += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if any(len(k) < 8 for k in found):
        raise ApiKeyConfigError("API keys must be at least 8 characters long")
    return list(dict.fromkeys(found))


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The accepted keys (none: no authentication)."""

    keys: tuple[str, ...]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, authorization: str | bytes | None) -> str | None:
        """The key an ``Authorization`` value names if it is one of ours, else None.

        Every key is compared (constant time each), so the time taken does not tell which
        prefix or which key was close.
        """
        if authorization is None:
            return None
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        token = token.strip()
        if metadata_has_secret([(AUTHORIZATION, token)], AUTHORIZATION, self.keys):
            return token
        return None

    def check_grpc(self, metadata: Sequence[tuple[str, str | bytes]]) -> bool:
        """Whether gRPC invocation metadata carries an accepted key (the server's check)."""
        value = next((v for k, v in metadata if k == AUTHORIZATION), None)
        return self.identify(value) is not None


@dataclass(slots=True)
class _Usage:
    requests: int = 0
    tokens: int = 0


@dataclass
class KeyLimits:
    """Requests and reserved tokens in flight per key (None: that limit is off)."""

    max_requests: int | None
    max_tokens: int | None
    _usage: dict[str | None, _Usage] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.max_requests is not None or self.max_tokens is not None

    def usage(self, key: str | None) -> tuple[int, int]:
        """(requests, tokens) in flight for ``key`` (tests and metrics)."""
        u = self._usage.get(key)
        return (u.requests, u.tokens) if u else (0, 0)

    def open(self, key: str | None) -> "KeyLease":
        """Admit one more request of ``key``.

        Raises:
            CapacityExceeded: the key already has ``max_requests`` in flight.
        """
        u = self._usage.setdefault(key, _Usage())
        if self.max_requests is not None and u.requests >= self.max_requests:
            raise CapacityExceeded(
                f"this API key already has {u.requests} requests in flight "
                f"(at most {self.max_requests}); retry later"
            )
        u.requests += 1
        return KeyLease(self, key)

    def _reserve(self, key: str | None, tokens: int) -> None:
        u = self._usage.setdefault(key, _Usage())
        if self.max_tokens is not None and u.tokens + tokens > self.max_tokens:
            raise CapacityExceeded(
                f"this API key has {u.tokens} tokens reserved by requests in flight; "
                f"{tokens} more would exceed its {self.max_tokens}; retry later"
            )
        u.tokens += tokens

    def _release(self, key: str | None, requests: int, tokens: int) -> None:
        u = self._usage.get(key)
        if u is None:
            return
        u.requests -= requests
        u.tokens -= tokens
        if u.requests <= 0 and u.tokens <= 0:
            del self._usage[key]  # the table holds only keys with work in flight


@dataclass(slots=True)
class KeyLease:
    """One request's share of its key's limits; ``close`` gives all of it back (once)."""

    limits: KeyLimits
    key: str | None
    tokens: int = 0
    closed: bool = False

    def reserve(self, tokens: int) -> None:
        """Reserve ``tokens`` more (prompt + max_tokens of the request's prompts).

        Raises:
            CapacityExceeded: over the key's ``max_tokens``.
        """
        self.limits._reserve(self.key, tokens)
        self.tokens += tokens

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.limits._release(self.key, 1, self.tokens)


def job_tokens(jobs: Iterable[Job]) -> int:
    """Tokens a request reserves: each prompt's tokens plus its max_tokens per completion it
    generates (``best_of``, else ``n``)."""
    return sum(
        len(j.prompt_token_ids) + j.params.max_tokens * (j.params.best_of or j.params.n)
        for j in jobs
    )


def reserve_tokens(request, jobs: Iterable[Job]) -> None:
    """Charge ``jobs`` to the HTTP request's key (a no-op without per-key limits).

    Raises:
        CapacityExceeded: over the key's reserved-token limit (429).
    """
    lease: KeyLease | None = request.scope.get("state", {}).get(LEASE_STATE)
    if lease is not None:
        lease.reserve(job_tokens(jobs))


class ApiKeyAuth:
    """Pure ASGI middleware: API key check (401) and per-key request limit (429) of every HTTP
    request but ``OPEN_PATHS``; the request's ``KeyLease`` is in ``scope["state"]`` for the
    handler's token reservation and is released when the response has been sent."""

    def __init__(
        self, app: ASGIApp, keys: ApiKeys, limits: KeyLimits, retry_after_s: int = 1
    ) -> None:
        self.app = app
        self.keys = keys
        self.limits = limits
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (scope["type"] == "http" and scope["path"] in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket: the router serves none, and never unkeyed
            if self.keys.enabled:
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        key: str | None = None
        # Both refusals close the connection: the body they did not read must not keep it open
        # (a client trickling a huge declared body would hold it forever) nor be parsed as the
        # connection's next request.
        if self.keys.enabled:
            header = next(
                (v for k, v in scope.get("headers") or () if k == AUTHORIZATION.encode()), None
            )
            key = self.keys.identify(header)
            if key is None:
                message = (
                    "invalid API key"
                    if header
                    else "missing API key: send the header Authorization: Bearer <key>"
                )
                await send_error(
                    send, 401, message, close=True, headers=[(b"www-authenticate", b"Bearer")]
                )
                return
        if not self.limits.enabled:
            await self.app(scope, receive, send)
            return
        try:
            lease = self.limits.open(key)
        except CapacityExceeded as exc:
            retry = [(b"retry-after", str(self.retry_after_s).encode())]
            await send_error(send, 429, str(exc), close=True, headers=retry)
            return
        scope.setdefault("state", {})[LEASE_STATE] = lease
        try:
            await self.app(scope, receive, send)
        finally:
            lease.close()
