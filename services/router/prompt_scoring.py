"""Prompt scoring on the OpenAI routes, in vLLM's JSON: the ``prompt_logprobs`` field, and
``echo`` on /v1/completions (the prompt's text, and with ``logprobs`` its tokens' logprobs,
before the choice's own).

The pods compute the logprobs of every prompt token during prefill (``SamplingParams.
prompt_logprobs``; ``tandem.engine.prompt_logprobs``) and stream them on a request's first
event, one per prompt token from the second on. Here they become:

- ``prompt_logprobs`` (both endpoints): ``[null, {"<token id>": {"logprob", "rank",
  "decoded_token"}, ...}, ...]``, one entry per prompt token, the first null (nothing predicts
  it); each dict holds the prompt's token first, then the top alternatives.
- echo + ``logprobs`` (completions): the prompt's tokens prepended to the choice's
  ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``; the first token's logprob and
  top_logprobs are null, ``text_offset`` counts on through the generated tokens.

Logprobs of ``-inf`` are written as -9999.0 (JSON has no infinity), as vLLM does.
"""

from collections.abc import Callable, Sequence

from tandem.api.outputs import TokenLogprob
from tandem.tokenizer import Tokenizer

LOGPROB_FLOOR = -9999.0


def _clamp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def prompt_logprobs_json(
    entries: Sequence[TokenLogprob] | None, tokenizer: Tokenizer
) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: null for the first prompt token, then per token a dict by
    token id of the token itself (its rank in the distribution) and the top alternatives
    (ranks 1..k)."""
    out: list[dict | None] = [None]
    for lp in entries or ():
        scored = {
            str(lp.token_id): {
                "logprob": _clamp(lp.logprob),
                "rank": lp.rank,
                "decoded_token": tokenizer.token_text(lp.token_id),
            }
        }
        for rank, (t, v) in enumerate(lp.top, start=1):
            scored.setdefault(
                str(t),
                {"logprob": _clamp(v), "rank": rank, "decoded_token": tokenizer.token_text(t)},
            )
        out.append(scored)
    return out


def echo_text(prompt: str | list[int], tokenizer: Tokenizer) -> str:
    """The prompt as echo returns it: a text prompt as sent, token ids decoded (special tokens
    kept, as vLLM)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(prompt, skip_special_tokens=False)


def echo_logprobs(
    prompt_ids: Sequence[int],
    entries: Sequence[TokenLogprob] | None,
    k: int,
    token: Callable[[int], str],
    tokenizer: Tokenizer,
    offset: int = 0,
) -> tuple[dict, int]:
    """The prompt's part of a completion's ``logprobs`` (``k``: the request's ``logprobs``),
    and the text offset after it.

    Each token's ``top_logprobs`` holds the token itself, then the top alternatives, at most
    ``k + 1`` entries (vLLM's rule). ``token`` renders a token id (as text or ``token_id:N``).
    """
    entries = list(entries or ())
    tokens, values, tops, offsets = [], [], [], []
    for i, token_id in enumerate(prompt_ids):
        lp = entries[i - 1] if 0 < i <= len(entries) else None
        tokens.append(token(token_id))
        offsets.append(offset)
        offset += len(tokenizer.token_text(token_id))
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_clamp(lp.logprob))
        top = {token(lp.token_id): _clamp(lp.logprob)}
        for t, v in lp.top:
            if len(top) > k:
                break
            top.setdefault(token(t), _clamp(v))
        tops.append(top)
    part = {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
    return part, offset


def join_logprobs(first: dict, second: dict) -> dict:
    """Two parts of a completion's ``logprobs`` (the prompt's, then the generated tokens')."""
    return {key: first[key] + second[key] for key in first}
