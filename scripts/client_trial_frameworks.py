"""The client trial's scenarios for an agent framework (LangGraph, LangChain), an evaluation
harness (lm-eval) and a gateway library (LiteLLM), run in the clients' venv by
``client_trial_scenarios.py``."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

from client_trial_checks import (
    GET_WEATHER,
    PERSON_SCHEMA,
    USER,
    Ctx,
    check_calls,
    need,
    scenario,
    validate,
)

# ---- an agent framework: LangGraph's ReAct agent over LangChain's ChatOpenAI ------------------


def _chat_openai(ctx: Ctx):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=ctx.model, base_url=ctx.v1, api_key="unused", max_tokens=128, max_retries=0
    )


@scenario("langgraph.react_agent", "langgraph", "ReAct agent, one tool, 3 model turns")
def langgraph_react(ctx: Ctx) -> str:
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool
    from langgraph.prebuilt import create_react_agent

    calls: list[dict] = []

    @tool
    def get_weather(city: Literal["Paris", "Lima", "Tokyo"]) -> str:
        """The current weather in a city."""
        calls.append({"city": city})
        return f"21 C and sunny in {city}"

    llm = _chat_openai(ctx)

    def pick_model(state, runtime):
        # Random weights never choose a tool on their own: the first two turns name the tool
        # (the model must return a parseable call), the third lets the model answer.
        done = sum(isinstance(m, ToolMessage) for m in state["messages"])
        choice = "get_weather" if done < 2 else "none"
        # strict: the arguments' schema closes the object (additionalProperties false), so
        # the grammar ends the call after "city" instead of letting random weights add keys.
        return llm.bind_tools([get_weather], tool_choice=choice, strict=True)

    agent = create_react_agent(pick_model, [get_weather])
    out = agent.invoke({"messages": [("user", "Weather in Paris?")]}, {"recursion_limit": 10})
    msgs = out["messages"]
    tool_msgs = [m for m in msgs if isinstance(m, ToolMessage)]
    bad = [c.get("error", "")[:300] for m in msgs for c in getattr(m, "invalid_tool_calls", [])]
    need(not bad, f"invalid tool calls: {bad}")
    need(len(calls) == 2 and len(tool_msgs) == 2, f"{len(calls)} tool runs in {len(msgs)} messages")
    need(isinstance(msgs[-1].content, str) and not msgs[-1].tool_calls, f"last {msgs[-1]!r}")
    return f"{len(msgs)} messages, tool ran with {calls}"


@scenario("langchain.structured_output", "langchain", "with_structured_output json_schema + tools")
def langchain_structured(ctx: Ctx) -> str:
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """A weather report."""

        city: str = Field(max_length=20)
        celsius: int = Field(ge=-50, le=50)

    llm = _chat_openai(ctx)
    a = llm.with_structured_output(Weather, method="json_schema").invoke("Weather in Paris?")
    b = llm.with_structured_output(Weather, method="function_calling").invoke("Weather in Lima?")
    need(isinstance(a, Weather) and isinstance(b, Weather), f"{a!r}, {b!r}")
    return f"json_schema {a!r}; function_calling {b!r}"


# ---- an evaluation harness: lm-eval over the OpenAI API ---------------------------------------

MC_DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two is", "choices": [" five", " four"], "answer": 1},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin"], "answer": 0},
]
QA_DOCS = [{"question": "Say yes.", "answer": "yes"}, {"question": "Say no.", "answer": "no"}]
TEXT_DOCS = [{"text": "The prefill pod computes the prompt's KV cache. " * 4}]


def _write_task(ctx: Ctx, name: str, docs: list[dict], body: str) -> Path:
    tasks = ctx.work_dir / "lm_eval_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = tasks / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}"
    )
    return tasks


def _lm_eval(ctx: Ctx, task: str, tasks_dir: Path, model: str, model_args: str, *extra) -> dict:
    out = ctx.work_dir / f"lm_eval_{task}_{model}"
    cmd = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model", model,
        "--model_args", model_args,
        "--tasks", task,
        "--include_path", str(tasks_dir),
        "--output_path", str(out),
        "--log_samples",
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln] or lines
        raise RuntimeError(f"lm_eval exited {proc.returncode}: " + " | ".join(errors[-3:]))
    results = sorted(out.rglob("results_*.json"))
    need(results, f"lm_eval wrote no results under {out}")
    return json.loads(results[-1].read_text())["results"][task]


def _sample_loglikelihoods(ctx: Ctx, task: str, model: str) -> list[float]:
    """Every loglikelihood lm-eval computed for ``task`` (its --log_samples file)."""
    samples = sorted((ctx.work_dir / f"lm_eval_{task}_{model}").rglob(f"samples_{task}_*.jsonl"))
    need(samples, f"lm_eval wrote no samples for {task}")
    values: list[float] = []

    def walk(x) -> None:
        if isinstance(x, list | tuple):
            for item in x:
                walk(item)
        elif isinstance(x, int | float) and not isinstance(x, bool):
            values.append(float(x))
        elif isinstance(x, str) and x not in ("True", "False"):
            values.append(float(x))

    for line in samples[-1].read_text().splitlines():
        walk(json.loads(line)["filtered_resps"])
    return values


def _need_scored(ctx: Ctx, task: str, model: str) -> list[float]:
    """Fail unless every loglikelihood is a real score: a server that ignores ``echo`` answers
    one generated token, lm-eval then sums an empty slice, and every choice scores exactly 0."""
    lls = _sample_loglikelihoods(ctx, task, model)
    need(lls and all(x < 0 for x in lls), f"loglikelihoods {lls}: the prompt was not scored")
    return lls


MC_BODY = """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""


def _completions_args(ctx: Ctx, tokenizer: str) -> str:
    return (
        f"model={ctx.model},base_url={ctx.v1}/completions,{tokenizer},"
        "num_concurrent=1,max_retries=1,tokenized_requests=True,max_length=2048"
    )


@scenario("lm_eval.loglikelihood", "lm-eval", "multiple_choice, local-completions, HF tokenizer")
def lm_eval_loglikelihood(ctx: Ctx) -> str:
    tasks = _write_task(ctx, "trial_mc", MC_DOCS, MC_BODY)
    tokenizer = f"tokenizer_backend=huggingface,tokenizer={ctx.model_dir}"
    res = _lm_eval(ctx, "trial_mc", tasks, "local-completions", _completions_args(ctx, tokenizer))
    lls = _need_scored(ctx, "trial_mc", "local-completions")
    return f"acc={res.get('acc,none')} over {len(MC_DOCS)} questions, {len(lls)} choices scored"


@scenario("lm_eval.loglikelihood.remote_tok", "lm-eval", "multiple_choice, server's /tokenize")
def lm_eval_remote_tokenizer(ctx: Ctx) -> str:
    tasks = _write_task(ctx, "trial_mc_remote", MC_DOCS, MC_BODY)
    args = _completions_args(ctx, "tokenizer_backend=remote")
    res = _lm_eval(ctx, "trial_mc_remote", tasks, "local-completions", args)
    lls = _need_scored(ctx, "trial_mc_remote", "local-completions")
    return f"acc={res.get('acc,none')} over {len(MC_DOCS)} questions, {len(lls)} choices scored"


@scenario("lm_eval.perplexity", "lm-eval", "loglikelihood_rolling (word perplexity)")
def lm_eval_perplexity(ctx: Ctx) -> str:
    body = "output_type: loglikelihood_rolling\ndoc_to_text: '{{text}}'\n"
    body += 'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
    tasks = _write_task(ctx, "trial_ppl", TEXT_DOCS, body)
    tokenizer = f"tokenizer_backend=huggingface,tokenizer={ctx.model_dir}"
    res = _lm_eval(ctx, "trial_ppl", tasks, "local-completions", _completions_args(ctx, tokenizer))
    _need_scored(ctx, "trial_ppl", "local-completions")
    return f"word_perplexity={res.get('word_perplexity,none')}"


@scenario("lm_eval.generate_until", "lm-eval", "generate_until, local-chat-completions")
def lm_eval_generate(ctx: Ctx) -> str:
    body = (
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    tasks = _write_task(ctx, "trial_gen", QA_DOCS, body)
    args = f"model={ctx.model},base_url={ctx.v1}/chat/completions,num_concurrent=1,max_retries=1"
    res = _lm_eval(ctx, "trial_gen", tasks, "local-chat-completions", args, "--apply_chat_template")
    return f"exact_match={res.get('exact_match,none')} over {len(QA_DOCS)} prompts"


# ---- a gateway library: LiteLLM's SDK with the openai/ provider -------------------------------


def _litellm(ctx: Ctx, **kwargs):
    import litellm

    return litellm.completion(
        model=f"openai/{ctx.model}", api_base=ctx.v1, api_key="unused", **kwargs
    )


@scenario("litellm.completion", "litellm", "completion, not streamed")
def litellm_completion(ctx: Ctx) -> str:
    r = _litellm(ctx, messages=USER, max_tokens=16)
    need(isinstance(r.choices[0].message.content, str), f"reply {r}")
    return f"finish_reason={r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens"


@scenario("litellm.stream", "litellm", "completion, streamed")
def litellm_stream(ctx: Ctx) -> str:
    chunks = list(_litellm(ctx, messages=USER, max_tokens=16, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    need(chunks, "no chunks")
    return f"{len(chunks)} chunks, {len(text)} chars"


@scenario("litellm.tools", "litellm", "tool call with a named tool_choice")
def litellm_tools(ctx: Ctx) -> str:
    r = _litellm(
        ctx,
        messages=USER,
        tools=[GET_WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=256,
    )
    return check_calls(r.choices[0].message.tool_calls, {"get_weather"})


@scenario("litellm.json_schema", "litellm", "response_format json_schema")
def litellm_json_schema(ctx: Ctx) -> str:
    r = _litellm(
        ctx,
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
