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
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson

from services.router import prompt_scoring
from services.router.flow import Dispatcher, Route
from services.router.http_errors import error_body, status_for
from services.router.jobs import JobBuilder
from services.router.openai_protocol import ChatCompletionRequest, CompletionRequest
from services.router.tool_calls import ToolPlan, check_tools, plan_tools
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
    prompt_logprobs: list | None = None
    """The prompt's token logprobs (``SamplingParams.prompt_logprobs``), from the first event."""


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
        self,
        jobs: JobBuilder,
        dispatcher: Dispatcher,
        *,
        trust_request_chat_template: bool = False,
        tool_call_parser: str | None = None,
        enable_auto_tool_choice: bool = False,
    ) -> None:
        """
        Args:
            trust_request_chat_template: render chat templates that requests supply (else 400).
            tool_call_parser: the ``tool_parsers`` parser of the served model's call format.
            enable_auto_tool_choice: serve ``tool_choice: "auto"`` (needs ``tool_call_parser``).
        """
        self.tool_call_parser = tool_call_parser
        self.enable_auto_tool_choice = enable_auto_tool_choice
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
        plan = self.tool_plan(req)
        sampling = req.sampling_fields(plan.constraint if plan else None)
        if plan is not None and plan.skip_special_tokens is not None:
            sampling["skip_special_tokens"] = plan.skip_special_tokens
        return self.jobs.job(
            request_id,
            self.chat_prompt_ids(req),
            sampling,
            priority=req.priority,
            cache_salt=req.cache_salt,
            prompt_param="messages",
        )

    def chat_prompt_ids(
        self, req: ChatCompletionRequest, *, add_special_tokens: bool = False
    ) -> list[int]:
        """The conversation's prompt token ids, rendered as every chat front door renders it:
        ``/v1/chat/completions``, ``/tokenize`` (messages) and the gRPC ``Chat`` RPC (which
        builds a ``ChatCompletionRequest`` for this). Reads no sampling field.

        Args:
            add_special_tokens: also add the tokenizer's own special tokens (BOS) on top of
                what the template writes (vLLM's ``/tokenize`` option; chat completions never).
        """
        self.jobs.check_model(req.model)
        template = req.request_chat_template
        if template is not None and not self.trust_request_chat_template:
            raise InvalidRequest(
                "a chat template was sent with the request, but the router does not run "
                "request chat templates (--trust-request-chat-template is not set)",
                param="chat_template",
            )
        messages = req.template_messages()
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
        return self.jobs.encode(text, "messages", add_special_tokens=add_special_tokens)

    def tool_plan(self, req: ChatCompletionRequest) -> ToolPlan | None:
        """The request's tool plan (``tool_calls.plan_tools``), made once and kept on it for
        the response."""
        if not req.tool_plan_made:
            req.set_tool_plan(
                plan_tools(
                    req.tools,
                    req.tool_choice,
                    req.parallel_tool_calls,
                    parser_name=self.tool_call_parser,
                    enable_auto=self.enable_auto_tool_choice,
                )
            )
        return req.tool_plan

    def _render_chat(self, req: ChatCompletionRequest, messages, template: str | None) -> str:
        """The conversation rendered to prompt text: by the model's template, or by the
        request's when trusted (both in transformers' sandboxed Jinja environment). Whatever a
        template raises (``{{ 1/0 }}``, a sandbox refusal) is the request's fault: 400."""
        kwargs = dict(req.chat_template_kwargs or {})
        kwargs.pop("chat_template", None)
        if template is not None:
            kwargs["chat_template"] = template
        if req.tools:  # the template shows the model its tools (as vLLM, also with "none")
            kwargs["tools"] = check_tools(req.tools)
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

    # ---- prompt scoring: prompt_logprobs, echo (services/router/prompt_scoring.py) ----------

    def _echo_parts(self, req: CompletionRequest, jobs: list[Job]) -> list[str]:
        """Each prompt's echoed text, by job (one job per prompt)."""
        return [prompt_scoring.echo_text(p, self.tokenizer) for p in req.prompts()[: len(jobs)]]

    def _prompt_scoring(
        self, req: CompletionRequest, job: Job, c: _Choice, echo: str | None
    ) -> dict:
        """What prompt scoring adds to (or changes in) a completion choice: ``prompt_logprobs``
        when asked; with echo the prompt's text (and logprobs) before the choice's. With
        max_tokens=0 the token generated (the request ran with max_tokens=1, as vLLM) is
        dropped: the choice is the prompt alone."""
        out: dict = {}
        if job.params.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_scoring.prompt_logprobs_json(
                c.prompt_logprobs, self.tokenizer
            )
        if echo is None:
            return out
        as_ids = req.return_tokens_as_token_ids
        out["text"] = echo if req.echo_only else echo + c.text
        if req.logprobs is not None:
            part, offset = prompt_scoring.echo_logprobs(
                job.prompt_token_ids,
                c.prompt_logprobs,
                req.logprobs,
                lambda t: self._token(t, as_ids),
                self.tokenizer,
            )
            if not req.echo_only:
                part = prompt_scoring.join_logprobs(
                    part, self._completion_logprobs(c.logprobs, as_ids, offset)
                )
            out["logprobs"] = part
        return out

    # ---- non-streaming ----------------------------------------------------------------------

    async def _collect(self, job: Job, route: Route) -> list[_Choice]:
        """The job's ``n`` completions (the request's usage on the one whose event carried it;
        the prompt's logprobs on each)."""
        choices = [_Choice(token_ids=[], logprobs=[]) for _ in range(job.params.n)]
        prompt_logprobs = None
        async for event in self.dispatcher.generate(job, route):
            choice = choices[event.index]
            choice.text += event.text
            choice.token_ids += event.token_ids
            choice.logprobs += event.logprobs
            if event.prompt_logprobs is not None and prompt_logprobs is None:
                prompt_logprobs = event.prompt_logprobs
            if event.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = event.finish_reason, event.stop_reason
            if event.usage is not None:
                choice.usage = event.usage
        for choice in choices:
            choice.prompt_logprobs = prompt_logprobs
        return choices

    async def completion(
        self, req: CompletionRequest, jobs: list[Job], request_id: str, routes: list[Route]
    ) -> dict:
        tasks = [
            asyncio.ensure_future(self._collect(j, r)) for j, r in zip(jobs, routes, strict=True)
        ]
        try:
            per_job = await asyncio.gather(*tasks)
        finally:
            for t in tasks:  # one prompt failed (or the client left): stop generating the others
                t.cancel()
        # As vLLM and OpenAI: prompt i's completion j is choice i * n + j.
        choices = [c for cs in per_job for c in cs]
        n = len(per_job[0]) if per_job else 1
        echo = self._echo_parts(req, jobs) if req.echo else None
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
                    **self._prompt_scoring(req, jobs[i // n], c, echo[i // n] if echo else None),
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage_json([c.usage for c in choices if c.usage]),
        }

    async def chat(
        self, req: ChatCompletionRequest, job: Job, request_id: str, route: Route
    ) -> dict:
        choices = await self._collect(job, route)
        c = choices[0]
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [self._chat_choice(req, i, choice) for i, choice in enumerate(choices)],
            "usage": usage_json([x.usage for x in choices if x.usage]),
            **(
                {
                    "prompt_logprobs": prompt_scoring.prompt_logprobs_json(
                        c.prompt_logprobs, self.tokenizer
                    )
                }
                if job.params.prompt_logprobs is not None
                else {}
            ),
        }

    def _chat_choice(self, req: ChatCompletionRequest, index: int, c: _Choice) -> dict:
        message, finish_reason = self._chat_message(req, c.text, c.finish_reason)
        return {
            "index": index,
            "message": message,
            "logprobs": self._chat_logprobs(c.logprobs, req.return_tokens_as_token_ids)
            if req.logprobs
            else None,
            "finish_reason": finish_reason,
            "stop_reason": c.stop_reason,
        }

    def _chat_message(
        self, req: ChatCompletionRequest, text: str, finish_reason: str | None
    ) -> tuple[dict, str | None]:
        """A chat choice's message and finish reason: the text, or the tool calls in it."""
        plan = self.tool_plan(req)
        if plan is None:
            return {"role": "assistant", "content": text}, finish_reason
        return plan.message(text, finish_reason)

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
        self, req: CompletionRequest, request_id: str, events, jobs: list[Job] | None = None
    ) -> AsyncIterator[bytes]:
        """``jobs``: the request's, one per prompt (echo streams each prompt first)."""
        head = {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        usages, offsets = [], {}
        echo = self._echo_parts(req, jobs) if req.echo and jobs else None
        n = jobs[0].params.n if jobs else 1  # choice i is prompt i // n's (merge_events)
        async for body in self._guard(events):
            if isinstance(body, bytes):
                yield body
                return
            i, event = body
            if echo is not None and i not in offsets:
                # As vLLM: a choice's first chunk is its prompt, then its first tokens (with
                # echo_only, the prompt alone: the one token generated is dropped).
                first = _Choice(
                    text=event.text,
                    token_ids=[],
                    logprobs=event.logprobs,
                    prompt_logprobs=event.prompt_logprobs,
                )
                choice = {
                    "index": i,
                    "text": event.text,
                    "logprobs": None,
                    "finish_reason": None,
                    "stop_reason": None,
                    **self._prompt_scoring(req, jobs[i // n], first, echo[i // n]),
                }
                choice.pop("prompt_logprobs", None)  # vLLM's stream chunks have no such field
                yield sse({**head, "choices": [choice]})
                offsets[i] = len(choice["text"])
                event = dataclasses.replace(event, text="", logprobs=[])
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
        for i in range(req.n):  # as vLLM: each choice's role first
            role = {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield sse({**head, "choices": [role]})
        usage = None
        plan = self.tool_plan(req)
        # Per choice: its text deltas -> tool-call deltas, and the logprobs of text held back.
        streams: dict[int, tuple] = {}
        async for body in self._guard(events):
            if isinstance(body, bytes):
                yield body
                return
            i, event = body
            if i not in streams:
                streams[i] = (plan.stream() if plan is not None else None, [])
            tools, held_lps = streams[i]
            deltas: list[dict] = []
            if event.text or event.logprobs:
                deltas = tools.feed(event.text) if tools else [{"content": event.text}]
                held_lps.extend(event.logprobs)
            if event.finish_reason is not None and tools is not None:
                deltas += tools.finish()
            for d in deltas:
                lp = (
                    self._chat_logprobs(held_lps, req.return_tokens_as_token_ids)
                    if req.logprobs
                    else None
                )
                held_lps.clear()
                delta = {"index": i, "delta": d, "logprobs": lp, "finish_reason": None}
                yield sse({**head, "choices": [delta]})
            if event.finish_reason is not None:
                finish = {
                    "index": i,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": (
                        tools.finish_reason(event.finish_reason) if tools else event.finish_reason
                    ),
                    "stop_reason": event.stop_reason,
                }
                yield sse({**head, "choices": [finish]})
            if event.usage is not None:
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
    """The events of several jobs, tagged with their choice's index, as they come: job i's
    completion j (``TokenEvent.index``, of its n) is choice ``i * n + j``."""
    if len(jobs) == 1:
        async for event in dispatcher.generate(jobs[0], routes[0]):
            yield event.index, event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, job: Job, route: Route) -> None:
        try:
            async for event in dispatcher.generate(job, route):
                await queue.put((i * job.params.n + event.index, event))
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
