"""Prompt scoring's JSON without pods: echo (+ logprobs, max_tokens 0 or 1) and vLLM's
``prompt_logprobs`` as vLLM writes them, and the request fields' rules."""

import asyncio
import json

import pytest

from services.router.flow import Route
from services.router.jobs import JobBuilder
from services.router.openai_api import OpenAIServing
from services.router.openai_protocol import ChatCompletionRequest, CompletionRequest
from tandem.api.errors import InvalidRequest
from tandem.api.outputs import TokenLogprob
from tandem.api.requests import TokenEvent, Usage
from tandem.api.sampling_params import SamplingParams

PROMPT = [5, 6, 7]
# Token 6 after 5 (rank 2; top-2: 9, 6), token 7 after 5 6 (rank 1; -inf alternative).
PROMPT_LPS = [
    TokenLogprob(6, -1.5, 2, ((9, -0.5), (6, -1.5))),
    TokenLogprob(7, -0.25, 1, ((7, -0.25), (8, float("-inf")))),
]
GENERATED = TokenLogprob(8, -0.75, 1, ((8, -0.75), (9, -2.0)))


class FakeTokenizer:
    """Token t is the text "<t>"."""

    def token_text(self, t: int) -> str:
        return f"<{t}>"

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        assert not skip_special_tokens  # echo keeps special tokens, as vLLM
        return "".join(map(self.token_text, ids))


class OneEvent:
    def __init__(self):
        self.jobs = []

    async def generate(self, job, route):
        self.jobs.append(job)
        yield TokenEvent(
            [8], "<8>", [GENERATED], "length", None, Usage(3, 1, 0), prompt_logprobs=PROMPT_LPS
        )


def serving() -> tuple[OpenAIServing, OneEvent, JobBuilder]:
    dispatcher = OneEvent()
    jobs = JobBuilder(None, model_name="m", vocab_size=100, max_model_len=lambda: 100)
    s = OpenAIServing(jobs, dispatcher)
    s.tokenizer = FakeTokenizer()
    return s, dispatcher, jobs


def run(req: CompletionRequest, prompt=PROMPT) -> dict:
    s, _, jobs = serving()
    job = jobs.job("r-0", prompt, req.sampling_fields())
    return asyncio.run(s.completion(req, [job], "r", [Route()]))


PROMPT_PART = {
    "tokens": ["<5>", "<6>", "<7>"],
    "token_logprobs": [None, -1.5, -0.25],
    # The prompt's token first, then the top alternatives: at most logprobs + 1 entries.
    "top_logprobs": [None, {"<6>": -1.5, "<9>": -0.5}, {"<7>": -0.25, "<8>": -9999.0}],
    "text_offset": [0, 3, 6],
}


def test_echo_only_returns_the_prompt_and_its_logprobs():
    req = CompletionRequest(prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    fields = req.sampling_fields()
    assert fields["max_tokens"] == 1 and fields["prompt_logprobs"] == 1  # run as vLLM runs it
    (choice,) = run(req)["choices"]
    assert choice["text"] == "<5><6><7>"  # the generated token is dropped
    assert choice["logprobs"] == PROMPT_PART
    assert list(choice["logprobs"]["top_logprobs"][1]) == ["<6>", "<9>"]
    assert choice["finish_reason"] == "length"
    assert choice["prompt_logprobs"] == [
        None,
        {
            "6": {"logprob": -1.5, "rank": 2, "decoded_token": "<6>"},
            "9": {"logprob": -0.5, "rank": 1, "decoded_token": "<9>"},
        },
        {
            "7": {"logprob": -0.25, "rank": 1, "decoded_token": "<7>"},
            "8": {"logprob": -9999.0, "rank": 2, "decoded_token": "<8>"},
        },
    ]
    json.dumps(choice, allow_nan=False)  # no -inf left


def test_echo_with_a_generated_token_counts_text_offsets_on():
    req = CompletionRequest(prompt="a text prompt", echo=True, logprobs=1, max_tokens=1)
    (choice,) = run(req)["choices"]
    assert choice["text"] == "a text prompt<8>"  # a text prompt is echoed as sent
    lp = choice["logprobs"]
    assert lp["tokens"] == [*PROMPT_PART["tokens"], "<8>"]
    assert lp["token_logprobs"] == [*PROMPT_PART["token_logprobs"], -0.75]
    assert lp["text_offset"] == [0, 3, 6, 9]
    assert lp["top_logprobs"][-1] == {"<8>": -0.75, "<9>": -2.0}


def test_echo_without_logprobs_and_prompt_logprobs_without_echo():
    (choice,) = run(CompletionRequest(prompt=PROMPT, echo=True, max_tokens=1))["choices"]
    assert choice["text"] == "<5><6><7><8>" and choice["logprobs"] is None
    assert "prompt_logprobs" not in choice  # not asked for
    (choice,) = run(CompletionRequest(prompt=PROMPT, max_tokens=1, prompt_logprobs=0))["choices"]
    assert choice["text"] == "<8>" and len(choice["prompt_logprobs"]) == 3


def test_echo_stream_sends_the_prompt_first():
    s, dispatcher, jobs = serving()
    req = CompletionRequest(prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, stream=True)
    job = jobs.job("r-0", PROMPT, req.sampling_fields())

    async def main():
        events = [(0, e) async for e in dispatcher.generate(job, Route())]

        async def replay():
            for item in events:
                yield item

        return [chunk async for chunk in s.completion_sse(req, "r", replay(), [job])]

    chunks = [json.loads(c[len(b"data: ") :]) for c in asyncio.run(main())[:-1]]
    first, finish = (c["choices"][0] for c in chunks)
    assert first["text"] == "<5><6><7>" and first["logprobs"] == PROMPT_PART
    assert "prompt_logprobs" not in first
    assert finish["finish_reason"] == "length" and finish["text"] == ""


def test_scoring_fields_rules():
    _, _, jobs = serving()
    # max_tokens=0 only with echo: else SamplingParams refuses it, naming the field.
    with pytest.raises(InvalidRequest) as e:
        jobs.job("r", PROMPT, CompletionRequest(prompt="x", max_tokens=0).sampling_fields())
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequest) as e:
        jobs.job("r", PROMPT, CompletionRequest(prompt="x", prompt_logprobs=21).sampling_fields())
    assert e.value.param == "prompt_logprobs"
    # An explicit prompt_logprobs wins over echo's logprobs.
    req = CompletionRequest(prompt="x", echo=True, logprobs=2, prompt_logprobs=5)
    assert req.sampling_fields()["prompt_logprobs"] == 5
    # A stream has no place for prompt_logprobs (vLLM); 0 asks for nothing and passes.
    chat = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    with pytest.raises(InvalidRequest) as e:
        ChatCompletionRequest(**chat, prompt_logprobs=1).sampling_fields()
    assert e.value.param == "prompt_logprobs"
    assert ChatCompletionRequest(**chat, prompt_logprobs=0).sampling_fields()
    assert SamplingParams(prompt_logprobs=20).prompt_logprobs == 20
