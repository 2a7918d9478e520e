"""Client and AsyncClient: generate, stream and chat through the router's RouterService.

``generate``/``stream`` take a prompt (text or token ids); ``chat``/``chat_stream`` take a
conversation (OpenAI's message dicts: ``role``, ``content``, ``name``, ``tool_call_id``,
``tool_calls``), which the router renders with the model's chat template exactly as its HTTP
``/v1/chat/completions`` does. The ``*_stream`` calls yield ``GenerateChunk``s as the tokens
come; the others return one ``GenerateResult``.

Tool calling: ``chat``/``chat_stream`` take OpenAI's ``tools``, ``tool_choice`` and
``parallel_tool_calls``, which the router plans as its HTTP chat route does (same validation,
same ``--tool-call-parser``, ``required`` and named choices enforced by structured decoding).
The result's ``tool_calls`` are ``ToolCall``s (id, name, arguments as JSON text) and its
``finish_reason`` is ``"tool_calls"`` where HTTP's would be; streamed chunks carry
``ToolCallDelta``s.

Calls made inside an OpenTelemetry span carry its W3C trace context: the router's trace of the
request then continues the caller's.

Authentication: ``api_key`` (default: the ``TANDEM_API_KEY`` environment variable) is sent as
``authorization: Bearer <key>`` on every call, as the router's ``--api-key`` expects; ``tls``
connects over TLS (``root_certificates``: PEM of a private CA, default: the system's).

Sampling keywords are ``SamplingParams`` fields (``max_tokens``, ``temperature``, ``top_p``,
``top_k``, ``seed``, ``stop``, ``logprobs``, ``n``, ``best_of``, ``logit_bias`` (token id ->
bias; JSON's string keys too), ``prompt_logprobs``, ``structured_outputs`` (a
``StructuredOutputs`` or a dict such as ``{"json": schema}``), ...); they are validated before
anything is sent.
"""

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
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
    """What both clients share: the channel (of ``grpc`` or ``grpc.aio``, by ``channels``) with
    its credentials, the stub, and each call's metadata."""

    def __init__(
        self,
        target: str,
        api_key: str | None,
        tls: bool,
        root_certificates: bytes | None,
        channels: Any,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.auth = (("authorization", f"Bearer {key}"),) if key else ()
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self.channel = channels.secure_channel(target, credentials, options=CLIENT_OPTIONS)
        else:
            self.channel = channels.insecure_channel(target, options=CLIENT_OPTIONS)
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)

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


_NORMALIZED = ("logit_bias", "structured_outputs")
"""Sampling fields sent as ``SamplingParams`` holds them (a dict with JSON's string keys, a
dict of constraints), not as the caller wrote them."""


def _sampling_proto(sampling: dict[str, Any]):
    # Only the fields the call names are sent: the router fills the rest (the model's generation
    # defaults, max_tokens up to the context). The values are checked here by the router's own
    # translation, so a bad one fails before anything is sent, with the same error.
    params = resolve_sampling_params(sampling, num_prompt_tokens=0, limits=None)
    sent = {k: getattr(params, k) if k in _NORMALIZED else v for k, v in sampling.items()}
    return proto_convert.sampling_fields_to_proto(sent)


def _request(
    prompt: str | Sequence[int],
    model: str,
    priority: int,
    cache_salt: str | None,
    request_id: str | None,
    sampling: dict[str, Any],
) -> router_pb2.GenerateRequest:
    req = router_pb2.GenerateRequest(
        model=model,
        priority=priority,
        cache_salt=cache_salt or "",
        request_id=request_id or "",
        sampling_params=_sampling_proto(sampling),
    )
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def _chat_request(
    messages: Sequence[Mapping[str, Any]],
    model: str,
    priority: int,
    cache_salt: str | None,
    request_id: str | None,
    add_generation_prompt: bool,
    chat_template_kwargs: Mapping[str, Any] | None,
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None,
    parallel_tool_calls: bool | None,
    sampling: dict[str, Any],
) -> router_pb2.ChatRequest:
    if isinstance(messages, str | bytes) or not messages:
        raise InvalidRequest("messages must be a non-empty list of messages", param="messages")
    try:
        kwargs = json.dumps(dict(chat_template_kwargs)) if chat_template_kwargs else ""
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(
            f"chat_template_kwargs must be JSON: {exc}", param="chat_template_kwargs"
        ) from None
    return router_pb2.ChatRequest(
        model=model,
        messages=[_message(m, i) for i, m in enumerate(messages)],
        add_generation_prompt=add_generation_prompt,
        chat_template_kwargs=kwargs,
        sampling_params=_sampling_proto(sampling),
        priority=priority,
        cache_salt=cache_salt or "",
        request_id=request_id or "",
        tools=_json_text(tools, "tools") if tools is not None else "",
        tool_choice=_json_text(tool_choice, "tool_choice") if tool_choice is not None else "",
        parallel_tool_calls=parallel_tool_calls,
    )


def _json_text(value: Any, param: str) -> str:
    """``value`` as the JSON text a ChatRequest field carries (the router checks what it says)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{param} must be JSON: {exc}", param=param) from None


def _message(m: Mapping[str, Any], i: int) -> router_pb2.ChatMessage:
    """One OpenAI message dict as the protobuf message (content parts joined, as the router
    joins them; a tool call's arguments given as a dict sent as JSON)."""
    param = f"messages.{i}"
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
        raise InvalidRequest("a message is a dict with a role", param=param)
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") if isinstance(p, Mapping) else p for p in content)
    if content is not None and not isinstance(content, str):
        raise InvalidRequest("content must be a string or text parts", param=f"{param}.content")
    try:
        calls = []
        for call in m.get("tool_calls") or ():
            function = call.get("function") or {}
            arguments = function.get("arguments", "")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments)
            calls.append(
                router_pb2.ToolCall(
                    id=call.get("id", ""), name=function.get("name", ""), arguments=arguments
                )
            )
        return router_pb2.ChatMessage(
            role=m["role"],
            content=content,
            name=m.get("name") or "",
            tool_call_id=m.get("tool_call_id") or "",
            tool_calls=calls,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidRequest(f"{param}: {exc}", param=param) from None


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
        self._conn = _Connection(target, api_key, tls, root_certificates, grpc)
        self.timeout = timeout
        self.max_retries = max_retries

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._conn.channel.close()

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
        return self._call(self._conn.stub.Generate, request, timeout)

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerateResult:
        """The whole completion (same keywords as ``stream``)."""
        return GenerateResult.from_chunks(list(self.stream(prompt, **kwargs)))

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str = "",
        timeout: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        request_id: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        **sampling: Any,
    ) -> Iterator[GenerateChunk]:
        """The reply to a conversation, chunk by chunk.

        Args:
            messages: OpenAI's message dicts (``tool_calls`` and ``tool`` messages included).
            add_generation_prompt: end the prompt with the assistant's turn.
            chat_template_kwargs: extra variables for the chat template.
            tools: OpenAI's tools (``{"type": "function", "function": {"name", "description",
                "parameters"}}``); the chat template shows them to the model.
            tool_choice: ``"none"``, ``"auto"`` (needs the router's
                ``--enable-auto-tool-choice`` and ``--tool-call-parser``), ``"required"`` or
                ``{"type": "function", "function": {"name": ...}}``; default: ``"auto"`` with
                tools, as OpenAI's.
            parallel_tool_calls: False: at most one call per reply.
            **sampling: ``stream``'s keywords and sampling fields.

        Yields:
            ``GenerateChunk``s; with tools, their ``text`` is content only and their
            ``tool_calls`` the calls' pieces.

        Raises:
            InvalidRequest: naming the field (``tools``, ``tool_choice``, ...).
        """
        request = _chat_request(
            messages,
            model,
            priority,
            cache_salt,
            request_id,
            add_generation_prompt,
            chat_template_kwargs,
            tools,
            tool_choice,
            parallel_tool_calls,
            sampling,
        )
        return self._call(self._conn.stub.Chat, request, timeout)

    def chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> GenerateResult:
        """The whole reply to a conversation (same keywords as ``chat_stream``, ``tools``,
        ``tool_choice`` and ``parallel_tool_calls`` included): with tools, ``tool_calls`` holds
        the calls (``ToolCall``: id, name, arguments as JSON text) and ``text`` the content."""
        return GenerateResult.from_chunks(list(self.chat_stream(messages, **kwargs)))

    def _call(self, rpc, request, timeout: float | None) -> Iterator[GenerateChunk]:
        """The call's chunks; the request was checked already, the clock starts at the first
        chunk asked for."""
        attempts = _Attempts(timeout if timeout is not None else self.timeout, self.max_retries)
        while True:
            call = rpc(request, timeout=attempts.timeout(), metadata=self._conn.metadata())
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

    def models(self) -> list[ModelInfo]:
        try:
            resp = self._conn.stub.ListModels(
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
        self._conn = _Connection(target, api_key, tls, root_certificates, grpc.aio)
        self.timeout = timeout
        self.max_retries = max_retries

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._conn.channel.close()

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
    ) -> AsyncIterator[GenerateChunk]:
        """Chunks as the tokens are generated. ``timeout`` bounds the whole call, retries included,
        from the first chunk asked for; UNAVAILABLE is retried (``max_retries``) only before the
        first chunk."""
        request = _request(prompt, model, priority, cache_salt, request_id, sampling)
        return self._call(self._conn.stub.Generate, request, timeout)

    async def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerateResult:
        """The whole completion (same keywords as ``stream``)."""
        return GenerateResult.from_chunks([c async for c in self.stream(prompt, **kwargs)])

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str = "",
        timeout: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        request_id: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        **sampling: Any,
    ) -> AsyncIterator[GenerateChunk]:
        """The reply to a conversation, chunk by chunk (``Client.chat_stream``'s arguments)."""
        request = _chat_request(
            messages,
            model,
            priority,
            cache_salt,
            request_id,
            add_generation_prompt,
            chat_template_kwargs,
            tools,
            tool_choice,
            parallel_tool_calls,
            sampling,
        )
        return self._call(self._conn.stub.Chat, request, timeout)

    async def chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> GenerateResult:
        """The whole reply to a conversation (same keywords as ``chat_stream``)."""
        return GenerateResult.from_chunks([c async for c in self.chat_stream(messages, **kwargs)])

    async def _call(self, rpc, request, timeout: float | None) -> AsyncIterator[GenerateChunk]:
        """The call's chunks; the request was checked already, the clock starts at the first
        chunk asked for."""
        attempts = _Attempts(timeout if timeout is not None else self.timeout, self.max_retries)
        while True:
            call = rpc(request, timeout=attempts.timeout(), metadata=self._conn.metadata())
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

    async def models(self) -> list[ModelInfo]:
        try:
            resp = await self._conn.stub.ListModels(
                router_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._conn.metadata()
            )
        except grpc.RpcError as e:
            raise self._conn.error(e) from None
        return [ModelInfo(m.id, m.max_model_len) for m in resp.models]
