"""LLMEngine / LLM behaviour: validation, abort, stop strings, streaming, seeds, priorities."""

import pydantic
import pytest

from tandem.api.errors import InvalidRequest, RequestTooLarge
from tandem.api.ids import RequestId
from tandem.engine import (
    LLM,
    EngineConfig,
    LLMEngine,
    OutputKind,
    SamplingParams,
    register_scheduling_policy,
)
from tandem.engine.sequence import Sequence, SequenceStatus


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, num_kv_blocks=64, max_model_len=512)


def assert_clean(engine: LLMEngine):
    stats = engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not engine.has_unfinished_requests()
    assert engine._states == {}


def prompt_ids(n, start=10):
    return [start + (i * 7) % 300 for i in range(n)]


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_tokens=20, max_tokens=10), "min_tokens"),
        (dict(logprobs=50), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(max_tokens=2.5), "max_tokens"),
    ],
)
def test_invalid_sampling_values_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
    assert param in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "prompt, params, param, exc",
    [
        ("", SamplingParams(), "prompt", InvalidRequest),
        ([], SamplingParams(), "prompt", InvalidRequest),
        ([5, 10**9], SamplingParams(), "prompt", InvalidRequest),
        ([5, -1], SamplingParams(), "prompt", InvalidRequest),
        (prompt_ids(512), SamplingParams(), "prompt", RequestTooLarge),
        (prompt_ids(500), SamplingParams(max_tokens=20), "max_tokens", RequestTooLarge),
        (12, SamplingParams(), "prompt", InvalidRequest),
    ],
)
def test_bad_requests_are_refused_and_hold_nothing(llm, prompt, params, param, exc):
    with pytest.raises(exc) as e:
        llm.engine.add_request("bad", prompt, params)
    assert e.value.param == param
    assert_clean(llm.engine)


def test_the_context_is_capped_to_what_the_kv_pool_holds(llama_dir):
    engine = LLM(llama_dir, num_kv_blocks=4).engine  # 64 tokens of KV: a 65-token context
    assert engine.limits.max_model_len == 65
    with pytest.raises(RequestTooLarge, match="maximum context length is 65 tokens, but 66") as e:
        engine.add_request("big", prompt_ids(60), SamplingParams(max_tokens=6))
    assert e.value.param == "max_tokens"
    engine.add_request("fits", prompt_ids(60), SamplingParams(max_tokens=5))
    while engine.has_unfinished_requests():
        engine.step()
    assert_clean(engine)


def test_duplicate_request_id_and_bad_priority(llm):
    llm.engine.add_request("dup", [5, 6], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequest, match="already in use"):
        llm.engine.add_request("dup", [5, 6], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequest):
        llm.engine.add_request("p", [5, 6], SamplingParams(), priority="high")
    llm.engine.abort_request("dup")
    assert_clean(llm.engine)


def test_generate_with_one_bad_prompt_generates_nothing(llm):
    with pytest.raises(InvalidRequest):
        llm.generate(["fine prompt", "", "another"], SamplingParams(max_tokens=2))
    assert_clean(llm.engine)
    with pytest.raises(InvalidRequest, match="one entry per prompt"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_engine_config_validation(llama_dir):
    with pytest.raises(pydantic.ValidationError, match="block_size"):
        EngineConfig(model=str(llama_dir), block_size=0)
    with pytest.raises(pydantic.ValidationError, match="unknown scheduling policy"):
        EngineConfig(model=str(llama_dir), scheduling_policy="random")
    with pytest.raises(pydantic.ValidationError, match="step_policy"):
        EngineConfig(model=str(llama_dir), step_policy="sideways")
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        EngineConfig(model=str(llama_dir), no_such_option=1)


# ---- abort -------------------------------------------------------------------------------------


def abort_workload(llama_dir) -> LLMEngine:
    """Five requests on a small pool and budget: chunked prefill, decoding and preemption."""
    engine = LLM(llama_dir, num_kv_blocks=12, max_num_batched_tokens=24, max_num_seqs=8).engine
    for i, n in enumerate([40, 70, 9, 33, 55]):
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        engine.add_request(f"r{i}", prompt_ids(n, start=5 + i), params)
    return engine


def phase(seq: Sequence) -> str:
    """Where a request is: waiting, prefilling, decoding, preempted or recomputing."""
    if seq.status == SequenceStatus.PREEMPTED:
        return "preempted"
    if seq.status == SequenceStatus.WAITING:
        return "waiting"
    assert seq.status == SequenceStatus.RUNNING
    if seq.num_preemptions:
        return "recomputing"
    return "prefilling" if seq.num_computed_tokens < seq.num_prompt_tokens else "decoding"


def test_abort_at_any_point_frees_everything(llama_dir):
    # A fresh engine per step count: every request is aborted after 0, 1, ... 13 steps, which
    # catches requests waiting, mid-chunk, decoding and preempted (the first preemption is at
    # step 11; the phases reached are asserted below so that a scheduler change cannot quietly
    # drop one).
    seen = set()
    for steps_before_abort in range(14):
        engine = abort_workload(llama_dir)
        for _ in range(steps_before_abort):
            engine.step()
        seen |= {phase(engine._states[RequestId(f"r{i}")].seq) for i in range(5)}
        finals = [engine.abort_request(f"r{i}") for i in range(5)]
        assert all(f is not None and f.finished for f in finals), steps_before_abort
        assert {f.outputs[0].finish_reason for f in finals} == {"abort"}
        assert engine.abort_request("r0") is None  # already gone
        assert_clean(engine)
        assert engine.step() == []
    assert seen >= {"waiting", "prefilling", "decoding", "preempted"}, seen


def step_until(engine: LLMEngine, wanted: str, max_steps: int = 80) -> RequestId:
    """Step until some request is in phase ``wanted``; returns its id."""
    for _ in range(max_steps):
        found = [rid for rid, st in engine._states.items() if phase(st.seq) == wanted]
        if found:
            return found[0]
        engine.step()
    raise AssertionError(f"no request reached {wanted!r} in {max_steps} steps")


def test_aborting_preempted_and_recomputing_requests_returns_every_block(llama_dir):
    engine = abort_workload(llama_dir)
    bm = engine.block_manager
    # Preempted by recompute: it holds no block and sits in the waiting queue.
    victim = step_until(engine, "preempted")
    assert not bm.holds(victim) and victim in engine.scheduler.waiting
    free = bm.num_free_blocks
    assert engine.abort_request(victim).outputs[0].finish_reason == "abort"
    assert victim not in engine.scheduler.waiting and not bm.holds(victim)
    assert bm.num_free_blocks == free
    # Re-admitted after a preemption and holding blocks again: aborting returns all of them
    # (the prompts differ, so no block is shared with another request).
    again = step_until(engine, "recomputing")
    held = len(bm.block_ids(again))
    assert held > 0
    free = bm.num_free_blocks
    engine.abort_request(again)
    assert not bm.holds(again) and bm.num_free_blocks == free + held
    rest, outs = set(engine._states), []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert {o.request_id for o in outs} == rest  # the others still finish, in full
    assert {o.outputs[0].finish_reason for o in outs} == {"length"}
    assert_clean(engine)


# ---- text, stop strings, streaming -------------------------------------------------------------


def test_text_is_the_decoded_tokens(llm):
    out = llm.generate(
        ["The router assigns each request"], SamplingParams(temperature=0, max_tokens=30)
    )[0]
    comp = out.outputs[0]
    assert comp.text == llm.tokenizer.decode(comp.token_ids)
    assert out.prompt == "The router assigns each request"


def test_stop_string_truncates_text(llm):
    base = llm.generate(
        ["KV pages stream"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    )[0]
    text = base.outputs[0].text
    stop = text[6:9]
    assert len(stop) == 3 and stop.strip()
    first = text.find(stop)
    out = llm.generate(
        ["KV pages stream"], SamplingParams(temperature=0, max_tokens=30, stop=[stop])
    )[0]
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == text[:first]
    assert len(comp.token_ids) < 30
    incl = llm.generate(
        ["KV pages stream"],
        SamplingParams(temperature=0, max_tokens=30, stop=[stop], include_stop_str_in_output=True),
    )[0]
    assert incl.outputs[0].text == text[: first + len(stop)]


def test_delta_outputs_concatenate_to_the_final_output(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, logprobs=2)
    engine.add_request(
        "d", "Continuous batching over a paged cache", params, output_kind=OutputKind.DELTA
    )
    text, tokens, lps, n_outputs = "", [], [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            n_outputs += 1
            text += out.outputs[0].text
            tokens += out.outputs[0].token_ids
            lps += out.outputs[0].logprobs
            last = out
    assert last.finished and n_outputs == 25
    final = llm.generate(["Continuous batching over a paged cache"], params)[0].outputs[0]
    assert (text, tokens) == (final.text, final.token_ids)
    assert [lp.token_id for lp in lps] == tokens == [lp.token_id for lp in final.logprobs]
    assert_clean(engine)


def test_streaming_holds_back_a_possible_stop_string(llm):
    """Unfinished outputs never show the last len(stop)-1 characters; the final one shows all."""
    engine = llm.engine
    stop = "\x00never\x00"  # 8 characters that the model will not produce
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    engine.add_request("h", "Prefix caching", params, output_kind=OutputKind.CUMULATIVE)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(outputs) == 30
    for out in outputs:
        full = llm.tokenizer.decode(out.outputs[0].token_ids)
        text = out.outputs[0].text
        if out.finished:
            assert text == full
        else:
            # A prefix of the text, never its last len(stop)-1 characters (the streaming
            # decoder may hold back more: bytes of an incomplete UTF-8 character).
            assert full.startswith(text) and len(text) <= max(0, len(full) - (len(stop) - 1))
    assert outputs[-1].finished and len(outputs[-1].outputs[0].text) > len(stop)


# ---- sampling through the engine ---------------------------------------------------------------


def test_seeded_sampling_is_reproducible_across_batches_and_preemption(llama_dir):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    big = LLM(llama_dir, num_kv_blocks=256)
    alone = big.generate(["seeded prompt"], params)[0].outputs[0].token_ids
    batch = big.generate(["other one", "seeded prompt", "x y z"], [others, params, others])
    assert batch[1].outputs[0].token_ids == alone
    small = LLM(llama_dir, num_kv_blocks=6, max_num_seqs=4, scheduling_policy="priority")
    prompts = ["seeded prompt", "a b c d e f g h i j", "k l m n o p", "q r s t u v w x"]
    outs = small.generate(prompts, [params, others, others, others], priorities=[9, 0, 0, 0])
    assert outs[0].metrics.num_preemptions > 0  # the seeded request itself was recomputed
    assert outs[0].outputs[0].token_ids == alone
    other_seed = big.generate(
        ["seeded prompt"], SamplingParams(temperature=1.0, seed=8, max_tokens=30)
    )
    assert other_seed[0].outputs[0].token_ids != alone


def test_priorities_decide_admission_order(llama_dir):
    llm = LLM(llama_dir, num_kv_blocks=64, max_num_seqs=1, scheduling_policy="priority")
    outs = llm.generate(
        ["first", "second", "third"], SamplingParams(max_tokens=3), priorities=[2, 0, 1]
    )
    order = sorted(range(3), key=lambda i: outs[i].metrics.first_scheduled_time)
    assert order == [1, 2, 0]


def test_custom_policy_registered_by_name_orders_admission(llama_dir, clean_registry):
    class LongestPromptFirst:
        name = "test-longest-prompt-first"

        def sort_key(self, seq):
            return (-seq.num_prompt_tokens, seq.arrival_index)

    register_scheduling_policy(LongestPromptFirst())
    prompts = [prompt_ids(3), prompt_ids(12), prompt_ids(6)]
    params = SamplingParams(max_tokens=3, ignore_eos=True)

    def admission_order(policy):
        llm = LLM(llama_dir, num_kv_blocks=64, max_num_seqs=1, scheduling_policy=policy)
        outs = llm.generate(prompts, params)
        assert [o.prompt_token_ids for o in outs] == prompts  # results stay in input order
        return sorted(range(3), key=lambda i: outs[i].metrics.first_scheduled_time)

    assert admission_order("fcfs") == [0, 1, 2]
    assert admission_order("test-longest-prompt-first") == [1, 2, 0]


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=2))[0]
    rendered = llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert rendered == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_single_prompt_forms(llm):
    assert len(llm.generate("one string", SamplingParams(max_tokens=1))) == 1
    assert len(llm.generate([5, 6, 7], SamplingParams(max_tokens=1))) == 1


def test_stop_string_spanning_two_tokens(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    base = llm.generate(["stop strings across tokens"], params)[0].outputs[0]
    pieces = [llm.tokenizer.decode([t]) for t in base.token_ids]
    i = next(
        i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
    )
    stop = pieces[i][-2:] + pieces[i + 1][:2]  # straddles the boundary between tokens i and i+1
    out = llm.generate(
        ["stop strings across tokens"], SamplingParams(temperature=0, max_tokens=30, stop=[stop])
    )[0]
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == base.text[: base.text.find(stop)]
    assert comp.token_ids == base.token_ids[: len(comp.token_ids)]


def test_stop_strings_wait_for_min_tokens(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    base = llm.generate(["min tokens and stops"], params)[0].outputs[0]
    stop = llm.tokenizer.decode(base.token_ids[:1])[:2]
    early = llm.generate(
        ["min tokens and stops"], SamplingParams(temperature=0, max_tokens=30, stop=[stop])
    )[0]
    assert early.outputs[0].token_ids == base.token_ids[:1] and early.outputs[0].text == ""
    late = llm.generate(
        ["min tokens and stops"],
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop], min_tokens=6),
    )[0].outputs[0]
    # Only text after the first 6 tokens is searched.
    idx = base.text.find(stop, len(llm.tokenizer.decode(base.token_ids[:6])))
    if idx == -1:
        assert (late.text, late.finish_reason) == (base.text, "length")
    else:
        assert (late.text, late.finish_reason, late.stop_reason) == (base.text[:idx], "stop", stop)
    assert len(late.token_ids) > 6


def test_stop_token_stays_in_tokens_but_not_in_text(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    base = llm.generate(["stop token text"], params)[0].outputs[0]

    def clean(t):  # a whole ASCII token: no half of a UTF-8 character around the stop
        text = llm.tokenizer.decode([t])
        return text.isascii() and text.strip().isalnum()

    stop_id = next(
        t
        for i, t in enumerate(base.token_ids)
        if i >= 3 and clean(t) and clean(base.token_ids[i - 1])
    )
    first = base.token_ids.index(stop_id)
    out = llm.generate(
        ["stop token text"], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id])
    )[0]
    comp = out.outputs[0]
    assert comp.token_ids == base.token_ids[: first + 1] and comp.stop_reason == stop_id
    assert comp.text == llm.tokenizer.decode(base.token_ids[:first])
    incl = llm.generate(
        ["stop token text"],
        SamplingParams(
            temperature=0, max_tokens=30, stop_token_ids=[stop_id], include_stop_str_in_output=True
        ),
    )[0].outputs[0]
    assert incl.text == llm.tokenizer.decode(base.token_ids[: first + 1])


def test_interrupted_generate_leaves_nothing_behind(llama_dir, monkeypatch):
    llm = LLM(llama_dir, num_kv_blocks=64)
    real_step, calls = llm.engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm.engine, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["one", "two", "three"], SamplingParams(max_tokens=20, ignore_eos=True))
    assert_clean(llm.engine)


@pytest.mark.parametrize("async_outputs", ["off", "on"])
def test_failed_forward_aborts_its_requests_and_engine_recovers(
    llama_dir, monkeypatch, async_outputs
):
    from tandem.engine.llm_engine import EngineStepError

    engine = LLM(llama_dir, num_kv_blocks=64, async_output_processing=async_outputs).engine
    engine.add_request("victim", "a prompt", SamplingParams(max_tokens=5))
    real = engine.runner.launch
    monkeypatch.setattr(engine.runner, "launch", lambda scheduled: 1 / 0)
    with pytest.raises(EngineStepError) as e:
        engine.step()
    assert e.value.request_ids == ["victim"]
    assert_clean(engine)
    monkeypatch.setattr(engine.runner, "launch", real)
    engine.add_request("next", "a prompt", SamplingParams(max_tokens=5, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and len(outs) == 5


def test_budget_must_cover_the_batch(llama_dir):
    with pytest.raises(pydantic.ValidationError, match="max_num_batched_tokens"):
        EngineConfig(model=str(llama_dir), max_num_seqs=64, max_num_batched_tokens=32)
