"""vLLM's utility routes (/tokenize, /detokenize, /version, /v1/models/{id}), the field policy
over HTTP, and the SDK's chat call, against real router, prefill and decode processes (CPU)."""

import asyncio

import httpx
import pytest
from transformers import AutoTokenizer

import tandem
from tandem.api.errors import InvalidRequest, ModelNotFound
from tandem.sdk import AsyncClient, Client

pytestmark = pytest.mark.integration

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is a KV cache?"},
]


@pytest.fixture(scope="module")
def hf_tokenizer(e2e_model):
    """The model's own tokenizer, straight from transformers."""
    return AutoTokenizer.from_pretrained(str(e2e_model), local_files_only=True)


def post(cluster, path: str, body) -> httpx.Response:
    return httpx.post(f"{cluster.router_url}{path}", json=body, timeout=30)


def assert_envelope(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_tokenize_matches_the_models_tokenizer(cluster, hf_tokenizer):
    text = "The capital of France is Paris; 東京 is Japan's."
    r = post(cluster, "/tokenize", {"model": "llama", "prompt": text})
    assert r.status_code == 200, r.text
    want = hf_tokenizer.encode(text)  # add_special_tokens defaults to true
    assert r.json() == {
        "count": len(want),
        "max_model_len": 2048,
        "tokens": want,
        "token_strs": None,
    }

    r = post(
        cluster,
        "/tokenize",
        {"prompt": text, "add_special_tokens": False, "return_token_strs": True},
    )
    bare = hf_tokenizer.encode(text, add_special_tokens=False)
    assert r.json()["tokens"] == bare
    assert r.json()["token_strs"] == hf_tokenizer.convert_ids_to_tokens(bare)

    for add_generation_prompt in (True, False):
        r = post(
            cluster,
            "/tokenize",
            {"messages": MESSAGES, "add_generation_prompt": add_generation_prompt},
        )
        rendered = hf_tokenizer.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        want_chat = hf_tokenizer.encode(rendered, add_special_tokens=False)
        assert r.json()["tokens"] == want_chat and r.json()["count"] == len(want_chat)


def test_tokenize_counts_the_prompt_a_chat_request_is_charged_for(cluster):
    tokens = post(cluster, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    r = post(cluster, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == len(tokens)


def test_detokenize_round_trips(cluster, hf_tokenizer):
    text = "round trip: naïve café, 12345 tokens"
    tokens = post(cluster, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    r = post(cluster, "/detokenize", {"model": "llama", "tokens": tokens["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    with_bos = hf_tokenizer.encode(text)
    r = post(cluster, "/detokenize", {"tokens": with_bos})
    assert r.json()["prompt"] == hf_tokenizer.decode(with_bos)  # special tokens kept, as vLLM


def test_version_and_the_model_card(cluster):
    r = httpx.get(f"{cluster.router_url}/version", timeout=10)
    assert r.status_code == 200 and r.json() == {"version": tandem.__version__}
    listed = httpx.get(f"{cluster.router_url}/v1/models", timeout=10).json()["data"][0]
    card = httpx.get(f"{cluster.router_url}/v1/models/llama", timeout=10)
    assert card.status_code == 200 and card.json() == listed
    assert card.json()["id"] == "llama" and card.json()["object"] == "model"
    other = httpx.get(f"{cluster.router_url}/v1/models/org/other-model", timeout=10)
    assert assert_envelope(other, 404)["type"] == "NotFoundError"
    assert "org/other-model" in other.json()["error"]["message"]
    # Off unless --enable-tokenizer-info-endpoint (it publishes the chat template), as in vLLM.
    hidden = httpx.get(f"{cluster.router_url}/tokenizer_info", timeout=10)
    assert assert_envelope(hidden, 404)["type"] == "NotFoundError"


LONG = "word " * 40_000
"""More text than the context (2,048 tokens) could ever hold at the tokenizer's densest."""


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "llama"}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "gpt-17"}, 404, None),
        ("/tokenize", {"prompt": LONG}, 400, "prompt"),
        ("/tokenize", {"prompt": 12}, 400, "prompt"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        (
            "/tokenize",
            {"messages": MESSAGES, "continue_final_message": True},
            400,
            "continue_final_message",
        ),
        ("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": ["one"]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": [1] * 2049}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "gpt-17"}, 404, None),
        ("/detokenize", {}, 400, "tokens"),
        # The field policy: what cannot be honoured is refused, naming the field.
        ("/v1/chat/completions", {"messages": MESSAGES, "audio": {"voice": "x"}}, 400, "audio"),
        ("/v1/completions", {"prompt": "x", "use_beam_search": True}, 400, "use_beam_search"),
    ],
)
def test_bad_input_gets_the_openai_envelope(cluster, path, body, status, param):
    assert_envelope(post(cluster, path, body), status, param)


def test_wrong_methods_and_unknown_routes_answer_the_envelope(cluster):
    url = cluster.router_url
    r = httpx.get(f"{url}/tokenize", timeout=10)
    assert assert_envelope(r, 405)["type"] == "MethodNotAllowedError"
    assert r.headers["allow"] == "POST"
    assert_envelope(httpx.post(f"{url}/version", timeout=10), 405)
    assert_envelope(httpx.get(f"{url}/v1/tokenize", timeout=10), 404)


def test_harmless_and_unknown_fields_are_accepted(cluster):
    r = post(
        cluster,
        "/v1/chat/completions",
        {
            "messages": MESSAGES,
            "max_tokens": 2,
            "user": "alice",
            "store": False,
            "metadata": {"team": "a"},
            "modalities": ["text"],
            "some_client_extension": {"x": 1},
        },
    )
    assert r.status_code == 200, r.text
    assert "some_client_extension" in "".join(cluster.log)  # logged by name...
    assert '{"x": 1}' not in "".join(cluster.log)  # ...never by value


TOOL_HISTORY = [
    {"role": "user", "content": "weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, clear"},
]


def test_sdk_chat_renders_a_tool_call_history_as_http_does(cluster):
    """The calls and the tool's answer reach the template through both doors alike."""
    params = {"max_tokens": 6, "temperature": 0}
    without_calls = [TOOL_HISTORY[0], {"role": "assistant", "content": ""}, TOOL_HISTORY[2]]
    count = post(cluster, "/tokenize", {"messages": TOOL_HISTORY}).json()["count"]
    assert count > post(cluster, "/tokenize", {"messages": without_calls}).json()["count"]
    want = http_chat_tokens(cluster, messages=TOOL_HISTORY, **params)
    with Client(cluster.router_grpc, timeout=60) as client:
        result = client.chat(TOOL_HISTORY, **params)
    assert list(result.token_ids) == want and result.usage.prompt_tokens == count


def http_chat_tokens(cluster, **params) -> list[int]:
    body = {
        "messages": MESSAGES,
        "logprobs": True,
        "return_tokens_as_token_ids": True,
        **params,
    }
    r = post(cluster, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return [
        int(t["token"].removeprefix("token_id:"))
        for t in r.json()["choices"][0]["logprobs"]["content"]
    ]


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 12, "temperature": 0},
        {"max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 77, "ignore_eos": True},
    ],
    ids=["greedy", "seeded"],
)
def test_sdk_chat_gives_the_http_chat_tokens(cluster, params):
    want = http_chat_tokens(cluster, **params)
    with Client(cluster.router_grpc, timeout=60) as client:
        result = client.chat(MESSAGES, **params)
        chunks = list(client.chat_stream(MESSAGES, **params))
    assert list(result.token_ids) == want
    assert result.usage.prompt_tokens == len(
        post(cluster, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    )
    assert [t for c in chunks for t in c.token_ids] == want
    assert chunks[-1].finish_reason == result.finish_reason and chunks[-1].usage is not None
    assert "".join(c.text for c in chunks) == result.text


def test_async_sdk_chat_and_its_errors(cluster):
    want = http_chat_tokens(cluster, max_tokens=8, temperature=0)

    async def main():
        async with AsyncClient(cluster.router_grpc, timeout=60) as client:
            whole = await client.chat(MESSAGES, max_tokens=8, temperature=0)
            streamed = [
                t
                async for c in client.chat_stream(MESSAGES, max_tokens=8, temperature=0)
                for t in c.token_ids
            ]
            errors = []
            for kwargs in (
                {"model": "gpt-17"},
                {"messages": [{"role": "wizard", "content": "x"}]},
                {"max_tokens": 5000},
            ):
                try:
                    await client.chat(**{"messages": MESSAGES, "max_tokens": 2, **kwargs})
                except (InvalidRequest, ModelNotFound) as exc:
                    errors.append(exc)
            return whole, streamed, errors

    whole, streamed, errors = asyncio.run(main())
    assert list(whole.token_ids) == streamed == want
    assert [type(e) for e in errors[:1]] == [ModelNotFound]
    assert [getattr(e, "param", None) for e in errors[1:]] == ["messages.0.role", "max_tokens"]
