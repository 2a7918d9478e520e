"""The client trial's scenarios for the official ``openai`` client (and vLLM's utility routes
over plain HTTP), run in the clients' venv by ``client_trial_scenarios.py``."""

import json

from client_trial_checks import (
    GET_WEATHER,
    PERSON_SCHEMA,
    TOOLS,
    USER,
    Ctx,
    check_calls,
    collect_stream_text,
    collect_stream_tool_calls,
    need,
    scenario,
    validate,
)


@scenario("openai.chat", "openai", "chat.completions, not streamed")
def openai_chat(ctx: Ctx) -> str:
    r = ctx.openai().chat.completions.create(model=ctx.model, messages=USER, max_tokens=16)
    c = r.choices[0]
    need(isinstance(c.message.content, str), f"content {c.message.content!r}")
    need(r.usage.completion_tokens > 0, f"usage {r.usage}")
    return f"finish_reason={c.finish_reason}, {r.usage.completion_tokens} tokens"


@scenario("openai.chat.stream", "openai", "chat.completions, streamed with include_usage")
def openai_chat_stream(ctx: Ctx) -> str:
    stream = ctx.openai().chat.completions.create(
        model=ctx.model,
        messages=USER,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = collect_stream_text(stream, chat=True)
    need(usage is not None and usage.completion_tokens > 0, f"usage chunk {usage}")
    return f"{len(text)} chars, finish_reason={finish}"


@scenario("openai.completions", "openai", "completions, not streamed")
def openai_completions(ctx: Ctx) -> str:
    r = ctx.openai().completions.create(model=ctx.model, prompt="Once upon a time", max_tokens=16)
    need(isinstance(r.choices[0].text, str), "no text")
    return f"finish_reason={r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens"


@scenario("openai.completions.stream", "openai", "completions, streamed with include_usage")
def openai_completions_stream(ctx: Ctx) -> str:
    stream = ctx.openai().completions.create(
        model=ctx.model,
        prompt="Once upon a time",
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = collect_stream_text(stream, chat=False)
    need(usage is not None and usage.completion_tokens > 0, f"usage chunk {usage}")
    return f"{len(text)} chars, finish_reason={finish}"


@scenario("openai.tools.named", "openai", "tools + tool_choice naming a function")
def openai_tools_named(ctx: Ctx) -> str:
    r = ctx.openai().chat.completions.create(
        model=ctx.model,
        messages=USER,
        tools=list(TOOLS.values()),
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=256,
    )
    calls = r.choices[0].message.tool_calls
    need(calls and calls[0].function.name == "get_weather", f"tool_calls {calls}")
    return f"finish_reason={r.choices[0].finish_reason}: " + check_calls(calls, {"get_weather"})


@scenario("openai.tools.required", "openai", 'tools + tool_choice="required"')
def openai_tools_required(ctx: Ctx) -> str:
    r = ctx.openai().chat.completions.create(
        model=ctx.model,
        messages=USER,
        tools=list(TOOLS.values()),
        tool_choice="required",
        max_tokens=256,
    )
    calls = r.choices[0].message.tool_calls
    return f"finish_reason={r.choices[0].finish_reason}: " + check_calls(calls, set(TOOLS))


@scenario("openai.tools.stream", "openai", "named tool_choice, streamed (tool_call deltas)")
def openai_tools_stream(ctx: Ctx) -> str:
    stream = ctx.openai().chat.completions.create(
        model=ctx.model,
        messages=USER,
        tools=list(TOOLS.values()),
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=256,
        stream=True,
    )
    calls, finish = collect_stream_tool_calls(stream)
    return f"finish_reason={finish}: " + check_calls(calls, {"get_weather"})


@scenario("openai.tools.history", "openai", "assistant tool_calls + tool message in history")
def openai_tools_history(ctx: Ctx) -> str:
    history = [
        *USER,
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
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21}'},
    ]
    client = ctx.openai()
    with_history = client.chat.completions.create(
        model=ctx.model, messages=history, tools=[GET_WEATHER], max_tokens=8
    )
    without = client.chat.completions.create(
        model=ctx.model, messages=USER, tools=[GET_WEATHER], max_tokens=8
    )
    grew = with_history.usage.prompt_tokens - without.usage.prompt_tokens
    # The tool call and its result must reach the prompt, not be dropped.
    need(grew > 10, f"history added only {grew} prompt tokens: tool_calls/tool messages dropped?")
    return f"the tool call and result added {grew} prompt tokens"


@scenario("openai.tools.unknown", "openai", "tool_choice naming an unknown tool -> 400")
def openai_tools_unknown(ctx: Ctx) -> str:
    import openai

    try:
        ctx.openai().chat.completions.create(
            model=ctx.model,
            messages=USER,
            tools=[GET_WEATHER],
            tool_choice={"type": "function", "function": {"name": "no_such_tool"}},
            max_tokens=8,
        )
    except openai.BadRequestError as e:
        named = e.param == "tool_choice" or "no_such_tool" in str(e.message)
        need(named, f"a 400 that does not name tool_choice: param={e.param!r}: {e.message}")
        return f"400 param={e.param!r}: {e.message[:80]}"
    raise AssertionError("accepted a tool_choice naming an undeclared tool")


@scenario("openai.response_format.json_schema", "openai", "response_format json_schema, strict")
def openai_json_schema(ctx: Ctx) -> str:
    r = ctx.openai().chat.completions.create(
        model=ctx.model,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        },
        max_tokens=256,
    )
    content = r.choices[0].message.content
    validate(json.loads(content), PERSON_SCHEMA)
    return f"valid: {content[:60]}"


@scenario("openai.response_format.json_schema.parse", "openai", "beta parse() with pydantic")
def openai_json_schema_parse(ctx: Ctx) -> str:
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=20)
        unit: str = Field(pattern="^(celsius|fahrenheit)$")

    r = ctx.openai().chat.completions.parse(
        model=ctx.model, messages=USER, response_format=Weather, max_tokens=128
    )
    parsed = r.choices[0].message.parsed
    need(isinstance(parsed, Weather), f"parsed {parsed!r}")
    return f"parsed {parsed!r}"


@scenario("openai.response_format.json_object", "openai", "response_format json_object")
def openai_json_object(ctx: Ctx) -> str:
    r = ctx.openai().chat.completions.create(
        model=ctx.model,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_object"},
        max_tokens=256,
    )
    content, finish = r.choices[0].message.content, r.choices[0].finish_reason
    if finish == "length":  # random weights may nest or ramble past any budget
        return f"truncated at max_tokens (valid JSON prefix not checked): {content[:40]!r}"
    need(isinstance(json.loads(content), dict), f"not a JSON object: {content[:80]!r}")
    return f"valid: {content[:60]}"


@scenario("openai.structured_outputs", "openai", "vLLM extra_body structured_outputs choice/regex")
def openai_structured_outputs(ctx: Ctx) -> str:
    import re

    client = ctx.openai()
    r = client.chat.completions.create(
        model=ctx.model,
        messages=USER,
        max_tokens=16,
        extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}},
    )
    choice = r.choices[0].message.content
    need(choice in ("sunny", "rainy"), f"choice gave {choice!r}")
    r = client.completions.create(
        model=ctx.model,
        prompt="Code:",
        max_tokens=16,
        extra_body={"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}},
    )
    text = r.choices[0].text
    need(re.fullmatch("[a-z]{3}-[0-9]{2}", text), f"regex gave {text!r}")
    return f"choice {choice!r}, regex {text!r}"


@scenario("openai.n2", "openai", "n=2 on chat and on streamed completions")
def openai_n2(ctx: Ctx) -> str:
    client = ctx.openai()
    r = client.chat.completions.create(
        model=ctx.model, messages=USER, max_tokens=8, n=2, temperature=1.0, seed=7
    )
    need(sorted(c.index for c in r.choices) == [0, 1], f"chat choices {r.choices}")
    stream = client.completions.create(
        model=ctx.model, prompt="Once", max_tokens=8, n=2, temperature=1.0, stream=True
    )
    seen = {c.index for chunk in stream for c in chunk.choices}
    need(seen == {0, 1}, f"streamed choice indexes {seen}")
    return f"2 chat choices, streamed indexes {sorted(seen)}"


@scenario("openai.echo_logprobs", "openai", "completions echo + logprobs, max_tokens=0")
def openai_echo_logprobs(ctx: Ctx) -> str:
    prompt = "The quick brown fox jumps"
    n_prompt = len(ctx.tokenizer().encode(prompt).ids)
    r = ctx.openai().completions.create(
        model=ctx.model, prompt=prompt, echo=True, logprobs=1, max_tokens=0
    )
    lp = r.choices[0].logprobs
    need(r.choices[0].text.startswith(prompt), f"echoed text {r.choices[0].text!r}")
    need(lp is not None and len(lp.token_logprobs) == n_prompt, f"{n_prompt} tokens, got {lp}")
    need(lp.token_logprobs[0] is None, "the first prompt token has no logprob (None)")
    need(all(x <= 0 for x in lp.token_logprobs[1:]), f"logprobs {lp.token_logprobs}")
    return f"{n_prompt} prompt tokens scored, sum {sum(lp.token_logprobs[1:]):.2f}"


@scenario("openai.prompt_logprobs", "openai", "vLLM extra_body prompt_logprobs")
def openai_prompt_logprobs(ctx: Ctx) -> str:
    r = ctx.openai().completions.create(
        model=ctx.model,
        prompt="The quick brown fox",
        max_tokens=1,
        extra_body={"prompt_logprobs": 1},
    )
    extra = r.choices[0].model_extra or {}
    plp = extra.get("prompt_logprobs") or (r.model_extra or {}).get("prompt_logprobs")
    need(isinstance(plp, list) and plp and plp[0] is None, f"prompt_logprobs {plp!r}")
    return f"{len(plp)} positions"


@scenario("openai.logit_bias", "openai", "logit_bias +100 makes greedy output that token")
def openai_logit_bias(ctx: Ctx) -> str:
    token = ctx.tokenizer().encode(" hello").ids[-1]
    r = ctx.openai().completions.create(
        model=ctx.model,
        prompt="Once upon a time",
        max_tokens=4,
        temperature=0,
        logit_bias={str(token): 100},
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    tokens = r.choices[0].logprobs.tokens
    need(tokens == [f"token_id:{token}"] * 4, f"tokens {tokens}, wanted token_id:{token}")
    return f"4 x token {token}"


@scenario("openai.models.retrieve", "openai", "GET /v1/models/{id}")
def openai_models_retrieve(ctx: Ctx) -> str:
    m = ctx.openai().models.retrieve(ctx.model)
    need(m.id == ctx.model, f"model {m}")
    return f"id={m.id}"


@scenario("http.tokenize", "httpx", "vLLM /tokenize, /detokenize, /version")
def http_tokenize(ctx: Ctx) -> str:
    import httpx

    text = "Hello tokenizer"
    with httpx.Client(base_url=ctx.base_url, timeout=30) as http:
        r = http.post("/tokenize", json={"model": ctx.model, "prompt": text})
        need(r.status_code == 200, f"/tokenize {r.status_code}: {r.text[:200]}")
        tokens = r.json()["tokens"]
        want = ctx.tokenizer().encode(text).ids
        need(tokens == want, f"/tokenize {tokens} != tokenizer {want}")
        r = http.post("/detokenize", json={"model": ctx.model, "tokens": tokens})
        need(r.status_code == 200, f"/detokenize {r.status_code}: {r.text[:200]}")
        need(text in r.json()["prompt"], f"/detokenize gave {r.json()}")
        r = http.get("/version")
        need(r.status_code == 200, f"/version {r.status_code}: {r.text[:200]}")
    return f"{len(tokens)} tokens round-trip; version {r.json().get('version')}"
