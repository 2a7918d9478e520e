"""Structured outputs in the engine (tiny random model, CPU): outputs follow the grammar, greedy
and seeded, under preemption and async scheduling, across a remote prefill and a migration; a
bad constraint or a rejected token fails one request and the engine goes on."""

import json
import re

import pytest

from tandem.api.errors import InvalidRequest
from tandem.api.ids import RequestId
from tandem.api.sampling_params import SamplingParams, StructuredOutputs
from tandem.engine import LLM
from tandem.engine.llm_engine import EngineStepError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{3}-[0-9]{2}"
CHOICES = ("red", "green", "dark blue")
MODES = [
    dict(temperature=0),
    dict(temperature=1.0, seed=7),
    dict(temperature=0.8, top_p=0.9, seed=3),
]


def follows_schema(text: str) -> bool:
    """Validated by hand (jsonschema is not a dependency)."""
    value = json.loads(text)
    props = SCHEMA["properties"]
    return (
        set(value) == set(props)
        and isinstance(value["name"], str)
        and len(value["name"]) <= 6
        and type(value["age"]) is int
        and 0 <= value["age"] <= 150
        and all(t in ("a", "b") for t in value["tags"])
        and len(value["tags"]) <= 2
        and isinstance(value["ok"], bool)
    )


CASES = [
    (StructuredOutputs(regex=REGEX), lambda t: re.fullmatch(REGEX, t) is not None),
    (StructuredOutputs(choice=CHOICES), lambda t: t in CHOICES),
    (StructuredOutputs(json=SCHEMA), follows_schema),
]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, num_kv_blocks=64, max_model_len=512)


def params(so: StructuredOutputs, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 80, **kw}, structured_outputs=so)


def assert_clean(engine) -> None:
    bm = engine.block_manager
    assert not engine.request_ids() and bm.num_free_blocks == bm.num_total_blocks
    assert engine.structured_output.num_matchers == 0


@pytest.mark.parametrize("mode", MODES, ids=["greedy", "seeded", "seeded-top-p"])
def test_outputs_follow_regex_choice_and_json_schema(llm, mode):
    prompts = ["Hello there", "Q:"]
    for so, check in CASES:
        outs = llm.generate(prompts, params(so, **mode))
        for out in outs:
            o = out.outputs[0]
            assert check(o.text), (so.kind, o.text)
            # The grammar completes, then only EOS may follow: it ends the sequence.
            assert o.finish_reason == "stop" and o.token_ids[-1] in llm.engine.eos_token_ids
        if "seed" in mode:  # a seed reproduces a constrained sample too
            again = llm.generate(prompts, params(so, **mode))
            assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    assert_clean(llm.engine)


def test_json_object_is_an_object(llm):
    out = llm.generate("Hello there", params(StructuredOutputs(json_object=True), temperature=0))
    assert isinstance(json.loads(out[0].outputs[0].text), dict)


def test_a_constrained_request_mixed_with_free_ones_is_unaffected_by_them(llm):
    so = StructuredOutputs(choice=CHOICES)
    alone = llm.generate("Hello there", params(so, temperature=0))[0].outputs[0].token_ids
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain_alone = llm.generate("Q:", free)[0].outputs[0].token_ids
    outs = llm.generate(["Q:", "Hello there", "Q:"], [free, params(so, temperature=0), free])
    assert outs[1].outputs[0].token_ids == alone
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids == plain_alone


def test_preemption_keeps_the_matcher_state(llama_dir, llm):
    """A small pool preempts constrained sequences mid-output; their recompute consumes nothing
    again, and the tokens equal an unpreempted run's."""
    long_regex = StructuredOutputs(regex="[a-z ]{50}")
    batch = [f"prompt number {i} " * (3 + i) for i in range(4)]
    ps = [
        params(long_regex, temperature=0)
        if i % 2
        else params(StructuredOutputs(json=SCHEMA), temperature=1.0, seed=i)
        for i in range(4)
    ]
    want = [o.outputs[0].token_ids for o in llm.generate(batch, ps)]
    small = LLM(llama_dir, num_kv_blocks=10, max_num_batched_tokens=32, max_num_seqs=4)
    got = small.generate(batch, ps)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == want
    assert_clean(small.engine)


def test_async_scheduling_waits_for_constrained_rows(llama_dir, llm):
    """Steps launched ahead never hold a constrained row (its next mask needs its pending token
    consumed): the tokens equal synchronous steps', free rows alongside included."""
    engine = LLM(llama_dir, num_kv_blocks=64, max_model_len=512, async_scheduling="on").engine
    assert engine.async_scheduling
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    so = params(StructuredOutputs(regex=REGEX), temperature=0)
    want = [o.outputs[0].token_ids for o in llm.generate(["a b c", "x y"], [free, so])]
    engine.add_request("free", "a b c", free)
    engine.add_request("so", "x y", so)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    assert [got["free"], got["so"]] == want
    assert_clean(engine)


def test_ignore_eos_still_ends_a_complete_grammar(llm):
    out = llm.generate("Q:", params(StructuredOutputs(choice=("yes", "no")), ignore_eos=True))[0]
    o = out.outputs[0]
    assert o.text in ("yes", "no") and o.finish_reason == "stop"


def test_logit_bias_forces_a_token_and_ids_outside_the_vocabulary_are_refused(llm):
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6, logit_bias={"77": 100}))
    assert out[0].outputs[0].token_ids == [77] * 6
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(InvalidRequest) as e:
        llm.generate("Hello", SamplingParams(logit_bias={vocab: 1.0}))
    assert e.value.param == "logit_bias"
    assert_clean(llm.engine)


@pytest.mark.parametrize(
    ("so", "param"),
    [
        (StructuredOutputs(json='{"type": "nope"}'), "structured_outputs.json"),
        (StructuredOutputs(regex="(unclosed"), "structured_outputs.regex"),
        (StructuredOutputs(grammar="start: missing"), "structured_outputs.grammar"),
        # empty languages: they compile and fail only at the first mask (were a step error)
        (StructuredOutputs(grammar="start: start"), "structured_outputs.grammar"),
        (StructuredOutputs(json='{"$ref": "#"}'), "structured_outputs.json"),
    ],
)
def test_an_invalid_constraint_fails_its_request_and_the_engine_keeps_serving(llm, so, param):
    """Constraints compile on a compile thread (the router refused what its check could): one
    that fails there fails its request with an EngineStepError naming it and the field."""
    engine = llm.engine
    engine.add_request("bad", "Hello", params(so))
    with pytest.raises(EngineStepError) as e:
        while engine.has_unfinished_requests():
            engine.step()
    assert e.value.request_ids == ["bad"] and param.split(".")[-1] in str(e.value)
    assert not engine.has_unfinished_requests()
    assert_clean(engine)
    out = llm.generate("Hello", params(StructuredOutputs(choice=CHOICES), temperature=0))[0]
    assert out.outputs[0].text in CHOICES


def test_a_rejected_token_fails_that_request_only(llm, monkeypatch):
    """Were a token outside the grammar ever sampled (the mask is off here), its request fails
    with an EngineStepError naming it; the others finish and nothing leaks."""
    engine = llm.engine
    monkeypatch.setattr(type(engine.runner.sampler), "_mask_disallowed", lambda *a: None)
    engine.add_request("so", "Hello", params(StructuredOutputs(regex="Q{4}"), temperature=0))
    free = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.add_request("free", "Hello", free)
    got = []

    def drain():
        while engine.has_unfinished_requests():
            got.extend(engine.step())

    with pytest.raises(EngineStepError) as e:
        drain()
    assert e.value.request_ids == ["so"] and "does not follow" in str(e.value)
    drain()
    assert {o.request_id for o in got} == {"free"} and got[-1].finished
    assert sum(len(o.outputs[0].token_ids) for o in got) == 5
    assert_clean(engine)


def test_a_migrated_request_continues_its_grammar(llm):
    """The output generated elsewhere is consumed at admission: the rest continues it."""
    so = params(StructuredOutputs(json=SCHEMA), temperature=0)
    prompt = llm.tokenizer.encode("Hello there")
    full = llm.generate([prompt], so)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_request("m", prompt + full[:5], so, num_output_tokens=5)
    rest = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            rest += out.outputs[0].token_ids
    assert rest == full[5:]
    # Output that breaks the grammar fails the request, not the engine.
    bad = llm.tokenizer.encode("[[[", add_special_tokens=False)
    engine.add_request("m2", prompt + bad, so, num_output_tokens=len(bad))
    with pytest.raises(EngineStepError) as e:
        while engine.has_unfinished_requests():
            engine.step()
    assert e.value.request_ids == ["m2"]
    assert_clean(engine)


def test_a_remote_prefill_first_token_is_consumed_on_the_decode_engine(llama_dir, llm):
    """A prefill engine samples the first token under the grammar; the decode engine's matcher
    starts from it (the choice it began is the one completed)."""
    so = params(StructuredOutputs(choice=("alpha beta gamma", "delta epsilon")), temperature=0)
    prompt = llm.tokenizer.encode("The licence says")
    prefill = llm.generate([prompt], SamplingParams(**{**_fields(so), "max_tokens": 1}))[0]
    first = prefill.outputs[0].token_ids[0]
    decode = LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine
    decode.reserve_remote_prefill("r", prompt, so)
    decode.complete_remote_prefill("r", first)
    tokens = [first]
    while decode.has_unfinished_requests():
        for out in decode.step():
            tokens += out.outputs[0].token_ids
    text = decode.tokenizer.decode(tokens)
    assert text in ("alpha beta gamma", "delta epsilon")
    assert text.startswith(decode.tokenizer.decode([first]))
    # A first token the grammar rejects: the request is refused and freed.
    decode.reserve_remote_prefill("r2", prompt, so)
    with pytest.raises(InvalidRequest) as e:
        decode.complete_remote_prefill(
            "r2", decode.tokenizer.encode("zzz", add_special_tokens=False)[0]
        )
    assert e.value.param == "structured_outputs"
    assert RequestId("r2") not in decode._states
    assert_clean(decode)


def _fields(p: SamplingParams) -> dict:
    from tandem.api.sampling_params import SAMPLING_FIELDS

    return {f: getattr(p, f) for f in SAMPLING_FIELDS}


# ---- the manager alone ---------------------------------------------------------------------


def allowed_ids(mask) -> set[int]:
    return {t for t in range(mask.numel() * 32) if (int(mask[t // 32]) >> (t % 32)) & 1}


def test_masks_allow_the_grammars_next_tokens_then_only_eos(llm):
    from tandem.engine.sequence import Sequence
    from tandem.engine.structured_output import StructuredOutputManager

    tok = llm.tokenizer
    eos = llm.engine.eos_token_ids
    manager = StructuredOutputManager(tok, llm.engine.model_config.vocab_size, eos)
    p = params(StructuredOutputs(choice=("yes", "no")))
    seq = Sequence(RequestId("s"), [5, 6], p, arrival_time=0.0, arrival_index=0)
    free = Sequence(RequestId("f"), [5, 6], SamplingParams(), arrival_time=0.0, arrival_index=1)
    masks = manager.bitmasks([free, seq])
    assert masks[0] is None
    first = allowed_ids(masks[1])
    texts = {tok.decode([t]) for t in first}
    assert texts and all(t and ("yes".startswith(t) or "no".startswith(t)) for t in texts)
    assert not first & set(eos)  # nothing chosen yet: EOS not allowed
    seq.token_ids += tok.encode("yes", add_special_tokens=False)
    assert manager.advance(seq).stopped and manager.is_complete(seq)
    assert allowed_ids(manager.bitmasks([seq])[0]) == set(eos)
    seq.token_ids.append(eos[0])
    assert manager.advance(seq).error is None  # the EOS after a complete grammar is taken
    manager.release(seq.request_id)
    assert manager.num_matchers == 0


def test_compiled_grammars_are_an_lru_of_bounded_size(llm):
    from tandem.engine.structured_output import StructuredOutputManager

    manager = StructuredOutputManager(llm.tokenizer, 1024, llm.engine.eos_token_ids)
    manager.CACHE_SIZE = 3

    def compile_now(regex: str) -> None:
        so = StructuredOutputs(regex=regex)
        future = manager.prepare(so)
        if future is not None:
            future.result(30)
        assert manager.compiled(so)

    for i in range(5):
        compile_now(f"a{{{i + 1}}}")
    compile_now("a{3}")  # a hit: now the newest
    compile_now("a{9}")
    assert [so.regex for so in manager._templates] == ["a{5}", "a{3}", "a{9}"]
    assert manager.num_compiling == 0


def test_a_slow_compile_holds_only_its_own_request(llm, monkeypatch):
    """Constraints compile on a compile thread (a schema of thousands of properties takes
    seconds): the engine keeps stepping the other requests meanwhile, and the held request runs
    once its grammar is ready. The compile here waits for the test's go."""
    import threading

    engine = llm.engine
    manager = engine.structured_output
    go, compile_ = threading.Event(), manager._compile
    monkeypatch.setattr(manager, "_compile", lambda so: go.wait(30) and compile_(so))
    held = StructuredOutputs(json={**SCHEMA, "title": "not compiled before"})
    engine.add_request("held", "Hello", params(held, temperature=0))
    engine.add_request(
        "free", "Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    )
    finished, text = set(), {"held": "", "free": ""}

    def step() -> None:
        for out in engine.step():  # deltas
            text[out.request_id] += out.outputs[0].text
            finished.update([out.request_id] if out.finished else [])

    while "free" not in finished:
        step()
    assert "held" not in finished and not text["held"] and manager.num_compiling == 1
    assert engine.get_stats().num_waiting == 1
    go.set()
    while engine.has_unfinished_requests():
        step()
    assert follows_schema(text["held"])
    assert manager.num_compiling == 0
    assert_clean(engine)
