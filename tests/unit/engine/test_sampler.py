"""Sampler: greedy, temperature, top-k/top-p/min-p, penalties, seeds, min_tokens, logprobs."""

import pytest
import torch

from tandem.api.sampling_params import SamplingParams
from tandem.engine.sampler import Sampler, SamplingRow


def row(params: SamplingParams, *, prompt=(), output=(), seed_gen=None, min_stop=()):
    return SamplingRow(params, list(prompt), list(output), seed_gen, tuple(min_stop))


@pytest.fixture
def sampler():
    return Sampler(torch.device("cpu"), seed=0)


def test_argmax_only_is_greedy_without_logprobs_or_penalties():
    assert SamplingParams(temperature=0).argmax_only
    assert SamplingParams(
        temperature=0, min_tokens=3, stop=("x",)
    ).argmax_only  # min_tokens: the runner checks
    for params in (
        SamplingParams(),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=0, repetition_penalty=1.1),
        SamplingParams(temperature=0, presence_penalty=0.5),
    ):
        assert not params.argmax_only


def test_greedy_is_argmax(sampler):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    out = sampler(logits.clone(), [row(SamplingParams(temperature=0))] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_argmax_fast_path_picks_what_the_full_sampler_picks(sampler, dtype):
    """In the logits' own dtype, ties included (half precision ties often): the first maximum."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)).to(dtype)
    logits[::3, 7] = logits[::3, 200] = logits[::3].max() + 1  # exact ties in every third row
    want = sampler(logits.clone(), [row(SamplingParams(temperature=0))] * 64)
    got = sampler.argmax_tokens(logits).tolist()
    assert got == want.token_ids and got[0] == 7


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=1e-6),
        SamplingParams(temperature=2.0, min_p=1.0),
    ],
)
def test_truncation_to_one_token_gives_argmax(sampler, params):
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        assert sampler(logits.clone(), [row(params)] * 8).token_ids == logits.argmax(-1).tolist()


def test_sampling_follows_the_softmax(sampler):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    out = sampler(logits.clone(), [row(SamplingParams(temperature=1.0))] * 4000)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / 4000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)


def test_temperature_sharpens(sampler):
    logits = torch.tensor([[1.0, 0.0]]).repeat(4000, 1)
    hot = sampler(logits.clone(), [row(SamplingParams(temperature=2.0))] * 4000).token_ids
    cold = sampler(logits.clone(), [row(SamplingParams(temperature=0.25))] * 4000).token_ids
    assert sum(t == 0 for t in cold) > sum(t == 0 for t in hot)


def _allowed(sampler, logits, params, n=400):
    toks = sampler(logits.repeat(n, 1), [row(params)] * n).token_ids
    return set(toks)


def test_top_k_and_top_p_masks_match_transformers(sampler):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]])
    for k in (1, 2, 5):
        hf = TopKLogitsWarper(top_k=k)(None, logits.clone())
        expected = set(torch.nonzero(hf[0] > float("-inf")).flatten().tolist())
        assert _allowed(sampler, logits, SamplingParams(top_k=k, temperature=1.0)) == expected
    for p in (0.3, 0.6, 0.9):
        hf = TopPLogitsWarper(top_p=p)(None, logits.clone())
        expected = set(torch.nonzero(hf[0] > float("-inf")).flatten().tolist())
        assert (
            _allowed(sampler, logits, SamplingParams(top_p=p, temperature=1.0), n=3000) == expected
        )


def test_min_p_drops_unlikely_tokens(sampler):
    logits = torch.tensor([[2.0, 1.9, 0.0, -3.0]])
    probs = logits.softmax(-1)[0]
    expected = {i for i in range(4) if probs[i] >= 0.2 * probs.max()}
    assert _allowed(sampler, logits, SamplingParams(min_p=0.2, temperature=1.0), n=2000) == expected


def test_repetition_penalty_matches_transformers(sampler):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[1.0, -1.0, 0.5, 0.4, 2.0]])
    params = SamplingParams(temperature=0, repetition_penalty=10.0)
    # token 4 (the argmax) was seen, so the penalty should move the argmax to token 0.
    hf = RepetitionPenaltyLogitsProcessor(10.0)(torch.tensor([[4, 1]]), logits.clone())
    out = sampler(logits.clone(), [row(params, prompt=[4], output=[1])])
    assert out.token_ids == [hf.argmax(-1).item()] == [0]


def test_presence_and_frequency_penalties(sampler):
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    # frequency: 0.1 * 2 occurrences moves token 0 below token 1.
    out = sampler(
        logits.clone(), [row(SamplingParams(temperature=0, frequency_penalty=0.1), output=[0, 0])]
    )
    assert out.token_ids == [1]
    out = sampler(
        logits.clone(), [row(SamplingParams(temperature=0, presence_penalty=0.05), output=[0, 0])]
    )
    assert out.token_ids == [0]  # 1.0 - 0.05 > 0.9
    out = sampler(
        logits.clone(), [row(SamplingParams(temperature=0, presence_penalty=0.2), output=[0])]
    )
    assert out.token_ids == [1]
    # Penalties apply per row only.
    out = sampler(
        logits.repeat(2, 1),
        [
            row(SamplingParams(temperature=0, presence_penalty=0.2), output=[0]),
            row(SamplingParams(temperature=0)),
        ],
    )
    assert out.token_ids == [1, 0]


def test_min_tokens_masks_stop_ids(sampler):
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    out = sampler(logits.clone(), [row(SamplingParams(temperature=0), min_stop=[0])])
    assert out.token_ids == [1]


def test_seeded_rows_do_not_depend_on_the_batch(sampler):
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, seed=42)

    def draws(batch_size):
        gen = torch.Generator().manual_seed(42)
        toks = []
        for _ in range(20):
            rows = [row(params, seed_gen=gen)] + [row(SamplingParams(temperature=1.0))] * (
                batch_size - 1
            )
            toks.append(sampler(logits.repeat(batch_size, 1), rows).token_ids[0])
        return toks

    alone = draws(1)
    assert draws(7) == alone == draws(3)
    assert len(set(alone)) > 1


def test_logprobs_are_raw_log_softmax_with_rank(sampler):
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    params = SamplingParams(temperature=0, logprobs=2, repetition_penalty=3.0)
    out = sampler(
        logits.repeat(2, 1), [row(params, output=[1]), row(SamplingParams(temperature=0))]
    )
    lp = logits.log_softmax(-1)[0]
    chosen, rank, top = out.logprobs[0]
    # The penalty moved the pick to token 2; logprobs still describe the model's distribution.
    assert out.token_ids[0] == 2
    assert chosen == pytest.approx(lp[2].item()) and rank == 2
    assert [t for t, _ in top] == [1, 2]
    assert [v for _, v in top] == pytest.approx([lp[1].item(), lp[2].item()])
    assert out.logprobs[1] is None
