"""Structured outputs and logit_bias end to end: the official ``openai`` client against real
processes (tiny random model, CPU), through the disaggregating router (the prefill pod samples
the first token under the grammar, a decode pod's matcher continues from it) and the colocated
one. Random weights are no excuse: the grammar decides what is valid."""

import json
import re

import openai
import pytest

from services.local_cluster import pod_stats
from tests.e2e.conftest import wait_idle

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,5} [0-9]{3}"
CHOICES = ["positive", "negative", "not sure"]
ROUTERS = ["router", "router-colocated"]


def follows_schema(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == set(SCHEMA["required"])
        and isinstance(value["city"], str)
        and len(value["city"]) <= 8
        and type(value["population"]) is int
        and 0 <= value["population"] <= 100000
        and isinstance(value["capital"], bool)
    )


def client(cluster, router: str) -> openai.OpenAI:
    url = f"http://{cluster.by_name(router).address}/v1"
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("router", ROUTERS)
def test_outputs_follow_json_schema_regex_and_choice(cluster, router):
    c = client(cluster, router)
    model = c.models.list().data[0].id
    prefill = cluster.pods("prefill")[0]
    queries = pod_stats(prefill).prefix_cache_queries
    chat = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a city as JSON."}],
        max_tokens=80,
        temperature=0,
        extra_body={"structured_outputs": {"json": SCHEMA}},
    )
    choice = chat.choices[0]
    assert follows_schema(choice.message.content) and choice.finish_reason == "stop"
    regex = c.completions.create(
        model=model,
        prompt="The licence number is",
        max_tokens=40,
        temperature=1.0,
        seed=11,
        extra_body={"structured_outputs": {"regex": REGEX}},
    )
    assert re.fullmatch(REGEX, regex.choices[0].text), regex.choices[0].text
    picked = c.completions.create(
        model=model,
        prompt="Sentiment:",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"choice": CHOICES}},
    )
    assert picked.choices[0].text in CHOICES and picked.choices[0].finish_reason == "stop"
    # A seeded stream's deltas add up to a valid document too.
    stream = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Another city."}],
        max_tokens=80,
        temperature=1.0,
        seed=5,
        stream=True,
        extra_body={"structured_outputs": {"json": SCHEMA}},
    )
    assert follows_schema("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
    seen = pod_stats(prefill).prefix_cache_queries - queries
    # The disaggregating router sent every prompt through the prefill pod; the colocated none.
    assert (seen > 0) == (router == "router")
    wait_idle(cluster)


@pytest.mark.parametrize("router", ROUTERS)
def test_logit_bias_of_100_makes_greedy_output_that_token(cluster, router, e2e_model):
    from tandem.tokenizer import Tokenizer

    tokenizer = Tokenizer(e2e_model)
    token = tokenizer.encode(" License", add_special_tokens=False)[0]
    c = client(cluster, router)
    out = c.completions.create(
        model=c.models.list().data[0].id,
        prompt="Once upon a time",
        max_tokens=5,
        temperature=0,
        logit_bias={str(token): 100},
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].text == tokenizer.decode([token] * 5)
    assert out.usage.completion_tokens == 5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"structured_outputs": {"json": {"type": "no-such-type"}}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
        ({"logit_bias": {"10000000": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ],
)
def test_bad_constraints_and_biases_are_400s_naming_the_field(cluster, body, param):
    for router in ROUTERS:
        c = client(cluster, router)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(
                model=c.models.list().data[0].id,
                prompt="Hello",
                max_tokens=4,
                extra_body=body,
            )
        assert e.value.status_code == 400
        assert e.value.param is not None and e.value.param.startswith(param), e.value.body


def test_the_sdk_carries_constraints_and_biases(cluster, e2e_model):
    """The same through the gRPC SDK against the disaggregating router: generate and chat
    follow a JSON schema, a regex and a choice; logit_bias forces a token; a bad regex is
    refused naming the field."""
    from tandem.api.errors import InvalidRequest
    from tandem.sdk import Client

    with Client(cluster.router_grpc, timeout=60) as sdk:
        out = sdk.generate(
            "Tell me", max_tokens=60, temperature=0, structured_outputs={"json": SCHEMA}
        )
        assert follows_schema(out.text), out.text
        out = sdk.generate(
            "Code:", max_tokens=20, temperature=1.0, seed=3, structured_outputs={"regex": REGEX}
        )
        assert re.fullmatch(REGEX, out.text), out.text
        reply = sdk.chat(
            [{"role": "user", "content": "How was it?"}],
            max_tokens=10,
            temperature=0,
            structured_outputs={"choice": CHOICES},
        )
        assert reply.text in CHOICES and reply.finish_reason == "stop", reply
        biased = sdk.generate("Hello", max_tokens=4, temperature=0, logit_bias={"77": 100})
        assert list(biased.token_ids) == [77] * 4
        with pytest.raises(InvalidRequest) as e:
            sdk.generate("Hello", max_tokens=4, structured_outputs={"regex": "[0-9"})
        assert (e.value.param or "").startswith("structured_outputs"), e.value
    wait_idle(cluster)
