"""Async output processing: a step's outputs are built while the next step runs (engine.step).

On CPU nothing actually overlaps (the forward finishes before ``launch`` returns), but the
bookkeeping is the same as on CUDA: outputs arrive one step later, a stop string found then ends
a sequence that the next step already computed, aborts and failures in between lose nothing.
"""

import sys
from pathlib import Path

import pytest

from tandem.engine import LLM, OutputKind, SamplingParams
from tandem.engine.llm_engine import EngineStepError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine import assert_clean, prompt_ids  # noqa: E402


def engine_for(model, mode):
    return LLM(model, num_kv_blocks=96, max_num_seqs=8, async_output_processing=mode).engine


def run(engine, requests, kind=OutputKind.DELTA):
    """Step to the end; per request: (token ids, text, finish reason, stop reason, number of outputs)."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params, output_kind=kind)
    got = {rid: [[], "", None, None, 0] for rid, _, _ in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            g, c = got[out.request_id], out.outputs[0]
            g[0] += c.token_ids
            g[1] += c.text
            g[4] += 1
            if out.finished:
                g[2], g[3] = c.finish_reason, c.stop_reason
    assert_clean(engine)
    return got


def test_auto_is_off_on_cpu_and_on_means_outputs_arrive_one_step_later(llama_dir):
    assert not engine_for(llama_dir, "auto").async_output_processing
    engine = engine_for(llama_dir, "on")
    engine.add_request("r", prompt_ids(20), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert engine.step() == []  # the prefill sampled the first token; its output comes next step
    first = engine.step()
    assert [len(o.outputs[0].token_ids) for o in first] == [1]
    assert engine.step()[0].outputs[0].token_ids and engine.has_unfinished_requests()  # the 3rd is due
    last = engine.step()  # nothing left to schedule: returns what is left
    assert len(last) == 1 and last[0].finished and engine.last_step_num_tokens == 0
    assert_clean(engine)


def test_same_tokens_text_and_stops_as_synchronous_outputs(llama_dir):
    """Greedy and seeded rows, logprobs, stop tokens, min_tokens, and a stop string that ends a
    sequence while the next step (which computed one more token for it) is in flight."""
    probe = run(engine_for(llama_dir, "off"), [("p", prompt_ids(30), SamplingParams(temperature=0, max_tokens=40,
                                                                                       ignore_eos=True))])
    text = probe["p"][1]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    requests = [
        ("greedy", prompt_ids(30), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])),
        ("plain", prompt_ids(30), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)),
        ("seeded", prompt_ids(12, 40), SamplingParams(temperature=0.8, seed=7, max_tokens=25, logprobs=2)),
        ("stop-id", prompt_ids(9, 70), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                      stop_token_ids=[probe["p"][0][5]], min_tokens=2)),
        ("short", prompt_ids(50, 90), SamplingParams(temperature=0, max_tokens=1)),
    ]
    sync = run(engine_for(llama_dir, "off"), requests)
    overlapped = run(engine_for(llama_dir, "on"), requests)
    assert sync["greedy"][2:4] == ["stop", stop]  # the stop string did cut it short
    assert len(sync["greedy"][0]) < 40
    for rid in sync:
        assert overlapped[rid][:4] == sync[rid][:4], rid
    cumulative = run(engine_for(llama_dir, "on"), requests, OutputKind.FINAL_ONLY)
    for rid in sync:
        assert cumulative[rid][:4] == sync[rid][:4] and cumulative[rid][4] == 1, rid


def test_abort_between_steps_returns_the_final_output_and_frees_everything(llama_dir):
    engine = engine_for(llama_dir, "on")
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("a", prompt_ids(20), params)
    engine.add_request("b", prompt_ids(25), params)
    for _ in range(4):
        engine.step()
    final = engine.abort_request("a")  # its last token's output was not built yet
    assert final.finished and final.outputs[0].finish_reason == "abort"
    rest = []
    while engine.has_unfinished_requests():
        rest += engine.step()
    assert {o.request_id for o in rest} == {"b"} and rest[-1].finished
    assert_clean(engine)


def test_a_failed_step_returns_the_outputs_built_before_it_next_time(llama_dir, monkeypatch):
    engine = engine_for(llama_dir, "on")
    engine.add_request("done", prompt_ids(20), SamplingParams(temperature=0, max_tokens=1))
    engine.add_request("victim", prompt_ids(30), SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    engine.step()  # both prefilled: "done" finished by length, its output not built yet
    launch = engine.runner.launch

    def failing(scheduled):
        launched = launch(scheduled)

        class Broken:
            def result(self):
                launched.result()
                raise RuntimeError("device fault")

        return Broken()

    monkeypatch.setattr(engine.runner, "launch", failing)
    with pytest.raises(EngineStepError) as e:
        engine.step()  # built "done"'s final output, then failed
    assert e.value.request_ids == ["victim"]
    assert engine.has_unfinished_requests()  # an output is still due
    outs = engine.step()
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in outs] == [("done", True, "length")]
    assert_clean(engine)
