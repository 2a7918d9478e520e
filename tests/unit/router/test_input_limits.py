"""Bounded input on the router: the body middleware at the ASGI level, the router app's refusals
in the OpenAI envelope, the character bound before tokenizing, request chat templates, the
prompt and request-id caps, and the same bounds on the gRPC RouterService."""

import asyncio

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from services.router.grpc_api import RouterServicer
from services.router.input_limits import (
    BODY_BYTES,
    REQUEST_ID_MAX_CHARS,
    BodyLimits,
    InputLimitsMiddleware,
    LargeTextGate,
    chars_per_token_bound,
    valid_request_id,
)
from services.router.jobs import JobBuilder
from services.router.openai_api import OpenAIServing
from services.router.openai_protocol import ChatCompletionRequest
from tandem.api.errors import InvalidRequest, RequestTooLarge
from tandem.proto.router.v1 import router_pb2
from tandem.tokenizer import Tokenizer

LIMIT = 1000


# ---- the middleware, driven as uvicorn drives it --------------------------------------------


class Echo:
    """The app behind the middleware: records what it received, answers 200."""

    def __init__(self):
        self.bodies: list[bytes] = []
        self.after_body: list[dict] = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message["body"])
        assert message["more_body"] is False
        self.after_body.append(await receive())  # the client's disconnect, passed through
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def run_middleware(messages, *, headers=(), timeout_s=1.0, limits=None):
    """(status, headers, body, app, messages the middleware read): ``messages`` are what the
    client sends (an ``asyncio.Event`` in them blocks forever: a client that stalls)."""
    app = Echo()
    middleware = InputLimitsMiddleware(app, limits=limits or BodyLimits(LIMIT, timeout_s))
    scope = {"type": "http", "method": "POST", "path": "/", "headers": list(headers)}
    pending = list(messages)
    read, sent = [], []

    async def receive():
        if not pending:
            return {"type": "http.disconnect"}
        message = pending.pop(0)
        if isinstance(message, asyncio.Event):
            await message.wait()
        read.append(message)
        return message

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    if not sent:
        return None, {}, None, app, read
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"], app, read


def chunk(data: bytes, more: bool = False) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


def test_a_declared_length_over_the_limit_is_refused_before_any_byte_is_read():
    status, headers, body, app, read = run_middleware(
        [chunk(b"x" * 10, more=True)], headers=[(b"content-length", str(LIMIT + 1).encode())]
    )
    assert status == 413 and read == [] and app.bodies == []
    assert headers[b"connection"] == b"close"
    error = orjson.loads(body)["error"]
    assert error["code"] == 413 and error["type"] == "RequestTooLargeError"
    assert str(LIMIT) in error["message"]


def test_a_body_without_length_is_counted_as_it_arrives():
    parts = [chunk(b"[" + b"1," * 200, more=True) for _ in range(5)] + [chunk(b"1]")]
    status, headers, _, app, read = run_middleware(parts)
    assert status == 413 and headers[b"connection"] == b"close" and app.bodies == []
    assert len(read) == 3  # 403 bytes a message: refused on the one that passed 1,000


def test_a_body_at_the_limit_reaches_the_app_whole_then_the_disconnect():
    payload = orjson.dumps(["x" * (LIMIT - 10)])[:LIMIT]
    assert len(payload) <= LIMIT
    parts = [chunk(payload[:300], more=True), chunk(payload[300:])]
    status, _, _, app, _ = run_middleware(parts, headers=[(b"content-type", b"text/plain")])
    assert status == 200 and app.bodies == [payload]
    assert app.after_body == [{"type": "http.disconnect"}]


def test_a_body_that_stalls_gets_408_and_the_connection_closes():
    stall = asyncio.Event()
    status, headers, body, app, _ = run_middleware(
        [chunk(b'{"prompt":', more=True), stall], timeout_s=0.1
    )
    assert status == 408 and headers[b"connection"] == b"close" and app.bodies == []
    assert orjson.loads(body)["error"]["type"] == "RequestTimeoutError"


def test_a_client_gone_mid_body_gets_nothing():
    status, _, _, app, _ = run_middleware([chunk(b"{", more=True)])  # then http.disconnect
    assert status is None and app.bodies == []


@pytest.mark.parametrize(
    "body",
    [
        rb'{"prompt": "a\ud800b"}',  # a lone surrogate, escaped
        b'{"prompt": "a\xed\xa0\x80b"}',  # a surrogate encoded as UTF-8 bytes
        b'{"prompt": "a\xffb"}',  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested past any parser's recursion
        b'{"temperature": NaN}',
        b'{"prompt": "a"',
    ],
    ids=["escaped-surrogate", "utf8-surrogate", "invalid-utf8", "deep", "nan", "truncated"],
)
def test_json_that_is_not_strict_utf8_json_is_a_400(body):
    app = Echo()
    middleware = InputLimitsMiddleware(app, limits=BodyLimits(len(body) + 1, 1.0))
    sent = []

    async def receive():
        return chunk(body)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(middleware(scope, receive, send))
    assert sent[0]["status"] == 400 and app.bodies == []
    error = orjson.loads(sent[1]["body"])["error"]
    assert error["type"] == "BadRequestError" and "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    "body",
    [rb'{"prompt": "\ud83d\ude00"}', b'\xef\xbb\xbf{"prompt": "x"}', '{"p": "\u00e9"}'.encode()],
    ids=["surrogate-pair", "bom", "utf8"],
)
def test_valid_json_passes_unchanged(body):
    status, _, _, app, _ = run_middleware([chunk(body)])
    assert status == 200 and app.bodies == [body]


def test_request_ids():
    assert valid_request_id("req_01H-abc.def:9/x+y=@~") == "req_01H-abc.def:9/x+y=@~"
    assert valid_request_id(b"7f3c" * 32) == "7f3c" * 32
    for bad in ("x" * (REQUEST_ID_MAX_CHARS + 1), "a b", "a\r\nb", "", None, "é", b"\xff"):
        assert valid_request_id(bad) is None, bad


# ---- the router app ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router_app(llama_dir):
    from services.router.app import create_app
    from services.router.settings import RouterSettings

    settings = RouterSettings(
        model=llama_dir,
        decode=["127.0.0.1:1"],
        allow_unauthenticated=True,
        max_prompts_per_request=4,
        max_request_body_bytes=1 << 20,
    )
    return create_app(settings)  # no lifespan: nothing is dispatched in these tests


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def assert_envelope(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"] and error["param"] == param
    return error


def test_unknown_routes_and_methods_answer_in_the_envelope(router_app):
    assert_envelope(call(router_app, "GET", "/v1/nothing"), 404)
    wrong = call(router_app, "GET", "/v1/completions")
    assert assert_envelope(wrong, 405)["type"] == "MethodNotAllowedError"
    assert wrong.headers["allow"] == "POST"


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", rb'{"prompt": "\ud800"}'),
        ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "a\udfff"}]}'),
        ("/v1/completions", b'{"prompt": "\xc3\x28"}'),
    ],
)
def test_lone_surrogates_and_invalid_utf8_are_a_400(router_app, path, body):
    response = call(
        router_app, "POST", path, content=body, headers={"content-type": "application/json"}
    )
    assert_envelope(response, 400)


def test_a_body_over_the_limit_is_a_413(router_app):
    response = call(router_app, "POST", "/v1/completions", json={"prompt": "x" * (1 << 20)})
    assert assert_envelope(response, 413)["type"] == "RequestTooLargeError"


def test_more_prompts_than_the_cap_is_a_400(router_app):
    error = assert_envelope(
        call(router_app, "POST", "/v1/completions", json={"prompt": ["a"] * 5}), 400, "prompt"
    )
    assert "5 prompts" in error["message"] and "at most 4" in error["message"]


def test_a_prompt_the_context_could_never_hold_is_a_400(router_app):
    jobs = router_app.state.serving.jobs
    text = "a" * (jobs.max_prompt_chars + 1)
    error = assert_envelope(
        call(router_app, "POST", "/v1/completions", json={"prompt": text}), 400, "prompt"
    )
    assert "characters" in error["message"]
    chat = {"messages": [{"role": "user", "content": text}]}
    assert_envelope(call(router_app, "POST", "/v1/chat/completions", json=chat), 400, "messages")


@pytest.mark.parametrize(
    "extra",
    [
        {"chat_template": "{{ 'x' }}"},
        {"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}},
    ],
)
def test_a_request_chat_template_is_refused_unless_trusted(router_app, extra):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    error = assert_envelope(
        call(router_app, "POST", "/v1/chat/completions", json=body), 400, "chat_template"
    )
    assert "--trust-request-chat-template" in error["message"]


def test_an_odd_request_id_is_replaced_and_a_good_one_echoed(router_app):
    bad = call(router_app, "GET", "/v1/nothing", headers={"x-request-id": "x" * 10_000})
    assert len(bad.headers["x-request-id"]) == 32  # a generated uuid4 hex
    good = call(router_app, "GET", "/v1/nothing", headers={"x-request-id": "req-42"})
    assert good.headers["x-request-id"] == "req-42"


# ---- JobBuilder and OpenAIServing with the real tokenizer ------------------------------------


class CountingTokenizer:
    """The real tokenizer, counting the texts it is asked to encode."""

    def __init__(self, real: Tokenizer):
        self.real, self.backend, self.calls = real, real.backend, 0

    def encode(self, text, **kwargs):
        self.calls += 1
        return self.real.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return Tokenizer(llama_dir)


def builder(tokenizer, max_model_len=64) -> JobBuilder:
    return JobBuilder(
        CountingTokenizer(tokenizer),
        model_name="llama",
        vocab_size=tokenizer.vocab_size,
        max_model_len=lambda: max_model_len,
    )


def test_a_text_over_the_bound_is_refused_without_tokenizing(tokenizer):
    jobs = builder(tokenizer)
    assert jobs.chars_per_token == chars_per_token_bound(tokenizer) >= 16
    with pytest.raises(RequestTooLarge) as refused:
        jobs.encode("a" * (jobs.max_prompt_chars + 1))
    assert refused.value.param == "prompt" and jobs.tokenizer.calls == 0
    jobs.encode("a" * jobs.max_prompt_chars)  # at the bound: tokenized (the token check decides)
    assert jobs.tokenizer.calls == 1


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_the_bound_never_refuses_a_prompt_the_context_holds(tokenizer, data):
    """Any text of fewer tokens than the context is within ``max_prompt_chars``."""
    jobs = builder(tokenizer, max_model_len=32)
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), min_size=1, max_size=31))
    text = tokenizer.backend.decode(ids, skip_special_tokens=False)
    jobs.check_prompt_chars(len(text))
    longest = max(tokenizer.backend.get_vocab(with_added_tokens=True), key=len)
    jobs.check_prompt_chars(len(longest) * 31)


def serving(tokenizer, trusted: bool) -> OpenAIServing:
    return OpenAIServing(builder(tokenizer, 2048), None, trust_request_chat_template=trusted)


def chat(**extra) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **extra)


def test_a_trusted_request_template_renders(tokenizer):
    job = serving(tokenizer, True).chat_job(chat(chat_template="{{ messages[0].content }}!"), "r")
    assert tokenizer.decode(job.prompt_token_ids) == "hi!"
    via_kwargs = chat(chat_template_kwargs={"chat_template": "<{{ messages[0].content }}>"})
    job = serving(tokenizer, True).chat_job(via_kwargs, "r")
    assert tokenizer.decode(job.prompt_token_ids) == "<hi>"


@pytest.mark.parametrize(
    "template, words",
    [
        ("{{ 1/0 }}", "ZeroDivisionError"),
        ("{% for i in range(10**9) %}x{% endfor %}", "OverflowError"),  # the sandbox's cap
        ("{{ messages.append(1) }}", "unsafe"),  # the immutable sandbox
        ("{% for %}", "Expected an expression"),
    ],
)
def test_a_failing_trusted_template_is_a_400(tokenizer, template, words):
    with pytest.raises(InvalidRequest) as refused:
        serving(tokenizer, True).chat_job(chat(chat_template=template), "r")
    assert refused.value.param == "chat_template" and words in str(refused.value)


def test_a_non_string_template_in_kwargs_is_a_400(tokenizer):
    with pytest.raises(InvalidRequest):
        serving(tokenizer, True).chat_job(chat(chat_template_kwargs={"chat_template": 3}), "r")


def test_more_messages_than_the_context_has_tokens_is_refused_before_rendering(tokenizer):
    many = ChatCompletionRequest(messages=[{"role": "user", "content": ""}] * 2048)
    with pytest.raises(RequestTooLarge):
        serving(tokenizer, False).chat_job(many, "r")


# ---- the gRPC RouterService -------------------------------------------------------------------


def test_grpc_requests_have_the_same_bounds(tokenizer):
    servicer = RouterServicer(builder(tokenizer, max_model_len=64), None, None)
    jobs = servicer.jobs
    with pytest.raises(RequestTooLarge):
        servicer._job(router_pb2.GenerateRequest(text="a" * (jobs.max_prompt_chars + 1)))
    assert jobs.tokenizer.calls == 0
    too_many = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=[1] * 64))
    with pytest.raises(RequestTooLarge):
        servicer._job(too_many)
    for bad in ("x" * (REQUEST_ID_MAX_CHARS + 1), "a\nb"):
        with pytest.raises(InvalidRequest) as refused:
            servicer._job(router_pb2.GenerateRequest(text="hi", request_id=bad))
        assert refused.value.param == "request_id"
    job = servicer._job(router_pb2.GenerateRequest(text="hi", request_id="sdk-1"))
    assert job.request_id == "sdk-1" and jobs.tokenizer.calls == 1


# ---- the body is checked whatever its Content-Type, parsed once, its shape checked first ------


@pytest.mark.parametrize(
    "headers",
    [
        [("content-type", "application/json"), ("content-type", "text/plain")],
        [("content-type", "text/plain")],
    ],
    ids=["duplicated", "not-json"],
)
def test_a_lone_surrogate_is_a_400_whatever_the_content_type(router_app, headers):
    """Starlette reads the first of duplicated headers: a check that read the last one let a
    lone surrogate through to the tokenizer (500)."""
    body = rb'{"prompt": "\ud800", "max_tokens": 2}'
    response = call(router_app, "POST", "/v1/completions", content=body, headers=headers)
    assert "not valid JSON" in assert_envelope(response, 400)["message"]


def test_a_text_the_tokenizer_cannot_take_is_a_400_not_a_500(tokenizer):
    with pytest.raises(InvalidRequest) as refused:
        builder(tokenizer).encode("a\ud800b", "messages")
    assert refused.value.param == "messages" and "lone surrogates" in refused.value.message


def test_fastapi_takes_the_middlewares_parse_instead_of_parsing_again(router_app, monkeypatch):
    import starlette.requests

    def no_second_parse(*args, **kwargs):
        raise AssertionError("the body was parsed a second time")

    monkeypatch.setattr(starlette.requests.json, "loads", no_second_parse)
    response = call(router_app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 503, response.text  # past parsing: no decode pod answers


def test_a_body_with_more_json_values_than_any_request_is_a_413_before_parsing(router_app):
    jobs = router_app.state.serving.jobs
    most = jobs.max_prompts_per_request * jobs.max_model_len
    body = b'{"prompt": [' + b",".join([b"[1]"] * most) + b"]}"
    response = call(router_app, "POST", "/v1/completions", content=body)
    assert "JSON values" in assert_envelope(response, 413)["message"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": [[1]] * 5}, "prompt", "5 prompts"),
        ({"prompt": [1] * 65}, "prompt", "65 tokens"),
        ({"prompt": [[1], [1] * 65]}, "prompt", "65 tokens"),
        ({"messages": [{"role": "user", "content": "a"}] * 64}, "messages", "64 messages"),
        ({"prompt": "a", "stop": ["x"] * 2000}, "stop", "2000 entries"),
    ],
)
def test_a_body_no_request_could_be_is_refused_before_validation(tokenizer, body, param, words):
    jobs = builder(tokenizer)  # context 64
    jobs.max_prompts_per_request = 4
    status, _, data, app, _ = run_middleware(
        [chunk(orjson.dumps(body))], limits=BodyLimits(10**6, 1.0, check_json=jobs.check_json_shape)
    )
    error = orjson.loads(data)["error"]
    assert status == 400 and app.bodies == [] and error["param"] == param
    assert words in error["message"]
    jobs.check_json_shape({"prompt": [[1] * 64] * 4, "messages": [{}] * 63, "stop": ["x"] * 999})


def test_large_texts_are_tokenized_a_few_at_a_time_and_small_ones_never_wait():
    gate = LargeTextGate(threshold_bytes=100, slots=2)
    running = peak = 0

    async def tokenize(size: int, release: asyncio.Event):
        nonlocal running, peak
        request = Request({"type": "http", "headers": [], "state": {BODY_BYTES: size}})
        async with gate.slot(request):
            large = size > gate.threshold_bytes
            running += large
            peak = max(peak, running)
            await release.wait()
            running -= large

    async def main():
        release = asyncio.Event()
        large = [asyncio.create_task(tokenize(101, release)) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert running == 2  # the other three wait for a slot
        await asyncio.wait_for(tokenize(100, _set()), 1)  # small: served while they wait
        release.set()
        await asyncio.gather(*large)

    asyncio.run(main())
    assert peak == 2


def _set() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


def test_a_body_with_more_arrays_than_any_request_is_a_413_before_parsing(tokenizer):
    jobs = builder(tokenizer)  # context 64, 128 prompts: 8,192 values, 384 containers
    lists = b'{"prompt": [' + b",".join([b"[1]"] * 500) + b"]}"
    limits = BodyLimits(
        10**6,
        1.0,
        max_json_values=lambda: jobs.max_json_values,
        max_json_containers=lambda: jobs.max_json_containers,
    )
    status, _, data, app, _ = run_middleware([chunk(lists)], limits=limits)
    assert status == 413 and app.bodies == []
    assert "JSON arrays and objects" in orjson.loads(data)["error"]["message"]
    ids = orjson.dumps({"prompt": [[1] * 60] * 100})
    status, *_ = run_middleware([chunk(ids)], limits=limits)
    assert status == 200


def test_a_trusted_request_template_serves_a_model_without_one(llama_dir):
    bare = Tokenizer(llama_dir)
    bare._hf.chat_template = None  # a base model: no template of its own
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequest, match="no chat template"):
        bare.render_chat(messages)
    kwargs = {"chat_template": "<{{ messages[0].content }}>"}
    assert bare.render_chat(messages, chat_template_kwargs=kwargs) == "<hi>"
