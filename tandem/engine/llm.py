"""The offline API, in vLLM's shape: ``LLM(model, **config).generate(prompts, params)``."""

import itertools
import weakref
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any

from tandem.api.errors import InvalidRequest
from tandem.api.outputs import OutputKind, RequestOutput
from tandem.api.sampling_params import SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.model_dir import generation_defaults

Prompt = str | list[int]


class LLM:
    """Batch generation with one engine in this process.

    Keyword arguments are ``EngineConfig`` fields (device, dtype, block_size, num_kv_blocks,
    max_num_seqs, max_num_batched_tokens, enable_prefix_caching, scheduling_policy,
    step_policy, ...); an unknown or invalid one raises ``pydantic.ValidationError``.
    """

    def __init__(self, model: str | Path, **config: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=str(model), **config))
        # An LLM dropped without close() still stops its ranks (when collected, or at exit).
        self._finalizer = weakref.finalize(self, self.engine.close)
        self._ids = itertools.count()
        self._default_sampling = SamplingParams(**generation_defaults(model))

    def close(self) -> None:
        """Release the engine's other processes (the ranks of ``tensor_parallel_size`` > 1);
        also on leaving a ``with`` block. Nothing to do for one rank."""
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | SequenceABC[Prompt],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        priorities: SequenceABC[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        Raises:
            InvalidRequest: any prompt or parameter is invalid; then nothing was generated.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        prompts = list(prompts)
        params = self._per_prompt(
            sampling_params or self.get_default_sampling_params(), len(prompts), "sampling_params"
        )
        prios = (
            self._per_prompt(0, len(prompts), "priorities")
            if priorities is None
            else list(priorities)
        )
        if len(prios) != len(prompts):
            raise InvalidRequest("priorities must have one entry per prompt", param="priorities")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p, prio in zip(ids, prompts, params, prios, strict=True):
                self.engine.add_request(
                    rid, prompt, p, priority=prio, output_kind=OutputKind.FINAL_ONLY
                )
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses without sampling params: the model's recommended sampling from
        generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty), as vLLM's
        ``LLM`` does, else ``SamplingParams()``."""
        return self._default_sampling

    def chat(
        self,
        conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to conversations rendered with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]
        return self.generate(prompts, sampling_params)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            # Interrupted (KeyboardInterrupt, a failed step): leave nothing behind in the engine.
            for rid in ids:
                if rid not in done:
                    self.engine.abort_request(rid)
            raise
        while self.engine.has_unfinished_requests() and not self.engine.request_ids():
            self.engine.step()  # a step launched ahead for sequences that ended meanwhile
        return [done[rid] for rid in ids]

    @staticmethod
    def _per_prompt(value, n: int, name: str) -> list:
        if isinstance(value, SequenceABC) and not isinstance(value, (str, SamplingParams)):
            if len(value) != n:
                raise InvalidRequest(f"{name} must have one entry per prompt", param=name)
            return list(value)
        return [value] * n
