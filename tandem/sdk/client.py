"""Client and AsyncClient: generate and stream through the router's RouterService.

Calls made inside an OpenTelemetry span carry its W3C trace context: the router's trace of the
request then continues the caller's.

Authentication: ``api_key`` (default: the ``TANDEM_API_KEY`` environment variable) is sent as
``authorization: Bearer <key>`` on every call, as the router's ``--api-key`` expects; ``tls``
connects over TLS (``root_certificates``: PEM of a private CA, default: the system's).

Sampling keywords are ``SamplingParams`` fields (``max_tokens``, ``temperature``, ``top_p``,
``top_k``, ``seed``, ``stop``, ``logprobs``, ...); they are validated before anything is sent.
"""

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
from opentelemetry import propagate

from tandem.api import proto_convert
from tandem.api.channel_options import CLIENT_OPTIONS
from tandem.api.errors import InvalidRequest, TandemError, Unauthenticated
from tandem.api.grpc_status import error_from_rpc
from tandem.api.sampling_request import resolve_sampling_params
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.sdk.results import GenerateChunk, GenerateResult, ModelInfo

API_KEY_ENV = "TANDEM_API_KEY"
"""The API key used when the client is given none."""


class _Connection:
    """What both clients share: the channel's target and credentials, and each call's
    metadata."""

    def __init__(self, api_key: str | None, tls: bool, root_certificates: bytes | None) -> None:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.auth = (("authorization", f"Bearer {key}"),) if key else ()
        self.credentials = (
            grpc.ssl_channel_credentials(root_certificates)
            if tls or root_certificates is not None
            else None
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.auth + _trace_metadata()

    def error(self, err: grpc.RpcError) -> TandemError:
        exc = error_from_rpc(err)
        if isinstance(exc, Unauthenticated):
            hint = "the API key was refused" if self.auth else "no API key was sent"
            return Unauthenticated(f"{exc} ({hint}: pass api_key= or set {API_KEY_ENV})")
        return exc


def _trace_metadata() -> tuple[tuple[str, str], ...]:
    """W3C trace context of the caller's current span (if any), so the router continues its
    trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def _request(
    prompt: str | Sequence[int],
    model: str,
    priority: int,
    cache_salt: str | None,
    request_id: str | None,
    sampling: dict[str, Any],
) -> router_pb2.GenerateRequest:
    # Only the fields the call names are sent: the router fills the rest (the model's generation
    # defaults, max_tokens up to the context). The values are checked here by the router's own
    # translation, so a bad one fails before anything is sent, with the same error.
    resolve_sampling_params(sampling, num_prompt_tokens=0, limits=None)
    req = router_pb2.GenerateRequest(
        model=model,
        priority=priority,
        cache_salt=cache_salt or "",
        request_id=request_id or "",
        sampling_params=proto_convert.sampling_fields_to_proto(sampling),
    )
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


class _Attempts:
    """Retry policy of one call: UNAVAILABLE is retried, with backoff, only before the first
    chunk arrived (after it, a retry would repeat tokens the caller already has), and every
    attempt fits in the call's one overall ``timeout``."""

    def __init__(self, timeout: float | None, max_retries: int) -> None:
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(
                f"timeout must be > 0 seconds or None, not {timeout!r}", param="timeout"
            )
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.max_retries = max_retries
        self.retries = 0

    def timeout(self) -> float | None:
        """What is left of the overall deadline, for the next attempt."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def backoff(self, error: grpc.RpcError, started: bool) -> float | None:
        """Seconds to wait before retrying after ``error``, or None: give up and raise it."""
        if (
            started
            or error.code() != grpc.StatusCode.UNAVAILABLE
            or self.retries >= self.max_retries
        ):
            return None
        delay = min(2.0, 0.1 * 2**self.retries)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        self.retries += 1
        return delay


class Client:
    """Blocking client. Thread-safe; close it (or use ``with``) to release the channel."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_retries: int = 3,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        self._conn = _Connection(api_key, tls, root_certificates)
        if self._conn.credentials is not None:
            self._channel = grpc.secure_channel(
                target, self._conn.credentials, options=CLIENT_OPTIONS
            )
        else:
            self._channel = grpc.insecure_channel(target, options=CLIENT_OPTIONS)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self.timeout = timeout
        self.max_retries = max_retries

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        model: str = "",
        timeout: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        request_id: str | None = None,
        **sampling: Any,
    ) -> Iterator[GenerateChunk]:
        """Chunks as the tokens are generated. ``timeout`` bounds the whole call, retries included,
        from the first chunk asked for; UNAVAILABLE is retried (``max_retries``) only before the
        first chunk."""
        request = _request(prompt, model, priority, cache_salt, request_id, sampling)
        attempts = _Attempts(timeout if timeout is not None else self.timeout, self.max_retries)
        while True:
            call = self._stub.Generate(
                request, timeout=attempts.timeout(), metadata=self._conn.metadata()
            )
            started = False
            try:
                for resp in call:
                    started = True
                    yield GenerateChunk.from_proto(resp)
                return
            except grpc.RpcError as e:
                delay = attempts.backoff(e, started)
                if delay is None:
                    raise self._conn.error(e) from None
                time.sleep(delay)
            finally:
                call.cancel()

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerateResult:
        """The whole completion (same keywords as ``stream``)."""
        return GenerateResult.from_chunks(list(self.stream(prompt, **kwargs)))

    def models(self) -> list[ModelInfo]:
        try:
            resp = self._stub.ListModels(
                router_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._conn.metadata()
            )
        except grpc.RpcError as e:
            raise self._conn.error(e) from None
        return [ModelInfo(m.id, m.max_model_len) for m in resp.models]


class AsyncClient:
    """asyncio client. Create and use it inside one event loop."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_retries: int = 3,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        self._conn = _Connection(api_key, tls, root_certificates)
        if self._conn.credentials is not None:
            self._channel = grpc.aio.secure_channel(
                target, self._conn.credentials, options=CLIENT_OPTIONS
            )
        else:
            self._channel = grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self.timeout = timeout
        self.max_retries = max_retries

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def stream(
        self,
        prompt: str | Sequence[int],
        *,
        model: str = "",
        timeout: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        request_id: str | None = None,
        **sampling: Any,
    ) -> AsyncIterator[GenerateChunk]:
        """Chunks as the tokens are generated. ``timeout`` bounds the whole call, retries included,
        from the first chunk asked for; UNAVAILABLE is retried (``max_retries``) only before the
        first chunk."""
        request = _request(prompt, model, priority, cache_salt, request_id, sampling)
        attempts = _Attempts(timeout if timeout is not None else self.timeout, self.max_retries)
        while True:
            call = self._stub.Generate(
                request, timeout=attempts.timeout(), metadata=self._conn.metadata()
            )
            started = False
            try:
                async for resp in call:
                    started = True
                    yield GenerateChunk.from_proto(resp)
                return
            except grpc.RpcError as e:
                delay = attempts.backoff(e, started)
                if delay is None:
                    raise self._conn.error(e) from None
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerateResult:
        """The whole completion (same keywords as ``stream``)."""
        return GenerateResult.from_chunks([c async for c in self.stream(prompt, **kwargs)])

    async def models(self) -> list[ModelInfo]:
        try:
            resp = await self._stub.ListModels(
                router_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._conn.metadata()
            )
        except grpc.RpcError as e:
            raise self._conn.error(e) from None
        return [ModelInfo(m.id, m.max_model_len) for m in resp.models]
