"""A migrated request resumed on another engine (``num_output_tokens``): the tokens, text, stop
rules and seeded draws after the migration point are exactly an uninterrupted run's."""

import pytest
import torch

from tandem.api.errors import InvalidRequest
from tandem.engine import LLM, SamplingParams

PROMPT = [11, 42, 7, 300, 5, 19, 88, 23, 64, 9, 250, 31]


@pytest.fixture(scope="module")
def engine(llama_dir):
    return LLM(llama_dir, num_kv_blocks=64, max_model_len=512).engine


def run(engine, rid, ids, params, n=0):
    """Every DELTA output of one request, run alone to its end."""
    engine.add_request(rid, ids, params, num_output_tokens=n)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    assert outs and outs[-1].finished
    return outs


def tokens(outs):
    return [t for o in outs for t in o.outputs[0].token_ids]


def text(outs):
    return "".join(o.outputs[0].text for o in outs)


def split(outs, k):
    """(text sent with the first k tokens, the outputs after them); one token per output."""
    assert all(len(o.outputs[0].token_ids) == 1 for o in outs)
    return text(outs[:k]), outs[k:]


def assert_resumes(engine, params, ks, prompt=PROMPT):
    full = run(engine, "full", prompt, params)
    all_tokens = tokens(full)
    for k in ks:
        assert k < len(all_tokens)
        sent_text, rest = split(full, k)
        resumed = run(engine, f"resumed-{k}", prompt + all_tokens[:k], params, n=k)
        assert tokens(resumed) == tokens(rest), k
        assert sent_text + text(resumed) == text(full), k
        last, want = resumed[-1], full[-1]
        assert last.prompt_token_ids == prompt  # usage counts the original prompt
        assert last.outputs[0].finish_reason == want.outputs[0].finish_reason
        assert last.outputs[0].stop_reason == want.outputs[0].stop_reason
        if params.logprobs is not None:
            got = [lp for o in resumed for lp in o.outputs[0].logprobs]
            expected = [lp for o in rest for lp in o.outputs[0].logprobs]
            assert [lp.token_id for lp in got] == [lp.token_id for lp in expected]
            assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in expected])
    assert engine._states == {} and engine.runner._generators == {}
    return full


def test_greedy_resume_continues_the_same_tokens_and_text(engine):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)
    full = assert_resumes(engine, params, ks=(1, 7, 19))
    assert full[-1].outputs[0].finish_reason == "length"


def test_seeded_sampling_with_penalties_draws_what_the_uninterrupted_run_draws(engine):
    params = SamplingParams(
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        frequency_penalty=0.7,
        presence_penalty=0.3,
        max_tokens=24,
        ignore_eos=True,
    )
    full = assert_resumes(engine, params, ks=(1, 6, 23))
    # Not a vacuous match: resuming without skipping the generator gives other tokens.
    generated = tokens(full)
    unseeded_start = SamplingParams(**{**_fields(params), "seed": 99})
    other = tokens(run(engine, "other", PROMPT + generated[:6], unseeded_start, n=6))
    assert other != generated[6:]


def test_a_stop_string_that_spans_the_migration_point_is_found(engine):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = run(engine, "probe", PROMPT, greedy)
    # A stop string that starts in the text of the first k tokens and ends after it.
    k = 8
    before = text(full[:k])
    after = text(full[k:])
    assert len(before) >= 3 and len(after) >= 3
    stop = before[-3:] + after[:3]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,))
    # The held-back text is what the uninterrupted stream had not sent at token k.
    stopped = assert_resumes(engine, params, ks=(k,))
    assert stopped[-1].outputs[0].stop_reason == stop


def test_a_stop_string_begun_before_min_tokens_stays_ignored_after_the_migration(engine):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = run(engine, "probe", PROMPT, greedy)
    k = 8
    stop = text(full[:k])[-3:] + text(full[k:])[:3]
    # It starts in the text of the first min_tokens tokens: vLLM never matches it there.
    params = SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,), min_tokens=k
    )
    resumed = assert_resumes(engine, params, ks=(k, 5))
    assert len(tokens(resumed)) > k + 1


def test_min_tokens_counts_the_output_brought_along(engine):
    probe = tokens(run(engine, "probe", PROMPT, SamplingParams(temperature=0.0, max_tokens=30)))
    stop_token = probe[2]
    params = SamplingParams(
        temperature=0.0, max_tokens=30, min_tokens=9, stop_token_ids=(stop_token,)
    )
    # Resumed before min_tokens is reached (the stop token is still masked) and after it.
    assert_resumes(engine, params, ks=(4, 9))


def test_a_remote_first_token_leaves_the_generator_where_the_uninterrupted_one_is(engine):
    """Decode pods: the prefill pod sampled token k + 1 of a migrated request; the decode
    pod's generator must then stand after k + 1 draws."""
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    generated = tokens(run(engine, "full", PROMPT, params))
    k = 5
    engine.reserve_remote_prefill("remote", PROMPT + generated[:k], params, num_output_tokens=k)
    engine.complete_remote_prefill("remote", generated[k])
    expected = torch.Generator().manual_seed(5)
    row = torch.empty(engine.model_config.vocab_size)
    for _ in range(k + 1):
        row.exponential_(generator=expected)
    got = engine.runner._generators["remote"]
    assert torch.equal(got.get_state(), expected.get_state())
    engine.abort_request("remote")


@pytest.mark.parametrize("n", [-1, len(PROMPT), 16])
def test_an_impossible_output_count_is_refused(engine, n):
    params = SamplingParams(max_tokens=16)
    with pytest.raises(InvalidRequest) as e:
        engine.add_request("bad", PROMPT, params, num_output_tokens=n)
    assert e.value.param == "num_output_tokens"
    assert engine._states == {}


def _fields(params):
    from tandem.api.sampling_params import SAMPLING_FIELDS

    return {name: getattr(params, name) for name in SAMPLING_FIELDS}
