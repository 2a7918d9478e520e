"""Async output processing and async scheduling (engine.step), against synchronous steps.

Async output processing builds a step's outputs while the next step runs; async scheduling
launches the next decode step before the current one's tokens are read. On CPU nothing actually
overlaps (the forward finishes before ``launch`` returns), but the bookkeeping is the same as on
CUDA: outputs arrive later, a sequence that a stop ends has computed one more token (dropped),
and aborts, new requests, preemption and failures in between lose nothing.
"""

import sys
from pathlib import Path

import pytest

from tandem.engine import LLM, OutputKind, SamplingParams
from tandem.engine.llm_engine import EngineStepError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine import assert_clean, prompt_ids  # noqa: E402

ASYNC_MODES = {
    "outputs": dict(async_output_processing="on"),
    "scheduling": dict(async_scheduling="on"),
    "both": dict(async_output_processing="on", async_scheduling="on"),
}


def engine_for(model, mode="off", num_kv_blocks=96, **kw):
    kw.setdefault("async_output_processing", mode)
    return LLM(model, num_kv_blocks=num_kv_blocks, max_num_seqs=8, **kw).engine


def count_launches_ahead(engine, monkeypatch) -> list[int]:
    """Record, for each launch, how many of its input tokens came from the device."""
    launch, seen = engine.runner.launch, []

    def recording(scheduled, input_ids=None):
        seen.append(0 if input_ids is None else len(input_ids))
        return launch(scheduled, input_ids)

    monkeypatch.setattr(engine.runner, "launch", recording)
    return seen


def break_step_in_flight(engine) -> None:
    """Make reading the tokens of the step launched ahead fail, as a device fault would."""
    sched, launched = engine._inflight

    class Broken:
        sampled, tokens = launched.sampled, launched.tokens

        def result(self):
            launched.result()
            raise RuntimeError("device fault")

    engine._inflight = (sched, Broken())


def run(engine, requests, kind=OutputKind.DELTA):
    """Step to the end; per request: (token ids, text, finish reason, stop reason, number of
    outputs)."""
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
    engine.add_request(
        "r", prompt_ids(20), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    )
    assert engine.step() == []  # the prefill sampled the first token; its output comes next step
    first = engine.step()
    assert [len(o.outputs[0].token_ids) for o in first] == [1]
    assert (
        engine.step()[0].outputs[0].token_ids and engine.has_unfinished_requests()
    )  # the 3rd is due
    last = engine.step()  # nothing left to schedule: returns what is left
    assert len(last) == 1 and last[0].finished and engine.last_step_num_tokens == 0
    assert_clean(engine)


def mixed_requests(model, *, logprobs: bool):
    """Greedy and seeded rows, stop tokens at and around min_tokens, a stop string that ends a
    sequence while the next step (which computed one more token for it) is in flight, lengths
    that end at different steps; with ``logprobs``, rows that read their tokens on the host."""
    probe = run(
        engine_for(model),
        [("p", prompt_ids(30), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))],
    )
    tokens, text = probe["p"][0], probe["p"][1]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    greedy = dict(temperature=0, ignore_eos=True)
    requests = [
        ("stop-string", prompt_ids(30), SamplingParams(max_tokens=40, stop=[stop], **greedy)),
        ("plain", prompt_ids(30), SamplingParams(max_tokens=33, **greedy)),
        (
            "seeded",
            prompt_ids(12, 40),
            SamplingParams(
                temperature=0.8, seed=7, max_tokens=25, logprobs=2 if logprobs else None
            ),
        ),
        ("short", prompt_ids(50, 90), SamplingParams(temperature=0, max_tokens=1)),
        ("two", prompt_ids(7, 90), SamplingParams(max_tokens=2, **greedy)),
    ]
    # The probe's 5th token as a stop token, suppressed until min_tokens: the boundary where a
    # step scheduled ahead must count the token still in flight as an output already.
    for min_tokens in (3, 4, 5, 6):
        requests.append(
            (
                f"stop-id-min{min_tokens}",
                prompt_ids(30),
                SamplingParams(
                    max_tokens=30, stop_token_ids=[tokens[4]], min_tokens=min_tokens, **greedy
                ),
            )
        )
    return requests, stop


@pytest.mark.parametrize("logprobs", [False, True], ids=["device-tokens", "logprobs"])
@pytest.mark.parametrize("mode", list(ASYNC_MODES))
def test_same_tokens_text_and_stops_as_synchronous_steps(llama_dir, monkeypatch, mode, logprobs):
    requests, stop = mixed_requests(llama_dir, logprobs=logprobs)
    sync = run(engine_for(llama_dir), requests)
    assert (
        sync["stop-string"][2:4] == ["stop", stop] and len(sync["stop-string"][0]) < 40
    )  # it did cut short
    stop_id = requests[-1][2].stop_token_ids[0]
    assert (
        sync["stop-id-min3"][0][-1] == stop_id and len(sync["stop-id-min3"][0]) == 5
    )  # stopped at it
    assert sync["stop-id-min6"][0][4] != stop_id  # suppressed there: min_tokens not reached
    engine = engine_for(llama_dir, **ASYNC_MODES[mode])
    ahead = count_launches_ahead(engine, monkeypatch)
    overlapped = run(engine, requests)
    for rid in sync:
        assert overlapped[rid][:4] == sync[rid][:4], rid
    if mode != "outputs" and not logprobs:
        assert sum(1 for n in ahead if n) >= 15  # most decode steps were launched ahead
    if mode == "outputs":
        assert not any(ahead)
    final_only = run(engine_for(llama_dir, **ASYNC_MODES[mode]), requests, OutputKind.FINAL_ONLY)
    for rid in sync:
        assert final_only[rid][:4] == sync[rid][:4] and final_only[rid][4] == 1, rid


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
    engine.add_request(
        "victim", prompt_ids(30), SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    )
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
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in outs] == [
        ("done", True, "length")
    ]
    assert_clean(engine)


def test_async_scheduling_never_launches_ahead_of_a_step_whose_tokens_the_host_must_read(
    llama_dir, monkeypatch
):
    engine = engine_for(llama_dir, async_scheduling="on")
    launch, launches = engine.runner.launch, []

    def recording(scheduled, input_ids=None):
        launches.append((input_ids is not None, {s.seq.request_id for s in scheduled}))
        return launch(scheduled, input_ids)

    monkeypatch.setattr(engine.runner, "launch", recording)
    got = run(
        engine,
        [
            (
                "logprobs",
                prompt_ids(20),
                SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1),
            ),
            (
                "penalised",
                prompt_ids(20, 50),
                SamplingParams(
                    temperature=0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3
                ),
            ),
            (
                "plain",
                prompt_ids(20, 80),
                SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            ),
        ],
    )
    assert [len(got[r][0]) for r in ("logprobs", "penalised", "plain")] == [6, 9, 24]
    ahead = [ids for early, ids in launches if early]
    assert ahead and all(ids == {"plain"} for ids in ahead)  # only once the others were done


def test_abort_and_new_requests_while_a_step_is_in_flight(llama_dir):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = run(
        engine_for(llama_dir), [("a", prompt_ids(20), params), ("late", prompt_ids(25, 60), params)]
    )
    engine = engine_for(llama_dir, async_scheduling="on")
    engine.add_request("a", prompt_ids(20), params)
    engine.add_request("b", prompt_ids(25), params)
    outs = []
    for _ in range(6):
        outs += engine.step()
    assert engine._inflight is not None  # a step launched ahead is running
    assert engine.abort_request("b").finished
    engine.add_request("late", prompt_ids(25, 60), params)  # ends the run of steps launched ahead
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert_clean(engine)
    for rid in ("a", "late"):
        tokens = [t for o in outs if o.request_id == rid for t in o.outputs[0].token_ids]
        assert tokens == want[rid][0], rid
    assert not [
        o for o in outs if o.request_id == "b" and o.finished
    ]  # its end came from abort_request


def test_async_scheduling_under_preemption_gives_the_synchronous_tokens(llama_dir):
    """A pool too small for every sequence to grow: steps ahead stop where a block is missing,
    the normal schedule preempts, and every request still gets exactly its synchronous tokens."""
    requests = [
        (
            f"r{i}",
            prompt_ids(20 + 3 * i, 10 + i),
            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        )
        for i in range(6)
    ]
    small = dict(num_kv_blocks=16, max_model_len=96)
    sync_engine = engine_for(llama_dir, **small)
    want = run(sync_engine, requests)
    engine = engine_for(llama_dir, async_scheduling="on", **small)
    got = run(engine, requests)
    assert sync_engine.scheduler.num_preemptions > 0 and engine.scheduler.num_preemptions > 0
    assert {r: g[:3] for r, g in got.items()} == {r: w[:3] for r, w in want.items()}


def test_a_failed_step_with_the_next_one_launched_aborts_both_and_the_engine_recovers(
    llama_dir, monkeypatch
):
    engine = engine_for(llama_dir, async_scheduling="on")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("x", prompt_ids(20), params)
    engine.add_request("y", prompt_ids(22), params)
    for _ in range(3):
        engine.step()
    assert engine._inflight is not None
    break_step_in_flight(engine)
    with pytest.raises(EngineStepError) as e:
        engine.step()  # had launched the step after the broken one before reading it
    assert sorted(e.value.request_ids) == ["x", "y"]
    assert_clean(engine)
    got = run(engine, [("z", prompt_ids(20), params)])
    assert len(got["z"][0]) == 12


def test_steps_keep_running_ahead_when_sequences_finish(llama_dir, monkeypatch):
    """A sequence ending (by length or by a stop token) does not break the run of steps launched
    ahead: the next one goes on with the others."""
    engine = engine_for(llama_dir, async_scheduling="on")
    ahead = count_launches_ahead(engine, monkeypatch)
    probe = run(
        engine_for(llama_dir),
        [("p", prompt_ids(20, 30), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))],
    )
    got = run(
        engine,
        [
            ("long", prompt_ids(20), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
            (
                "length",
                prompt_ids(20, 60),
                SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
            ),
            (
                "stop-id",
                prompt_ids(20, 30),
                SamplingParams(
                    temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[probe["p"][0][9]]
                ),
            ),
        ],
    )
    assert [len(got[r][0]) for r in ("long", "length")] == [30, 8] and got["stop-id"][2] == "stop"
    batch_sizes = [n for n in ahead if n]
    assert 3 in batch_sizes and 2 in batch_sizes and 1 in batch_sizes
    assert ahead[1:].count(0) <= 1  # only the prefill step was launched normally (and a tail)


def test_a_failed_step_launched_ahead_spares_what_finished_or_was_replaced_meanwhile(
    llama_dir, monkeypatch
):
    """Step N was launched ahead with X and B in it; before it is read, X ends at step N-1 and
    B is aborted and its id reused. N then fails: only the live sequences are failed."""
    probe = run(
        engine_for(llama_dir),
        [("p", prompt_ids(20), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))],
    )
    engine = engine_for(llama_dir, async_scheduling="on")
    greedy = dict(temperature=0, ignore_eos=True)
    engine.add_request(
        "x",
        prompt_ids(20),
        SamplingParams(max_tokens=30, stop_token_ids=[probe["p"][0][4]], **greedy),
    )
    engine.add_request("b", prompt_ids(25, 60), SamplingParams(max_tokens=30, **greedy))
    engine.add_request("live", prompt_ids(22, 90), SamplingParams(max_tokens=30, **greedy))
    outs = []
    while not engine._states["x"].seq.is_finished:  # x's stop token read; its output not built yet
        outs += engine.step()
    assert engine._inflight is not None and "x" in {
        s.seq.request_id for s in engine._inflight[0].scheduled
    }
    assert engine.abort_request("b").finished
    engine.add_request(
        "b", prompt_ids(10, 120), SamplingParams(max_tokens=4, **greedy)
    )  # the id, reused
    break_step_in_flight(engine)
    with pytest.raises(EngineStepError) as e:
        engine.step()
    assert e.value.request_ids == ["live"]
    rest = []
    assert engine.has_unfinished_requests()  # x's final output, built before the failure, is due
    while engine.has_unfinished_requests():
        rest += engine.step()
    assert [(o.request_id, o.outputs[0].finish_reason) for o in rest if o.finished] == [
        ("x", "stop"),
        ("b", "length"),
    ]
    assert_clean(engine)


@pytest.mark.parametrize("mode", list(ASYNC_MODES))
def test_an_aborted_requests_final_output_has_the_text_of_all_its_tokens(llama_dir, mode):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = run(engine_for(llama_dir), [("r", prompt_ids(20), params)], OutputKind.FINAL_ONLY)["r"]
    engine = engine_for(llama_dir, **ASYNC_MODES[mode])
    engine.add_request(
        "r",
        prompt_ids(20),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        output_kind=OutputKind.FINAL_ONLY,
    )
    while engine._states["r"].seq.num_output_tokens < 5:
        assert engine.step() == []
    final = engine.abort_request("r")  # its 5th token's output was not built yet
    assert final.outputs[0].token_ids[:5] == want[0] and final.outputs[0].text.startswith(want[1])
    while engine.has_unfinished_requests():
        engine.step()
    assert_clean(engine)


def test_an_abort_that_comes_after_a_stop_string_reports_the_stop(llama_dir):
    """The pending token's text completes a stop string when the abort arrives: the request
    ended by that stop (as synchronous steps report), not by the abort."""
    greedy = dict(temperature=0, ignore_eos=True)
    texts = [
        run(engine_for(llama_dir), [("p", prompt_ids(20), SamplingParams(max_tokens=k, **greedy))])[
            "p"
        ][1]
        for k in range(1, 9)
    ]
    k, stop = next(
        (k, texts[k][len(texts[k - 1]) :])
        for k in range(3, 8)
        if texts[k][len(texts[k - 1]) :].strip()
        and texts[k][len(texts[k - 1]) :] not in texts[k - 1]
    )
    engine = engine_for(llama_dir, async_output_processing="on")
    engine.add_request(
        "r",
        prompt_ids(20),
        SamplingParams(max_tokens=30, stop=[stop], **greedy),
        output_kind=OutputKind.FINAL_ONLY,
    )
    while engine._states["r"].seq.num_output_tokens < k + 1:
        engine.step()  # the token completing the stop string is appended, its output not built
    final = engine.abort_request("r")
    assert (final.outputs[0].finish_reason, final.outputs[0].stop_reason) == ("stop", stop)
    assert final.outputs[0].text == texts[k - 1]
    while engine.has_unfinished_requests():
        engine.step()
    assert_clean(engine)
