"""Sampler: turns a step's logits into tokens for the whole batch at once, on the device.

Order, as vLLM: logprobs are taken from the raw logits; then ``logit_bias`` is added, the
structured-output grammar's mask applied (disallowed tokens become -inf), min_tokens masking,
penalties, temperature, min_p, top_k and top_p; then one draw. NOTE: vLLM masks the grammar's
tokens before its sampler, so its logprobs see the mask; here they are the model's own (a
forced token's logprob says how likely the model found it). Rows with a bias or a grammar never
take the argmax-only fast path (``SamplingParams.argmax_only``).

Random rows draw with the exponential race (``argmax(p / Exp(1))`` is a sample of ``p``), which
lets a request with a seed use its own generator for its row while every other row shares one
draw, so a seeded request's tokens do not depend on what else is in the batch.
"""

from dataclasses import dataclass

import torch

from tandem.api.sampling_params import SamplingParams
from tandem.engine.uploads import upload


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs of one sequence this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    stop_ids_for_min_tokens: tuple[int, ...]
    """Token ids to suppress because min_tokens is not reached yet (empty otherwise)."""
    allowed_tokens: torch.Tensor | None = None
    """The grammar's packed mask (int32 words on the host; bit ``t % 32`` of word ``t // 32``
    set when token ``t`` may be sampled), or None: no grammar
    (``tandem.engine.structured_output``)."""


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[tuple[float, int, list[tuple[int, float]]] | None]
    """Per row: (sampled token's logprob, its rank, top-n (token, logprob)) or None if not asked."""


class Sampler:
    """Batched sampling on the device, with one shared generator for unseeded rows."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._bias_cache: dict[int, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}
        """``_bias_tensors``' cache: id of a ``logit_bias`` -> (it, its device tensors)."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = self._logprobs(logits, rows)
        tokens = self._choose(logits, rows)
        return SamplerOutput(tokens.tolist(), self._gather_logprobs(raw_logprobs, tokens, rows))

    def tokens(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The tokens ``__call__`` would pick, left on the device (rows that want no logprobs)."""
        return self._choose(logits.float(), rows)

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        self._add_logit_bias(logits, rows)
        self._mask_disallowed(logits, rows)
        self._mask_until_min_tokens(logits, rows)
        if any(r.params.has_penalties for r in rows):
            logits = self._apply_penalties(logits, rows)
        greedy = logits.argmax(dim=-1)
        if all(r.params.is_greedy for r in rows):
            return greedy
        return torch.where(self._greedy_mask(rows), greedy, self._random(logits, rows))

    def argmax_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy tokens (on the device, not read yet) of rows that need nothing else
        (``SamplingParams.argmax_only``).

        The argmax of the logits in their own dtype: widening to float32 is exact, so the token
        is the one ``__call__`` picks, without a float32 copy of a [batch, vocab] tensor.
        """
        return logits.argmax(dim=-1)

    # ---- logits processing ------------------------------------------------------------------

    def _add_logit_bias(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """Add each row's ``logit_bias`` (token ids inside the vocabulary: the engine refuses
        others at admission). A map's device tensors are made once (``_bias_tensors``), so a
        step costs a few operations per biased row, not per entry."""
        idx = [i for i, r in enumerate(rows) if r.params.logit_bias]
        if not idx:
            return
        pairs = [self._bias_tensors(rows[i].params.logit_bias) for i in idx]
        counts = torch.tensor([len(rows[i].params.logit_bias) for i in idx])
        # On the host: on the device, repeat_interleave would wait for it to learn the size.
        r = self._upload(torch.repeat_interleave(torch.tensor(idx, dtype=torch.long), counts))
        c = torch.cat([ids for ids, _ in pairs])
        logits[r, c] += torch.cat([bias for _, bias in pairs]).to(logits.dtype)

    _BIAS_CACHE_SIZE = 1024

    def _bias_tensors(self, logit_bias: tuple[tuple[int, float], ...]):
        """(token ids, biases) of one ``logit_bias`` on the device, cached by the tuple's
        identity (a sequence's params keep theirs for its lifetime; the cache holds the tuple, so
        its id is never reused while cached)."""
        cache = self._bias_cache
        hit = cache.get(id(logit_bias))
        if hit is not None and hit[0] is logit_bias:
            return hit[1]
        if len(cache) >= self._BIAS_CACHE_SIZE:
            cache.clear()
        ids = self._upload(torch.tensor([t for t, _ in logit_bias], dtype=torch.long))
        bias = self._upload(torch.tensor([b for _, b in logit_bias], dtype=torch.float32))
        cache[id(logit_bias)] = (logit_bias, (ids, bias))
        return ids, bias

    def _mask_disallowed(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """-inf for the tokens a row's grammar does not allow: its packed mask, unpacked on the
        device (one upload for every constrained row)."""
        idx = [i for i, r in enumerate(rows) if r.allowed_tokens is not None]
        if not idx:
            return
        packed = self._upload(torch.stack([rows[i].allowed_tokens for i in idx]))
        shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
        bits = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(len(idx), -1).bool()
        vocab = logits.shape[1]
        if bits.shape[1] < vocab:  # tokens beyond the grammar's vocabulary are never allowed
            bits = torch.cat([bits, bits.new_zeros(len(idx), vocab - bits.shape[1])], dim=1)
        rows_t = self._upload(torch.tensor(idx, dtype=torch.long))
        logits[rows_t] = logits[rows_t].masked_fill(~bits[:, :vocab], float("-inf"))

    def _mask_until_min_tokens(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        idx = [
            (i, t)
            for i, r in enumerate(rows)
            for t in r.stop_ids_for_min_tokens
            if t < logits.shape[1]
        ]
        if idx:
            r, c = self._upload(torch.tensor(idx, dtype=torch.long)).unbind(1)
            # The value as a device tensor: a Python float would be copied from pageable memory.
            logits[r, c] = logits.new_full((), float("-inf"))

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        vocab = logits.shape[1]
        out_counts = self._token_counts([r.output_token_ids for r in rows], vocab)
        prompt_seen = self._token_counts([r.prompt_token_ids for r in rows], vocab) > 0
        rep = self._column([r.params.repetition_penalty for r in rows])
        seen = prompt_seen | (out_counts > 0)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        freq = self._column([r.params.frequency_penalty for r in rows])
        presence = self._column([r.params.presence_penalty for r in rows])
        return logits - freq * out_counts - presence * (out_counts > 0).float()

    def _token_counts(self, seqs: list[list[int]], vocab: int) -> torch.Tensor:
        width = max((len(s) for s in seqs), default=0)
        counts = torch.zeros((len(seqs), vocab + 1), device=self.device)
        if width:
            padded = torch.full((len(seqs), width), vocab, dtype=torch.long)
            for i, s in enumerate(seqs):
                padded[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            padded = padded.to(self.device)
            counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
        return counts[:, :vocab]

    def _column(self, values: list[float]) -> torch.Tensor:
        return self._upload(torch.tensor(values, dtype=torch.float32))[:, None]

    def _greedy_mask(self, rows: list[SamplingRow]) -> torch.Tensor:
        return self._upload(torch.tensor([r.params.is_greedy for r in rows]))

    def _upload(self, values: torch.Tensor) -> torch.Tensor:
        return upload(values, self.device)

    def _random(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        temps = self._column([1.0 if r.params.is_greedy else r.params.temperature for r in rows])
        logits = logits / temps
        if any(r.params.min_p > 0 for r in rows):
            probs = logits.softmax(dim=-1)
            min_p = self._column([r.params.min_p for r in rows])
            logits = logits.masked_fill(
                probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf")
            )
        if any(r.params.top_k is not None or r.params.top_p < 1.0 for r in rows):
            logits = self._top_k_top_p(logits, rows)
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self._generator)
        for i, r in enumerate(rows):
            if r.generator is not None:
                race[i].exponential_(generator=r.generator)
        return (probs / race).argmax(dim=-1)

    def _top_k_top_p(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        vocab = logits.shape[1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        top_k = self._upload(torch.tensor([min(r.params.top_k or vocab, vocab) for r in rows]))
        ranks = torch.arange(vocab, device=self.device)[None, :]
        drop = ranks >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        top_p = self._column([r.params.top_p for r in rows])
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)

    # ---- logprobs ---------------------------------------------------------------------------

    def _logprobs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor | None:
        if all(r.params.logprobs is None for r in rows):
            return None
        return logits.log_softmax(dim=-1)

    def _gather_logprobs(self, logprobs, tokens, rows):
        if logprobs is None:
            return [None] * len(rows)
        n = max(r.params.logprobs or 0 for r in rows)
        chosen = logprobs.gather(1, tokens[:, None])
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        top_lp, top_ids = (
            logprobs.topk(n, dim=-1) if n else (logprobs[:, :0], tokens[:, None][:, :0])
        )
        chosen, ranks = chosen[:, 0].tolist(), ranks.tolist()
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        out = []
        for i, r in enumerate(rows):
            k = r.params.logprobs
            if k is None:
                out.append(None)
            else:
                out.append(
                    (chosen[i], ranks[i], list(zip(top_ids[i][:k], top_lp[i][:k], strict=True)))
                )
        return out
