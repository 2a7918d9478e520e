"""Fuzz the router's HTTP API with schemathesis, from the router's own OpenAPI schema.

Every operation of ``/openapi.json`` (completions, chat completions, models, health, metrics)
gets schemathesis' positive (schema-valid) and negative (schema-violating) inputs, sent to a
real router in front of real pods. Every body's output is bounded to a few tokens (a generated
``max_tokens`` of 10^9 still goes through: it is refused before any work), and most valid bodies
are steered deeper -- the served model's name, half of them without the generated extreme
sampling values -- so that they reach tokenizing, sampling and the pods instead of stopping at
"model not found". On top, a handful of hand-written hostile inputs (lone
surrogates, invalid UTF-8, deep nesting, wrong methods and routes) run every time.

Checks, per input: no 5xx, a 4xx carries the OpenAI envelope ``{"error": {"message", "type",
"code", ...}}``, the call returns within its deadline; at the end: every process alive and every
pod back at its baseline free KV blocks. The figures go to ``fuzz-figures.json`` (see
conftest.py). Long mode: ``TANDEM_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/fuzz``.
"""

import json
import random
import time

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .conftest import check_cluster, fuzz_examples, idle_free_blocks

pytestmark = [pytest.mark.fuzz, pytest.mark.integration, pytest.mark.slow]

CALL_TIMEOUT_S = 30.0
"""Per-call deadline: an answer later than this counts as a hang."""
MAX_OUTPUT_TOKENS = 8


def envelope_problem(response) -> str | None:
    """Why a 4xx body is not an OpenAI error envelope (None if it is)."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:120]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return f"no error object: {str(body)[:120]}"
    missing = [k for k in ("message", "type", "code") if k not in err]
    return f"error object lacks {missing}" if missing else None


PLAIN_KEYS = {"model", "prompt", "messages", "max_tokens", "stream", "n", "stop", "seed"}


def steer(case, model: str, rng: random.Random, *, positive: bool) -> None:
    """Bound every body's output (no max_tokens means "up to the context": minutes of CPU for a
    generated request); steer most valid bodies deeper: the served model's name, half of them
    without the generated extreme sampling values, small n."""
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        value = body.get(key)
        if isinstance(value, int) and MAX_OUTPUT_TOKENS < value <= 4096:
            body[key] = rng.randint(1, MAX_OUTPUT_TOKENS)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = rng.randint(1, MAX_OUTPUT_TOKENS)
    if not positive or rng.random() < 0.3:
        return
    body["model"] = model
    if "prompt" in body and not body["prompt"]:
        body["prompt"] = "fuzz"
    if rng.random() < 0.5:
        for key in [k for k in body if k not in PLAIN_KEYS]:
            del body[key]
    for key, cap in (("n", 3), ("best_of", 3)):
        value = body.get(key)
        if isinstance(value, int) and cap < value <= 4096:
            body[key] = rng.randint(1, cap)


def judge(status: int | None, response, exc: BaseException | None) -> tuple[str, str | None]:
    """(outcome class, failure reason or None)."""
    if exc is not None:
        if isinstance(exc, requests.Timeout):
            return "hang", f"no answer within {CALL_TIMEOUT_S:g} s"
        return "connection error", f"{type(exc).__name__}: {exc}"
    if status >= 500:
        return f"5xx {status}", response.text[:300]
    if status >= 400:
        problem = envelope_problem(response)
        return f"4xx {status}", (f"4xx without the envelope: {problem}" if problem else None)
    return f"2xx {status}", None


def test_router_openapi_fuzz(fuzz_cluster, figures):
    url = fuzz_cluster.router_url
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    baseline = idle_free_blocks(fuzz_cluster)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5, [op.label for op in operations]
    # the budget goes to the operations that take input (GET /health has none: one call)
    with_body = [op for op in operations if op.method.upper() == "POST"]
    per_run = max(1, fuzz_examples() // (2 * max(1, len(with_body))))
    rng = random.Random(18)
    session = requests.Session()

    def send(case):
        try:
            response = case.call(base_url=url, session=session, timeout=CALL_TIMEOUT_S)
            return response.status_code, response, None
        except requests.RequestException as exc:
            return None, None, exc

    def fuzz(operation, mode):
        @settings(
            max_examples=per_run,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            steer(case, model, rng, positive=mode is GenerationMode.POSITIVE)
            start = time.monotonic()
            status, response, exc = send(case)
            outcome, failure = judge(status, response, exc)
            figures.record(
                f"{operation.method.upper()} {operation.path} {outcome}",
                None
                if failure is None
                else {
                    "operation": operation.label,
                    "mode": mode.value,
                    "body": _clip(case.body),
                    "headers": _clip(case.headers),
                    "query": _clip(case.query),
                    "problem": failure,
                },
                time.monotonic() - start,
                f"{operation.label} {status} {_clip(case.body, 240)}",
                _error_message(response) if status and 400 <= status < 500 else "",
            )

        try:
            run()
        except Unsatisfiable:  # nothing to generate (e.g. a negative GET /health: no inputs)
            pass

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode)

    for name, method, path, content, headers in HOSTILE:
        try:
            response = session.request(
                method, url + path, data=content, headers=headers, timeout=CALL_TIMEOUT_S
            )
            status, exc = response.status_code, None
        except requests.RequestException as e:
            response, status, exc = None, None, e
        outcome, failure = judge(status, response, exc)
        figures.record(
            f"hostile {name}: {outcome}",
            None if failure is None else {"input": name, "problem": failure},
        )

    check_cluster(fuzz_cluster, baseline, figures)
    assert not figures.crashed, figures.crashed
    assert not figures.failures, json.dumps(figures.failures[:5], indent=1)
    assert not figures.leaked_blocks, figures.leaked_blocks


def _error_message(response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""


def _clip(value, limit: int = 600):
    if hasattr(value, "items"):
        value = dict(value.items())
    text = json.dumps(value, default=repr, ensure_ascii=True)
    return json.loads(text) if len(text) <= limit else text[:limit] + "..."


_JSON = {"content-type": "application/json"}
HOSTILE = [
    # (name, method, path, raw body, headers)
    (
        "lone surrogate prompt",
        "POST",
        "/v1/completions",
        b'{"model": null, "prompt": "a\\ud800b", "max_tokens": 2}',
        _JSON,
    ),
    (
        "lone surrogate message",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}',
        _JSON,
    ),
    ("invalid utf-8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}', _JSON),
    (
        "deep nesting",
        "POST",
        "/v1/completions",
        b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        _JSON,
    ),
    ("not json", "POST", "/v1/completions", b"prompt=hello", _JSON),
    ("empty body", "POST", "/v1/chat/completions", b"", _JSON),
    ("wrong method", "GET", "/v1/completions", None, {}),
    ("unknown route", "GET", "/v1/nothing-here", None, {}),
    ("delete models", "DELETE", "/v1/models", None, {}),
    (
        "huge request id",
        "POST",
        "/v1/completions",
        b'{"prompt": "hi", "max_tokens": 1}',
        {**_JSON, "x-request-id": "r" * 20_000},
    ),
    (
        "template injection",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,'
        b' "chat_template_kwargs": {"chat_template": "{{ 1/0 }}"}}',
        _JSON,
    ),
    (
        "many prompts",
        "POST",
        "/v1/completions",
        json.dumps({"prompt": ["a"] * 5000, "max_tokens": 1}).encode(),
        _JSON,
    ),
    ("negative max_tokens", "POST", "/v1/completions", b'{"prompt": "a", "max_tokens": -1}', _JSON),
    (
        "token id out of vocab",
        "POST",
        "/v1/completions",
        b'{"prompt": [4294967295], "max_tokens": 1}',
        _JSON,
    ),
]
