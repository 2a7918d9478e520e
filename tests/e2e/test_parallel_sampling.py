"""Parallel sampling (``n``, ``best_of``) end to end: real router, prefill and decode processes on
CPU, the official ``openai`` client and the SDK. Every choice equals the offline engine's
(per-sample seeds), the samples share the prompt's blocks on the decode pod (its prefix-cache
hits), usage counts the prompt once and every returned token, and the blocks come back."""

import random

import openai
import pytest

from services.local_cluster import pod_stats
from tandem.engine import SamplingParams
from tandem.sdk import Client

from .conftest import wait_idle

pytestmark = pytest.mark.integration

BLOCK = 16
MAX_NEW = 6
SEED = 7


def prompt(seed: int) -> list[int]:
    """4 full blocks and 6 tokens: the samples share all 5 blocks, recompute the last token."""
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(4 * BLOCK + 6)]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def routers(cluster) -> dict[str, str]:
    return {
        "disaggregated": cluster.router_url,
        "colocated": f"http://{cluster.by_name('router-colocated').address}",
    }


SAMPLING = dict(temperature=1.0, seed=SEED, max_tokens=MAX_NEW, extra_body={"ignore_eos": True})


def expected(reference, ids: list[int], **kw) -> list[list[int]]:
    params = SamplingParams(temperature=1.0, seed=SEED, max_tokens=MAX_NEW, ignore_eos=True, **kw)
    return [c.token_ids for c in reference.generate([ids], params)[0].outputs]


def decode_hits(cluster) -> int:
    return sum(pod_stats(p).prefix_cache_hits for p in cluster.pods("decode"))


def token_ids(logprobs) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in logprobs.tokens]


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_completions_n3_match_the_offline_engine_and_share_the_prompts_blocks(
    cluster, reference, mode
):
    ids = prompt(1 if mode == "disaggregated" else 2)
    want = expected(reference, ids, n=3)
    before = decode_hits(cluster)
    r = client(routers(cluster)[mode]).completions.create(
        model="",
        prompt=ids,
        n=3,
        logprobs=0,
        **{**SAMPLING, "extra_body": {"ignore_eos": True, "return_tokens_as_token_ids": True}},
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [token_ids(c.logprobs) for c in r.choices] == want
    assert len({tuple(w) for w in want}) == 3
    assert {c.finish_reason for c in r.choices} == {"length"}
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 3 * MAX_NEW)
    # Samples 1 and 2 took the lead's blocks on their decode pod: all but the last token hit.
    assert decode_hits(cluster) - before >= 2 * (len(ids) - 1)
    wait_idle(cluster)


def test_a_stop_string_ends_only_its_own_choice(cluster, reference):
    # The pod's front finds stop strings and stops that sample alone in its engine core.
    ids = prompt(6)
    free = expected(reference, ids, n=3)
    text = reference.tokenizer.decode(free[1])
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    params = SamplingParams(
        temperature=1.0, seed=SEED, max_tokens=MAX_NEW, ignore_eos=True, n=3, stop=[stop]
    )
    want = reference.generate([ids], params)[0].outputs
    assert want[1].finish_reason == "stop"
    r = client(cluster.router_url).completions.create(
        model="", prompt=ids, n=3, stop=[stop], **SAMPLING
    )
    assert [(c.text, c.finish_reason) for c in r.choices] == [
        (w.text, w.finish_reason) for w in want
    ]
    assert r.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    wait_idle(cluster)


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_streamed_completions_carry_each_choices_index(cluster, reference, mode):
    ids = prompt(3)
    want = expected(reference, ids, n=3)
    stream = client(routers(cluster)[mode]).completions.create(
        model="",
        prompt=[ids, ids[:40]],  # two prompts: choice i * n + j
        n=3,
        stream=True,
        stream_options={"include_usage": True},
        **SAMPLING,
    )
    texts, finishes, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finishes[c.index] = c.finish_reason
    assert finishes == {i: "length" for i in range(6)}
    assert [texts[i] for i in range(3)] == [reference.tokenizer.decode(w) for w in want]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids) + 40, 6 * MAX_NEW)
    wait_idle(cluster)


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_chat_n3_streaming_and_not(cluster, mode):
    api = client(routers(cluster)[mode])
    messages = [{"role": "user", "content": "Tell me about blocks " * 12}]
    r = api.chat.completions.create(model="", messages=messages, n=3, **SAMPLING)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in r.choices)
    assert len({c.message.content for c in r.choices}) == 3
    assert r.usage.completion_tokens == 3 * MAX_NEW
    stream = api.chat.completions.create(
        model="",
        messages=messages,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
        **SAMPLING,
    )
    texts, roles, finishes, usage = {}, set(), {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.index)
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                finishes[c.index] = c.finish_reason
    assert roles == {0, 1, 2} and finishes == {0: "length", 1: "length", 2: "length"}
    # The same seed: the stream's choices are the non-streamed ones.
    assert [texts[i] for i in range(3)] == [c.message.content for c in r.choices]
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, 3 * MAX_NEW)
    wait_idle(cluster)


def test_best_of_returns_the_most_likely_of_its_samples(cluster, reference):
    ids = prompt(4)
    want = expected(reference, ids, n=2, best_of=4)
    r = client(cluster.router_url).completions.create(
        model="", prompt=ids, n=2, best_of=4, **SAMPLING
    )
    assert [c.text for c in r.choices] == [reference.tokenizer.decode(w) for w in want]
    assert all(c.logprobs is None for c in r.choices)
    assert r.usage.completion_tokens == 2 * MAX_NEW  # the returned choices' tokens (as vLLM)
    wait_idle(cluster)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 129}, "n"),
        ({"n": 1, "best_of": 200}, "best_of"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"n": 1, "best_of": 2, "stream": True}, "best_of"),
    ],
)
def test_bad_n_and_best_of_are_400_naming_the_field(cluster, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(cluster.router_url).completions.create(
            model="", prompt="hello", max_tokens=2, **body
        )
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_sdk_returns_every_choice(cluster, reference):
    ids = prompt(5)
    want = expected(reference, ids, n=3)
    with Client(cluster.router_grpc, timeout=60) as sdk:
        result = sdk.generate(
            ids, n=3, temperature=1.0, seed=SEED, max_tokens=MAX_NEW, ignore_eos=True
        )
        chunks = list(
            sdk.stream(ids, n=3, temperature=1.0, seed=SEED, max_tokens=MAX_NEW, ignore_eos=True)
        )
    assert [list(c.token_ids) for c in result.choices] == want
    assert list(result.token_ids) == want[0]
    assert result.usage.completion_tokens == 3 * MAX_NEW
    assert {c.index for c in chunks} == {0, 1, 2}
    assert [c for c in chunks if c.usage is not None] == [chunks[-1]]
    wait_idle(cluster)
