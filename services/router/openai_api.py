"""OpenAI-compatible completions and chat completions on top of the Dispatcher.

Responses follow OpenAI's wire format as vLLM serves it. Streams (SSE, ``data: <json>\\n\\n``)
are: for chat, a role chunk, content deltas, a finish chunk (empty delta, ``finish_reason``),
an optional usage chunk (``stream_options.include_usage``), then ``data: [DONE]``; completions
are the same without the role chunk. A stream is only opened once the request produced its first
tokens, so admission errors still get a proper status code (429, 503, ...).
"""

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson

from services.router.flow import Dispatcher, Route
from services.router.http_errors import error_body, status_for
from services.router.jobs import JobBuilder
from services.router.openai_protocol import ChatCompletionRequest, CompletionRequest
from tandem.api.errors import InvalidRequest, RequestTooLarge, TandemError
from tandem.api.requests import Job, TokenEvent, Usage, coalesce_token_events

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Choice:
    """What one prompt produced (non-streaming)."""

    text: str = ""
    token_ids: list[int] | None = None
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None


def sse(payload: dict | str) -> bytes:
    """One server-sent event (orjson: the SSE chunks are the router's hottest JSON)."""
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


def usage_json(usages: list[Usage]) -> dict:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages)},
    }


class OpenAIServing:
    """The OpenAI routes' work: requests to jobs (through the router's one ``JobBuilder``), jobs
    through the ``Dispatcher``, and the events back in OpenAI's response and SSE formats."""

    def __init__(
        self, jobs: JobBuilder, dispatcher: Dispatcher, *, trust_request_chat_template: bool = False
    ) -> None:
        """
        Args:
            trust_request_chat_template: render chat templates that requests supply (else 400).
        """
        self.jobs = jobs
        self.dispatcher = dispatcher
        self.tokenizer = jobs.tokenizer
        self.model_name = jobs.model_name
        self.trust_request_chat_template = trust_request_chat_template

    # ---- request -> jobs --------------------------------------------------------------------

    def completion_jobs(self, req: CompletionRequest, request_id: str) -> list[Job]:
        self.jobs.check_model(req.model)
        prompts = req.prompts()
        self.jobs.check_prompt_count(len(prompts))
        sampling = req.sampling_fields()
        return [
            self.jobs.job(
                f"{request_id}-{i}",
                self.jobs.encode(prompt) if isinstance(prompt, str) else prompt,
                sampling,
                priority=req.priority,
                cache_salt=req.cache_salt,
            )
            for i, prompt in enumerate(prompts)
        ]

    def chat_job(self, req: ChatCompletionRequest, request_id: str) -> Job:
        self.jobs.check_model(req.model)
        template = req.request_chat_template
        if template is not None and not self.trust_request_chat_template:
            raise InvalidRequest(
                "a chat template was sent with the request, but the router does not run "
                "request chat templates (--trust-request-chat-template is not set)",
                param="chat_template",
            )
        messages = req.template_messages()
        sampling = req.sampling_fields()
        # Before rendering: every message renders to at least one token, and their text alone
        # must fit the context.
        if len(messages) >= self.jobs.max_model_len:
            raise RequestTooLarge(
                f"the conversation has {len(messages)} messages; this model's context of "
                f"{self.jobs.max_model_len} tokens cannot hold them",
                param="messages",
            )
        self.jobs.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        text = self._render_chat(req, messages, template)
        ids = self.jobs.encode(text, "messages", add_special_tokens=False)
        return self.jobs.job(
            request_id,
            ids,
            sampling,
            priority=req.priority,
            cache_salt=req.cache_salt,
            prompt_param="messages",
        )

    def _render_chat(self, req: ChatCompletionRequest, messages, template: str | None) -> str:
        """The conversation rendered to prompt text: by the model's template, or by the
        request's when trusted (both in transformers' sandboxed Jinja environment). Whatever a
        template raises (``{{ 1/0 }}``, a sandbox refusal) is the request's fault: 400."""
        kwargs = dict(req.chat_template_kwargs or {})
        kwargs.pop("chat_template", None)
        if template is not None:
            kwargs["chat_template"] = template
        try:
            text = self.tokenizer.render_chat(
                messages,
                add_generation_prompt=req.add_generation_prompt,
                chat_template_kwargs=kwargs,
            )
        except InvalidRequest as exc:
            if template is None:
                raise
            raise InvalidRequest(exc.message, param="chat_template") from None
        except Exception as exc:  # noqa: BLE001 - a template's runtime error, reported as such
            raise InvalidRequest(
                f"the chat template failed: {type(exc).__name__}: {exc}",
                param="chat_template" if template is not None else "messages",
            ) from None
        if not isinstance(text, str):
            raise InvalidRequest(
                "chat_template_kwargs changed what the template returns",
                param="chat_template_kwargs",
            )
        return text

    # ---- logprobs in OpenAI's two formats ---------------------------------------------------

    def _token(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.tokenizer.token_text(token_id)

    def _chat_logprobs(self, lps, as_ids: bool) -> dict:
        def entry(token_id: int, lp: float) -> dict:
            text = self._token(token_id, as_ids)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                for lp in lps
            ]
        }

    def _completion_logprobs(self, lps, as_ids: bool, offset: int = 0) -> dict:
        tokens, offsets = [], []
        for lp in lps:
            text = self.tokenizer.token_text(lp.token_id)
            tokens.append(self._token(lp.token_id, as_ids))
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            # As vLLM: the top alternatives, plus the sampled token if it is not among them.
            "top_logprobs": [
                {self._token(t, as_ids): v for t, v in (*lp.top, (lp.token_id, lp.logprob))}
                for lp in lps
            ],
            "text_offset": offsets,
        }

    # ---- non-streaming ----------------------------------------------------------------------

    async def _collect(self, job: Job, route: Route) -> _Choice:
        choice = _Choice(token_ids=[], logprobs=[])
        async for event in self.dispatcher.generate(job, route):
            choice.text += event.text
            choice.token_ids += event.token_ids
            choice.logprobs += event.logprobs
            if event.finish_reason is not None:
                choice.finish_reason, choice.stop_reason, choice.usage = (
                    event.finish_reason,
                    event.stop_reason,
                    event.usage,
                )
        return choice

    async def completion(
        self, req: CompletionRequest, jobs: list[Job], request_id: str, routes: list[Route]
    ) -> dict:
        tasks = [
            asyncio.ensure_future(self._collect(j, r)) for j, r in zip(jobs, routes, strict=True)
        ]
        try:
            choices = await asyncio.gather(*tasks)
        finally:
            for t in tasks:  # one prompt failed (or the client left): stop generating the others
                t.cancel()
        return {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": i,
                    "text": c.text,
                    "logprobs": (
                        self._completion_logprobs(c.logprobs, req.return_tokens_as_token_ids)
                        if req.logprobs is not None
                        else None
                    ),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage_json([c.usage for c in choices if c.usage]),
        }

    async def chat(
        self, req: ChatCompletionRequest, job: Job, request_id: str, route: Route
    ) -> dict:
        c = await self._collect(job, route)
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(c.logprobs, req.return_tokens_as_token_ids)
                    if req.logprobs
                    else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            ],
            "usage": usage_json([c.usage] if c.usage else []),
        }

    # ---- streaming --------------------------------------------------------------------------

    async def open_stream(
        self, events: AsyncIterator[tuple[int, TokenEvent]]
    ) -> AsyncIterator[tuple[int, TokenEvent]]:
        """Wait for the first event (so errors before it become HTTP statuses), then relay all."""
        first = await events.__anext__()

        async def relay():
            try:
                yield first
                # Closed before ``events``: its read-ahead task must stop reading them first.
                async with contextlib.aclosing(coalesced(events)) as rest:
                    async for item in rest:
                        yield item
            finally:
                await events.aclose()

        return relay()

    async def completion_sse(
        self, req: CompletionRequest, request_id: str, events
    ) -> AsyncIterator[bytes]:
        head = {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        usages, offsets = [], {}
        async for body in self._guard(events):
            if isinstance(body, bytes):
                yield body
                return
            i, event = body
            if event.text or event.logprobs:
                lp = None
                if req.logprobs is not None:
                    lp = self._completion_logprobs(
                        event.logprobs, req.return_tokens_as_token_ids, offsets.get(i, 0)
                    )
                    offsets[i] = offsets.get(i, 0) + len(event.text)
                choice = {
                    "index": i,
                    "text": event.text,
                    "logprobs": lp,
                    "finish_reason": None,
                    "stop_reason": None,
                }
                yield sse({**head, "choices": [choice]})
            if event.finish_reason is not None:
                finish = {
                    "index": i,
                    "text": "",
                    "logprobs": None,
                    "finish_reason": event.finish_reason,
                    "stop_reason": event.stop_reason,
                }
                yield sse({**head, "choices": [finish]})
                if event.usage:
                    usages.append(event.usage)
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage_json(usages)})
        yield sse("[DONE]")

    async def chat_sse(
        self, req: ChatCompletionRequest, request_id: str, events
    ) -> AsyncIterator[bytes]:
        head = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model_name,
        }
        role = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        yield sse({**head, "choices": [role]})
        usage = None
        async for body in self._guard(events):
            if isinstance(body, bytes):
                yield body
                return
            _, event = body
            if event.text or event.logprobs:
                lp = (
                    self._chat_logprobs(event.logprobs, req.return_tokens_as_token_ids)
                    if req.logprobs
                    else None
                )
                delta = {
                    "index": 0,
                    "delta": {"content": event.text},
                    "logprobs": lp,
                    "finish_reason": None,
                }
                yield sse({**head, "choices": [delta]})
            if event.finish_reason is not None:
                finish = {
                    "index": 0,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": event.finish_reason,
                    "stop_reason": event.stop_reason,
                }
                yield sse({**head, "choices": [finish]})
                usage = event.usage
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage_json([usage] if usage else [])})
        yield sse("[DONE]")

    @staticmethod
    async def _guard(events):
        """Relay events; an error after the stream opened becomes an SSE error event and [DONE]."""
        try:
            async for item in events:
                yield item
        except Exception as exc:  # noqa: BLE001 - the client must learn the stream ended in error
            if not isinstance(exc, TandemError):
                logger.exception("stream failed unexpectedly")
            status, err_type = status_for(exc)
            message = (
                str(exc)
                if isinstance(exc, TandemError)
                else f"internal error: {type(exc).__name__}"
            )
            yield sse(error_body(message, status, err_type, getattr(exc, "param", None))) + sse(
                "[DONE]"
            )


async def coalesced(
    events: AsyncIterator[tuple[int, TokenEvent]],
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Relay (choice index, event) pairs as they come; the events of one choice that queued up
    while the consumer was busy (a client reading slowly) come as one, merged in order.

    A task reads ``events`` ahead into a queue, so the pods' streams are drained at their pace
    whatever the client's.
    """
    items: collections.deque = collections.deque()
    ready = asyncio.Event()
    end = object()

    async def pump() -> None:
        try:
            async for item in events:
                items.append(item)
                ready.set()
            items.append(end)
        except BaseException as exc:  # noqa: BLE001 - raised again to the consumer, in order
            items.append(exc)
        ready.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            if not items:
                ready.clear()
                await ready.wait()
                continue
            item = items.popleft()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            i, event = item
            batch = [event]
            while items and isinstance(items[0], tuple) and items[0][0] == i:
                batch.append(items.popleft()[1])
            yield i, coalesce_token_events(batch)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def merge_events(
    dispatcher: Dispatcher, jobs: list[Job], routes: list[Route]
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """The events of several jobs, tagged with their index, as they come."""
    if len(jobs) == 1:
        async for event in dispatcher.generate(jobs[0], routes[0]):
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, job: Job, route: Route) -> None:
        try:
            async for event in dispatcher.generate(job, route):
                await queue.put((i, event))
            await queue.put(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put(exc)

    tasks = [
        asyncio.create_task(pump(i, j, r))
        for i, (j, r) in enumerate(zip(jobs, routes, strict=True))
    ]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
