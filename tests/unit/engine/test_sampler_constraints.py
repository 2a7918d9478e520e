"""Sampler: the grammar's token mask and logit_bias (on CPU; the same code runs on CUDA)."""

import pytest
import torch

from tandem.api.sampling_params import SamplingParams
from tandem.engine.sampler import Sampler, SamplingRow

VOCAB = 70  # not a multiple of 32: the last mask word is partial


def packed(allowed: set[int], vocab: int = VOCAB) -> torch.Tensor:
    """The grammar's mask layout: bit t % 32 of int32 word t // 32."""
    words = [0] * -(-vocab // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def row(params, allowed=None, min_stop=()):
    mask = packed(allowed) if allowed is not None else None
    return SamplingRow(params, [], [], None, tuple(min_stop), allowed_tokens=mask)


@pytest.fixture
def sampler():
    return Sampler(torch.device("cpu"), seed=0)


@pytest.fixture
def logits():
    return torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))


def test_greedy_rows_pick_the_best_allowed_token_and_others_are_untouched(sampler, logits):
    allowed = {3, 31, 32, 63, 64, 69}  # word boundaries and bit 31 (the sign bit)
    greedy = SamplingParams(temperature=0)
    out = sampler(
        logits.clone(), [row(greedy, allowed), row(greedy), row(greedy, {31}), row(greedy, {69})]
    )
    best = max(allowed, key=lambda t: logits[0, t].item())
    assert out.token_ids == [best, logits[1].argmax().item(), 31, 69]


def test_random_rows_only_draw_allowed_tokens(sampler):
    flat = torch.zeros(2000, VOCAB)
    allowed = {0, 5, 33, 64}
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
    tokens = sampler(flat, [row(params, allowed)] * 2000).token_ids
    assert set(tokens) == allowed  # all of them drawn (uniform over 4), nothing else


def test_logprobs_are_the_models_own_not_the_masked_ones(sampler, logits):
    out = sampler(logits[:1].clone(), [row(SamplingParams(temperature=0, logprobs=1), {7})])
    assert out.token_ids == [7]
    assert out.logprobs[0][0] == pytest.approx(logits[0].log_softmax(-1)[7].item(), abs=1e-6)


def test_logit_bias_is_added_per_row(sampler, logits):
    target = logits[0].argmin().item()
    biased = SamplingParams(temperature=0, logit_bias={str(target): 100})
    out = sampler(logits[:2].clone(), [row(biased), row(SamplingParams(temperature=0))])
    assert out.token_ids == [target, logits[1].argmax().item()]
    # -100 removes a token for practical purposes, even sampled hot.
    top = logits[0].argmax().item()
    banned = SamplingParams(temperature=1.0, logit_bias={top: -100})
    assert top not in sampler(logits[:1].repeat(500, 1), [row(banned)] * 500).token_ids


def test_logit_bias_tensors_are_reused_and_each_row_gets_its_own(sampler, logits):
    # Regression: every entry of every row was rebuilt in Python each step (a whole vocabulary's
    # map, times n samples, cost seconds per step); a map's device tensors are now cached.
    a = SamplingParams(temperature=0, logit_bias={str(t): -50 + t for t in range(0, VOCAB, 3)})
    b = SamplingParams(temperature=0, logit_bias={5: 7.5, 69: -2.0})
    rows = [row(a), row(b), row(SamplingParams(temperature=0)), row(a)]
    expected = logits.clone()
    for i, p in ((0, a), (1, b), (3, a)):
        for t, bias in p.logit_bias:
            expected[i, t] += bias
    for _ in range(2):  # the second step reads the cache
        got = logits.clone()
        sampler._add_logit_bias(got, rows)
        assert torch.equal(got, expected)
    assert len(sampler._bias_cache) == 2


def test_logit_bias_then_the_grammar_mask(sampler, logits):
    """A bias cannot bring back a token the grammar forbids."""
    params = SamplingParams(temperature=0, logit_bias={10: 100})
    assert sampler(logits[:1].clone(), [row(params, {11, 12})]).token_ids[0] in (11, 12)
    assert (
        not params.argmax_only
        and not SamplingParams(temperature=0, logit_bias={1: 0.5}).argmax_only
    )


def test_tokens_path_matches_the_full_sampler(sampler, logits):
    rows = [
        row(SamplingParams(temperature=0, logit_bias={2: 50}), {2, 40}),
        row(SamplingParams(temperature=0), {1}),
    ]
    want = sampler(logits[:2].clone(), rows).token_ids
    assert sampler.tokens(logits[:2].clone(), rows).tolist() == want == [2, 1]
