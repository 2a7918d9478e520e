"""The OpenAI HTTP API end to end: real router, prefill and decode processes on CPU."""

import asyncio
import json
import random
import time

import httpx
import pytest

from services.local_cluster import counter_totals, pod_stats
from tandem.engine import SamplingParams

from .conftest import THRESHOLD_TOKENS, wait_idle

pytestmark = pytest.mark.integration

MAX_NEW = 16


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def completion_token_ids(url: str, prompt, **extra) -> tuple[list[int], dict]:
    body = {
        "prompt": prompt,
        "max_tokens": MAX_NEW,
        "temperature": 0,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        **extra,
    }
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    tokens = data["choices"][0]["logprobs"]["tokens"]
    return [int(t.removeprefix("token_id:")) for t in tokens], data


@pytest.fixture(scope="module")
def hf(e2e_model, hf_reference):
    return hf_reference(e2e_model, MAX_NEW)


def test_disaggregated_and_colocated_outputs_match_offline_engine_and_transformers(
    cluster, reference, hf
):
    batch = prompts(8)
    expected = [
        o.outputs[0].token_ids
        for o in reference.generate(batch, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    ]
    colocated = f"http://{cluster.by_name('router-colocated').address}"
    before = pod_stats(cluster.pods("prefill")[0]).prefix_cache_queries
    for prompt, want in zip(batch, expected, strict=True):
        assert want == hf.generate(prompt)
        got, data = completion_token_ids(cluster.router_url, prompt)
        assert got == want
        assert data["choices"][0]["text"] == reference.tokenizer.decode(want)
        assert data["usage"]["prompt_tokens"] == len(prompt) and data["usage"][
            "completion_tokens"
        ] == len(want)
        assert completion_token_ids(colocated, prompt)[0] == want
    # The disaggregating router really used the prefill pod: it saw all 8 prompts.
    assert pod_stats(cluster.pods("prefill")[0]).prefix_cache_queries - before == sum(
        map(len, batch)
    )
    wait_idle(cluster)


def decisions(metrics_url: str) -> dict[str, float]:
    """The router's tandem_router_routing_decisions_total by mode."""
    return counter_totals(metrics_url, "tandem_router_routing_decisions", "mode")


def test_short_prompts_run_colocated_and_long_ones_disaggregated(cluster, reference):
    router = cluster.by_name("router-threshold")
    short, long = (
        prompts(1, seed=7, lo=5, hi=THRESHOLD_TOKENS - 1)[0],
        prompts(1, seed=8, lo=THRESHOLD_TOKENS, hi=60)[0],
    )
    prefill = cluster.pods("prefill")[0]
    for prompt, prefill_used in ((short, False), (long, True)):
        queries, modes = pod_stats(prefill).prefix_cache_queries, decisions(router.metrics_url)
        want = (
            reference.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_NEW))[0]
            .outputs[0]
            .token_ids
        )
        assert completion_token_ids(f"http://{router.address}", prompt)[0] == want
        mode = "disaggregated" if prefill_used else "colocated"
        after = decisions(router.metrics_url)
        assert after.get(mode, 0) == modes.get(mode, 0) + 1, (after, modes)
        assert pod_stats(prefill).prefix_cache_queries - queries == (
            len(prompt) if prefill_used else 0
        )
    wait_idle(cluster)


def test_chat_completion_matches_offline_chat(cluster, reference):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is a KV cache?"},
    ]
    r = httpx.post(
        f"{cluster.router_url}/v1/chat/completions",
        json={"model": "llama", "messages": messages, "max_tokens": MAX_NEW, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    data = r.json()
    want = reference.chat(messages, SamplingParams(temperature=0, max_tokens=MAX_NEW))[0]
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"] == {"role": "assistant", "content": want.outputs[0].text}
    assert data["choices"][0]["finish_reason"] == want.outputs[0].finish_reason
    assert data["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    assert data["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0
    }  # a prompt no pod has seen
    assert r.headers["x-request-id"]


def sse_events(text: str) -> list:
    """Parse an SSE body strictly: only `data: ...` events separated by blank lines."""
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_chat_stream_transcript_follows_openai_format(cluster, reference):
    messages = [{"role": "user", "content": "stream this"}]
    body = {
        "model": "llama",
        "messages": messages,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    r = httpx.post(f"{cluster.router_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    role, *deltas, finish, usage, done = events
    ids = {e["id"] for e in events[:-1]}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(
        e["object"] == "chat.completion.chunk" and e["model"] == "llama" for e in events[:-1]
    )
    assert role["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert deltas and all(
        set(d["choices"][0]["delta"]) == {"content"} and d["choices"][0]["finish_reason"] is None
        for d in deltas
    )
    assert finish["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length", "stop_reason": None}
    ]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 12
    assert "cached_tokens" in usage["usage"]["prompt_tokens_details"]
    assert done == "[DONE]"
    want = (
        reference.chat(messages, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
        .outputs[0]
        .text
    )
    assert "".join(d["choices"][0]["delta"]["content"] for d in deltas) == want


def test_completion_stream_transcript_and_no_usage_by_default(cluster, reference):
    body = {
        "model": "llama",
        "prompt": "completion stream",
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    r = httpx.post(f"{cluster.router_url}/v1/completions", json=body, timeout=60)
    *chunks, finish, done = sse_events(r.text)
    assert done == "[DONE]"
    assert all(
        c["object"] == "text_completion" and c["choices"][0]["finish_reason"] is None
        for c in chunks
    )
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["text"] == ""
    want = reference.generate(
        ["completion stream"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )[0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.outputs[0].text


def test_batch_prompts_in_one_completion(cluster, reference):
    batch = ["first prompt", "a second, longer prompt for the batch"]
    r = httpx.post(
        f"{cluster.router_url}/v1/completions",
        json={"prompt": batch, "max_tokens": 6, "temperature": 0},
        timeout=60,
    )
    data = r.json()
    want = reference.generate(batch, SamplingParams(temperature=0, max_tokens=6))
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert [c["text"] for c in data["choices"]] == [w.outputs[0].text for w in want]
    assert data["usage"]["prompt_tokens"] == sum(len(w.prompt_token_ids) for w in want)


def test_32_concurrent_streams(cluster, reference):
    batch = prompts(32, seed=7, lo=5, hi=120)
    want = [
        o.outputs[0].text
        for o in reference.generate(
            batch, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
        )
    ]

    async def one(client: httpx.AsyncClient, prompt) -> str:
        body = {
            "prompt": prompt,
            "max_tokens": MAX_NEW,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        text = ""
        async with client.stream("POST", f"{cluster.router_url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in batch))

    assert asyncio.run(main()) == want
    wait_idle(cluster)


def seconds_per_token(url: str) -> float:
    """This machine's decode speed through the whole system (one request, 200 tokens)."""
    start = time.monotonic()
    r = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": "speed", "max_tokens": 200, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200
    return (time.monotonic() - start) / 200


def time_to_idle(cluster) -> float:
    start = time.monotonic()
    wait_idle(cluster, timeout=60)
    return time.monotonic() - start


def test_client_disconnect_mid_stream_frees_every_block(cluster):
    wait_idle(cluster)
    per_token = seconds_per_token(cluster.router_url)
    body = {
        "prompt": "a long generation that the client abandons",
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{cluster.router_url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            head = [next(lines) for _ in range(5)]
            # Pod stats are the engine core's latest snapshot (sent with its updates, at least
            # every 100 ms while it steps): under load the first read may predate this request.
            deadline = time.monotonic() + 3
            while True:
                running = sum(pod_stats(s).num_running for s in cluster.pods("decode"))
                if running == 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert running == 1, (head, "".join(list(cluster.log)[-40:]))
    # The connection is closed: the router must cancel the decode stream, the pod free the blocks,
    # long before the ~1995 tokens left would have been generated.
    assert time_to_idle(cluster) < 1995 * per_token / 3


def test_disconnects_during_prefill_and_kv_transfer_free_every_block(cluster, reference):
    """Clients that give up before their first token (while the router looks up, the prefill pod
    computes or the KV pages travel) leave every pod as it was, and the service keeps serving."""
    wait_idle(cluster)
    prompt = [
        (7 * i) % 997 + 3 for i in range(1500)
    ]  # a long prompt: prefill and transfer take a while
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4):
        body = {"prompt": prompt, "max_tokens": 50, "temperature": 0, "stream": True}
        try:  # gone after `delay`, or as soon as the response starts (its first token), if sooner
            with httpx.stream(
                "POST",
                f"{cluster.router_url}/v1/completions",
                json=body,
                timeout=httpx.Timeout(60, read=delay or 0.001),
            ):
                pass
        except httpx.TimeoutException:
            pass
    wait_idle(cluster)
    want = (
        reference.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_NEW))[0]
        .outputs[0]
        .token_ids
    )
    assert completion_token_ids(cluster.router_url, prompt)[0] == want


def test_non_streaming_client_disconnect_is_cancelled_too(cluster):
    wait_idle(cluster)
    per_token = seconds_per_token(cluster.router_url)
    body = {
        "prompt": "a long non-streaming generation",
        "max_tokens": 2000,
        "temperature": 0,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{cluster.router_url}/v1/completions", json=body, timeout=1.0)
    assert time_to_idle(cluster) < (2000 * per_token - 1.0) / 3


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": 12}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-17"}, 404, None),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [5, 10**7]}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "n": 129}, 400, "n"),  # above --max-n
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            400,
            "tools",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 9},
            400,
            "presence_penalty",
        ),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50},
            400,
            "top_logprobs",
        ),
    ],
)
def test_bad_input_gets_the_openai_error_envelope(cluster, path, body, status, param):
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{cluster.router_url}{path}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (
        set(err) == {"message", "type", "param", "code"}
        and err["code"] == status
        and err["message"]
    )
    if param is not None:
        assert err["param"] == param
    # ...and the service keeps serving.
    ok = httpx.post(
        f"{cluster.router_url}/v1/completions",
        json={"prompt": "still up?", "max_tokens": 2},
        timeout=30,
    )
    assert ok.status_code == 200


def test_models_health_and_metrics(cluster):
    assert (
        httpx.post(
            f"{cluster.router_url}/v1/completions",
            json={"prompt": "count me", "max_tokens": 2},
            timeout=30,
        ).status_code
        == 200
    )
    models = httpx.get(f"{cluster.router_url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "llama"
    assert models["data"][0]["max_model_len"] == 2048
    health = httpx.get(f"{cluster.router_url}/health")
    assert health.status_code == 200 and health.json()["decode_pods"] == 2
    metrics = httpx.get(f"{cluster.router_url}/metrics").text
    assert 'tandem_router_requests_total{route="/v1/completions",status="200"}' in metrics
    assert 'tandem_router_routing_decisions_total{mode="disaggregated"}' in metrics
