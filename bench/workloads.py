"""Request shapes shared by the benchmarks (../shared/BENCHMARKS.md names them W1..W5)."""

import math
import random

W4_MEDIAN_IN, W4_MEDIAN_OUT, W4_SIGMA = 150, 140, 0.85
W4_MAX_IN, W4_MAX_TOTAL = 1024, 2048


def w4_lengths(rng: random.Random) -> tuple[int, int]:
    """One W4 (ShareGPT-shaped) request's (input, output) lengths: lognormal, median 150 in /
    140 out, sigma 0.85, input <= 1024, input + output <= 2048 (means about 211 / 202)."""
    n_in = min(W4_MAX_IN, max(1, round(rng.lognormvariate(math.log(W4_MEDIAN_IN), W4_SIGMA))))
    n_out = min(
        W4_MAX_TOTAL - n_in, max(2, round(rng.lognormvariate(math.log(W4_MEDIAN_OUT), W4_SIGMA)))
    )
    return n_in, n_out


def w4_requests(n: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """``n`` W4 requests: random prompt tokens of W4 lengths, and their output lengths."""
    rng = random.Random(seed)
    prompts, out_lens = [], []
    for _ in range(n):
        n_in, n_out = w4_lengths(rng)
        prompts.append([rng.randrange(3, vocab) for _ in range(n_in)])
        out_lens.append(n_out)
    return prompts, out_lens
