"""Prompt scoring end to end, as evaluation harnesses ask for it (lm-eval's loglikelihood:
``echo`` + ``logprobs``, ``max_tokens`` 0 or 1, ``temperature`` 0), and vLLM's
``prompt_logprobs`` on both endpoints: real router, prefill and decode processes on CPU, the
official ``openai`` client, every prompt logprob equal to transformers' log-softmax (1e-4)."""

import random

import httpx
import openai
import pytest
import torch

from tandem.engine import SamplingParams
from tandem.sdk import Client

from .conftest import wait_idle

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hf(e2e_model, hf_reference):
    return hf_reference(e2e_model, 1)


def random_prompt(seed: int, n: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def hf_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i scores prompt token i + 1."""
    return torch.log_softmax(hf.logits(prompt).float(), dim=-1)[:-1]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def routers(cluster) -> dict[str, str]:
    return {
        "disaggregated": cluster.router_url,
        "colocated": f"http://{cluster.by_name('router-colocated').address}",
    }


def tid(token: str) -> int:
    return int(token.removeprefix("token_id:"))


def assert_prompt_part(lp, prompt: list[int], lsm: torch.Tensor, k: int) -> None:
    """The prompt's part of an echoed completion's logprobs (return_tokens_as_token_ids)."""
    n = len(prompt)
    assert [tid(t) for t in lp.tokens[:n]] == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for i in range(1, n):
        row, token = lsm[i - 1], prompt[i]
        assert lp.token_logprobs[i] == pytest.approx(row[token].item(), abs=1e-4), i
        top = {tid(t): v for t, v in lp.top_logprobs[i].items()}
        # The prompt's token itself, then the top k (at most k + 1 entries, as vLLM).
        assert next(iter(top)) == token
        want = set(row.topk(k).indices.tolist()) | {token}
        assert set(top) == want, i
        for t, v in top.items():
            assert v == pytest.approx(row[t].item(), abs=1e-4)


@pytest.mark.parametrize("max_tokens", [0, 1])
@pytest.mark.parametrize("path", ["disaggregated", "colocated"])
def test_echo_logprobs_score_the_prompt_like_transformers(cluster, hf, path, max_tokens):
    prompt = random_prompt(seed=max_tokens)
    lsm = hf_logprobs(hf, prompt)
    got = client(routers(cluster)[path]).completions.create(
        model=cluster.served_model_name(),
        prompt=prompt,
        echo=True,
        logprobs=2,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    (choice,) = got.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt) + max_tokens
    assert_prompt_part(lp, prompt, lsm, k=2)
    if max_tokens:  # the generated token follows, its text offset counting on
        (want,) = hf.generate(prompt)
        assert tid(lp.tokens[-1]) == want and lp.token_logprobs[-1] is not None
        assert lp.text_offset[-1] > lp.text_offset[-2]
    assert choice.finish_reason == "length"
    # vLLM's prompt_logprobs rides along: null, then {token id: {logprob, rank, decoded_token}}.
    plp = choice.model_extra["prompt_logprobs"]
    assert len(plp) == len(prompt) and plp[0] is None
    first = plp[1][str(prompt[1])]
    assert set(first) == {"logprob", "rank", "decoded_token"}
    assert first["logprob"] == pytest.approx(lsm[0, prompt[1]].item(), abs=1e-4)
    assert first["rank"] == int((lsm[0] > lsm[0, prompt[1]]).sum()) + 1
    assert got.usage.prompt_tokens == len(prompt)
    wait_idle(cluster)


def test_echo_returns_the_prompt_text_and_a_cached_prompt_is_scored_whole(cluster, hf, reference):
    text = "The quick brown fox jumps over the lazy dog, again and again and again."
    prompt = reference.tokenizer.encode(text)
    lsm = hf_logprobs(hf, prompt)
    api = client(cluster.router_url)
    for _ in range(2):  # the second time the pods cache the prompt's blocks
        got = api.completions.create(
            model=cluster.served_model_name(),
            prompt=text,
            echo=True,
            logprobs=1,
            max_tokens=0,
            temperature=0,
            extra_body={"return_tokens_as_token_ids": True},
        )
        (choice,) = got.choices
        assert choice.text == text  # a text prompt is echoed as sent
        assert_prompt_part(choice.logprobs, prompt, lsm, k=1)
        assert got.usage.prompt_tokens_details.cached_tokens == 0  # the cache was bypassed
    # Without echo, the same prompt is served from the prefix cache.
    plain = api.completions.create(
        model=cluster.served_model_name(), prompt=text, max_tokens=1, temperature=0
    )
    assert plain.usage.prompt_tokens_details.cached_tokens > 0
    assert plain.choices[0].text and not plain.choices[0].text.startswith(text)
    wait_idle(cluster)


def test_echo_stream_sends_the_prompt_first(cluster, hf):
    prompt = random_prompt(seed=5, n=30)
    lsm = hf_logprobs(hf, prompt)
    stream = client(cluster.router_url).completions.create(
        model=cluster.served_model_name(),
        prompt=prompt,
        echo=True,
        logprobs=1,
        max_tokens=3,
        temperature=0,
        stream=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    chunks = [c for c in stream if c.choices]
    first = chunks[0].choices[0]
    assert first.logprobs.tokens[: len(prompt)] == [f"token_id:{t}" for t in prompt]
    assert_prompt_part(first.logprobs, prompt, lsm, k=1)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == len(prompt) + 3
    assert chunks[-1].choices[0].finish_reason == "length"
    wait_idle(cluster)


def test_prompt_logprobs_on_chat_and_completions(cluster, hf, reference):
    messages = [{"role": "user", "content": "score this sentence, token by token"}]
    prompt = reference.chat(messages, SamplingParams(temperature=0, max_tokens=1))[0]
    prompt_ids = prompt.prompt_token_ids
    lsm = hf_logprobs(hf, prompt_ids)
    for url in routers(cluster).values():
        reply = client(url).chat.completions.create(
            model=cluster.served_model_name(),
            messages=messages,
            max_tokens=1,
            temperature=0,
            extra_body={"prompt_logprobs": 3},
        )
        plp = reply.model_extra["prompt_logprobs"]
        assert len(plp) == len(prompt_ids) == reply.usage.prompt_tokens and plp[0] is None
        for i, entry in enumerate(plp[1:], start=1):
            ids = [int(t) for t in entry]
            assert ids[0] == prompt_ids[i]  # the prompt's token first, then the top 3
            assert set(ids) == set(lsm[i - 1].topk(3).indices.tolist()) | {prompt_ids[i]}
            for t, v in entry.items():
                assert v["logprob"] == pytest.approx(lsm[i - 1, int(t)].item(), abs=1e-4)
    # Completions without echo: the choice carries them; the text is the generated token's only.
    ids = random_prompt(seed=9, n=12)
    got = client(cluster.router_url).completions.create(
        model=cluster.served_model_name(),
        prompt=ids,
        max_tokens=1,
        temperature=0,
        extra_body={"prompt_logprobs": 0},
    )
    plp = got.choices[0].model_extra["prompt_logprobs"]
    lsm = hf_logprobs(hf, ids)
    assert [list(e) for e in plp[1:]] == [[str(t)] for t in ids[1:]]
    assert [e[str(t)]["logprob"] for e, t in zip(plp[1:], ids[1:], strict=True)] == pytest.approx(
        [lsm[i, t].item() for i, t in enumerate(ids[1:])], abs=1e-4
    )
    wait_idle(cluster)


def test_prompt_logprobs_reach_the_sdk(cluster, hf):
    prompt = random_prompt(seed=11, n=20)
    lsm = hf_logprobs(hf, prompt)
    with Client(cluster.router_grpc, timeout=60) as sdk:
        result = sdk.generate(prompt, max_tokens=2, temperature=0, prompt_logprobs=1)
    plp = result.prompt_logprobs
    assert plp is not None and [lp.token_id for lp in plp] == prompt[1:]
    assert [lp.logprob for lp in plp] == pytest.approx(
        [lsm[i, t].item() for i, t in enumerate(prompt[1:])], abs=1e-4
    )
    assert all(len(lp.top) == 1 for lp in plp)
    wait_idle(cluster)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (
            "/v1/completions",
            {"prompt": "x", "max_tokens": 1, "prompt_logprobs": 21},
            "prompt_logprobs",
        ),
        ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21}, "logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 21},
            "prompt_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 2, "stream": True},
            "prompt_logprobs",
        ),
    ],
)
def test_bad_scoring_requests_get_400_naming_the_field(cluster, path, body, param):
    r = httpx.post(f"{cluster.router_url}{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["message"]
    assert err["param"] == param
    wait_idle(cluster)
