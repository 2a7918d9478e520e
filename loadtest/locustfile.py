"""Load test for a running Tandem router: OpenAI streaming chat, streaming completions, gRPC SDK.

Start nothing here: point it at a router (``make loadtest URL=http://host:8000``, or ``locust -f
loadtest/locustfile.py -H http://host:8000``). The user types run side by side (pick some with
``locust ... ChatStreamUser``); the SDK user only with ``--grpc-target HOST:PORT`` (``make
loadtest GRPC=HOST:PORT``: the router's gRPC address, which ``tandem up`` prints). Every request
reports locust events:

=========  ==========================  =======================================================
type       name                        response_time (ms) / response_length
=========  ==========================  =======================================================
POST/gRPC  chat, completions, sdk      end-to-end latency / output tokens
TTFT       chat, completions, sdk      time to the first content chunk
TPOT       chat, completions, sdk      (E2E - TTFT) / (output tokens - 1)
ITL        chat, completions, sdk      each gap between content chunks
TOKENS     chat, completions, sdk      output tokens of the request (a count, not a time)
=========  ==========================  =======================================================

and, with ``--jsonl FILE``, one JSON row per request (``loadtest/measure.py``: ids, ok/error,
prompt/cached/output tokens, TTFT, TPOT, E2E, every ITL gap). Workload shapes
(``loadtest/workloads.py``): ``--workload random`` (independent prompts of random length),
``shared-prefix`` (a few long system prompts shared by all users: prefix-cache reuse) and
``multi-turn`` (each user's conversation grows turn by turn, then starts over).
"""

import itertools
import logging
import os
import sys
import time
import uuid

import requests
from locust import User, between, events, task
from measure import JsonlWriter, RequestRecord, StreamError, StreamTimer, sse_payloads
from workloads import WORKLOADS, Conversation, WorkloadOptions, as_prompt

_user_numbers = itertools.count()
_writer = JsonlWriter(None)
_sdk_client = None
"""``tandem.sdk.Client`` once a ``--grpc-target`` turned the SDK user on (imported only then:
the HTTP users need locust alone, not Tandem's gRPC stack)."""


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("Tandem")
    group.add_argument("--model", default="", help="model name (default: the router's first model)")
    group.add_argument(
        "--grpc-target",
        default="",
        help="router gRPC host:port, as `tandem up` prints it (`router ... grpc HOST:PORT`); the "
        "SDK user (GrpcUser) runs only with it",
    )
    group.add_argument("--workload", choices=WORKLOADS, default="random")
    group.add_argument("--prompt-words-min", type=int, default=20)
    group.add_argument("--prompt-words-max", type=int, default=200)
    group.add_argument(
        "--system-prompts", type=int, default=4, help="shared-prefix / multi-turn: system prompts"
    )
    group.add_argument("--system-prompt-words", type=int, default=300)
    group.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    group.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    group.add_argument(
        "--respect-eos", action="store_true", help="stop at EOS (default: always max-tokens)"
    )
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--jsonl", default="", help="append one JSON row per request to this file")
    group.add_argument("--request-timeout", type=float, default=300.0)
    group.add_argument(
        "--api-key",
        default=os.environ.get("TANDEM_API_KEY", ""),
        help="API key of a router started with --api-key (default: $TANDEM_API_KEY)",
    )


@events.init.add_listener
def _check_options(environment, **kwargs) -> None:
    """A bad option stops locust before any user starts (SystemExit passes through event hooks)."""
    opts = environment.parsed_options
    if opts is None:  # locust used as a library
        return
    try:
        _workload_options(opts)
        if opts.max_tokens < 1:
            raise ValueError("--max-tokens must be at least 1")
        _choose_sdk_user(environment, opts)
    except ValueError as e:
        logging.getLogger("loadtest").error("bad option: %s", e)
        sys.exit(2)


def _choose_sdk_user(environment, opts) -> None:
    """The SDK user runs against ``--grpc-target`` only: the router's gRPC port is not derived
    from its HTTP URL (``tandem up`` picks a free one). Without a target it is left out, unless
    named on the command line, which is then a bad option.

    Raises:
        ValueError: GrpcUser named without a target, or the SDK cannot be imported.
    """
    global _sdk_client
    if not opts.grpc_target:
        if GrpcUser.__name__ in (opts.user_classes or ()):
            raise ValueError(
                "GrpcUser needs --grpc-target HOST:PORT (the router's gRPC address; `tandem up` "
                "prints it on its router line)"
            )
        environment.user_classes[:] = [u for u in environment.user_classes if u is not GrpcUser]
        if environment.user_classes:
            logging.getLogger("loadtest").info(
                "GrpcUser off: no --grpc-target (make loadtest GRPC=HOST:PORT turns it on)"
            )
        return
    try:
        import grpc.experimental.gevent as grpc_gevent

        from tandem.sdk import Client
    except ImportError as e:
        raise ValueError(
            f"--grpc-target needs Tandem's SDK and grpcio ({e}); run from the repository with "
            "its .venv (make setup), or leave --grpc-target out"
        ) from e
    grpc_gevent.init_gevent()  # before any channel exists: gRPC's I/O must cooperate with gevent
    _sdk_client = Client


@events.test_start.add_listener
def _on_test_start(environment, **kwargs) -> None:
    global _writer
    _writer = JsonlWriter(environment.parsed_options.jsonl or None)


@events.quitting.add_listener
def _on_quit(environment, **kwargs) -> None:
    _writer.close()


def _workload_options(opts) -> WorkloadOptions:
    return WorkloadOptions(
        workload=opts.workload,
        prompt_words_min=opts.prompt_words_min,
        prompt_words_max=opts.prompt_words_max,
        system_prompts=opts.system_prompts,
        system_prompt_words=opts.system_prompt_words,
        turns=opts.turns,
        seed=opts.seed,
    )


class _TandemUser(User):
    abstract = True
    wait_time = between(0.0, 0.5)
    api = ""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.opts = opts
        self.conversation = Conversation(_workload_options(opts), next(_user_numbers))

    def _report(
        self, record: RequestRecord, request_type: str, exception: Exception | None = None
    ) -> None:
        """Fire the request's locust events and write its JSONL row."""
        fire = self.environment.events.request.fire
        name = self.api
        if exception is None:
            record.ok = True
            ms = lambda s: s * 1000.0  # noqa: E731
            fire(
                request_type=request_type,
                name=name,
                response_time=ms(record.e2e_s),
                response_length=record.output_tokens,
                exception=None,
                context={"request_id": record.request_id},
            )
            fire(
                request_type="TTFT",
                name=name,
                response_time=ms(record.ttft_s),
                response_length=0,
                exception=None,
            )
            if record.output_tokens > 1:
                fire(
                    request_type="TPOT",
                    name=name,
                    response_time=ms(record.tpot_s),
                    response_length=0,
                    exception=None,
                )
            for gap in record.itl_s:
                fire(
                    request_type="ITL",
                    name=name,
                    response_time=ms(gap),
                    response_length=0,
                    exception=None,
                )
            fire(
                request_type="TOKENS",
                name=name,
                response_time=record.output_tokens,
                response_length=0,
                exception=None,
            )
        else:
            record.error = f"{type(exception).__name__}: {exception}"
            elapsed = time.time() - record.started_at
            fire(
                request_type=request_type,
                name=name,
                response_time=elapsed * 1000.0,
                response_length=0,
                exception=exception,
                context={"request_id": record.request_id},
            )
        _writer.write(record)

    def _sampling(self) -> dict:
        return {
            "max_tokens": self.opts.max_tokens,
            "temperature": 0.0,
            "ignore_eos": not self.opts.respect_eos,
        }


class _OpenAIUser(_TandemUser):
    abstract = True

    def on_start(self) -> None:
        super().on_start()
        self.session = requests.Session()
        if self.opts.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.opts.api_key}"
        self.model = self.opts.model or self._first_model()

    def on_stop(self) -> None:
        self.session.close()

    def _first_model(self) -> str:
        r = self.session.get(f"{self.host}/v1/models", timeout=30)
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    def _stream(self, path: str, body: dict, content_of) -> None:
        """POST a streaming request, time its content chunks, report it."""
        request_id = f"locust-{uuid.uuid4().hex[:16]}"
        record = RequestRecord(api=self.api, workload=self.opts.workload, request_id=request_id)
        body = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self._sampling(),
            **body,
        }
        timer = StreamTimer()
        text: list[str] = []
        try:
            with self.session.post(
                f"{self.host}{path}",
                json=body,
                stream=True,
                timeout=self.opts.request_timeout,
                headers={"x-request-id": request_id},
            ) as r:
                if r.status_code != 200:
                    raise StreamError(f"HTTP {r.status_code}: {r.text[:300]}")
                usage = None
                for payload in sse_payloads(r.iter_lines()):
                    if payload.get("usage"):
                        usage = payload["usage"]
                    for choice in payload.get("choices", ()):
                        piece = content_of(choice)
                        if piece:
                            timer.content()
                            text.append(piece)
            if usage is None:
                raise StreamError("no usage chunk (stream_options.include_usage was asked)")
            timer.finish(record, usage["completion_tokens"])
            record.prompt_tokens = usage["prompt_tokens"]
            record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        except Exception as exc:  # noqa: BLE001 - every failure is a failed request, reported
            self._report(record, "POST", exc)
            return
        self.conversation.answered("".join(text))
        self._report(record, "POST")


class ChatStreamUser(_OpenAIUser):
    """``POST /v1/chat/completions`` with ``stream: true``; TTFT at the first content delta."""

    api = "chat"

    @task
    def chat(self) -> None:
        messages = self.conversation.next_messages()
        self._stream(
            "/v1/chat/completions",
            {"messages": messages},
            lambda c: c.get("delta", {}).get("content"),
        )


class CompletionUser(_OpenAIUser):
    """``POST /v1/completions`` with ``stream: true``; the chat messages joined as one prompt."""

    api = "completions"

    @task
    def complete(self) -> None:
        prompt = as_prompt(self.conversation.next_messages())
        self._stream("/v1/completions", {"prompt": prompt}, lambda c: c.get("text"))


class GrpcUser(_TandemUser):
    """The gRPC client SDK (``tandem.sdk.Client``), reporting through locust's request events;
    on only with ``--grpc-target``."""

    api = "sdk"

    def on_start(self) -> None:
        super().on_start()
        self.client = _sdk_client(
            self.opts.grpc_target,
            timeout=self.opts.request_timeout,
            max_retries=0,
            api_key=self.opts.api_key or None,
        )

    def on_stop(self) -> None:
        self.client.close()

    @task
    def generate(self) -> None:
        request_id = f"locust-{uuid.uuid4().hex[:16]}"
        record = RequestRecord(api=self.api, workload=self.opts.workload, request_id=request_id)
        prompt = as_prompt(self.conversation.next_messages())
        timer = StreamTimer()
        text: list[str] = []
        try:
            usage = None
            for chunk in self.client.stream(
                prompt, model=self.opts.model, request_id=request_id, **self._sampling()
            ):
                if chunk.token_ids:
                    timer.content()
                    text.append(chunk.text)
                usage = chunk.usage or usage
            if usage is None:
                raise StreamError("the stream ended without usage")
            timer.finish(record, usage.completion_tokens)
            record.prompt_tokens, record.cached_tokens = usage.prompt_tokens, usage.cached_tokens
        except Exception as exc:  # noqa: BLE001 - every failure is a failed request, reported
            self._report(record, "gRPC", exc)
            return
        self.conversation.answered("".join(text))
        self._report(record, "gRPC")
