"""LLMEngine: the step-level API that the offline LLM and every service drive.

``add_request`` validates and queues; each ``step`` schedules a batch, runs one forward,
appends the sampled tokens, applies stop rules and returns the outputs that are due.
Single-threaded by design: a service calls it from one engine loop.
"""

import itertools
import logging
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig, ResolvedLimits, SchedulerConfig
from tandem.engine.output_processor import OutputProcessor, RequestState
from tandem.engine.outputs import OutputKind, RequestMetrics, RequestOutput, TokenLogprob
from tandem.engine.runner import ModelRunner
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence, SequenceStatus
from tandem.errors import InvalidRequest, ModelLoadError, RequestTooLarge
from tandem.ids import RequestId
from tandem.kv.events import KVEvent
from tandem.kv.fingerprint import ModelFingerprint
from tandem.kv.hashing import BlockHasher
from tandem.model_dir import load_model_config, weights_digest
from tandem.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_cached_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


class LLMEngine:
    def __init__(self, config: EngineConfig, *, enable_kv_events: bool = False) -> None:
        self.config = config
        self.model_config = load_model_config(config.model)
        self.tokenizer = Tokenizer(config.model)
        eos = self.model_config.eos_token_ids
        if not eos and self.tokenizer.eos_token_id is not None:
            eos = (self.tokenizer.eos_token_id,)
        self.eos_token_ids: tuple[int, ...] = eos
        self.runner = ModelRunner(config, self.model_config, eos)
        self.limits = self._resolve_limits()
        self.runner.allocate_kv_cache(self.limits.num_kv_blocks)
        mc = self.model_config
        self.fingerprint = ModelFingerprint(
            architecture=mc.architecture,
            weights_digest=weights_digest(config.model),
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            dtype=str(self.runner.dtype).removeprefix("torch."),
            block_size=config.block_size,
        )
        self.block_manager = BlockManager(
            self.limits.num_kv_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_kv_events=enable_kv_events,
        )
        self.hasher = BlockHasher(self.fingerprint.digest(), config.block_size)
        self.scheduler = Scheduler(self._scheduler_config(), self.block_manager, self.hasher, eos)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._states: dict[RequestId, RequestState] = {}
        self._arrivals = itertools.count()
        logger.info(
            "engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
            mc.architecture, config.device, self.fingerprint.dtype, self.limits.num_kv_blocks,
            config.block_size, self.limits.max_model_len,
        )

    def _resolve_limits(self) -> ResolvedLimits:
        model_max = self.model_config.max_position_embeddings
        max_len = self.config.max_model_len or model_max
        if max_len > model_max:
            raise ModelLoadError(
                f"max_model_len {max_len} exceeds the model's max_position_embeddings {model_max}"
            )
        return ResolvedLimits(num_kv_blocks=self.runner.num_kv_blocks_for(max_len), max_model_len=max_len)

    def _scheduler_config(self) -> SchedulerConfig:
        c = self.config
        return SchedulerConfig(
            max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=self.limits.max_model_len,
            enable_prefix_caching=c.enable_prefix_caching,
            scheduling_policy=c.scheduling_policy,
            step_policy=c.step_policy,
            block_size=c.block_size,
            num_kv_blocks=self.limits.num_kv_blocks,
        )

    # ---- requests ---------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | SequenceABC[int]) -> list[int]:
        """Token ids of a text or token-id prompt, validated (non-empty, ids inside the vocab)."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, SequenceABC) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        else:
            raise InvalidRequest("prompt must be a string or a list of token ids", param="prompt")
        if not ids:
            raise InvalidRequest("prompt is empty", param="prompt")
        return ids

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Refuse a request that this engine could never complete.

        Raises:
            RequestTooLarge: prompt or prompt + max_tokens beyond the context or the KV pool.
        """
        max_len = self.limits.max_model_len
        if num_prompt_tokens >= max_len:
            raise RequestTooLarge(
                f"the prompt has {num_prompt_tokens} tokens but this model's context length is {max_len}",
                param="prompt",
            )
        total = num_prompt_tokens + params.max_tokens
        if total > max_len:
            raise RequestTooLarge(
                f"this model's maximum context length is {max_len} tokens, but {total} were requested "
                f"({num_prompt_tokens} in the prompt, {params.max_tokens} for max_tokens)",
                param="max_tokens",
            )
        # The last generated token is never written to the cache.
        needed = self.block_manager.blocks_needed(total - 1)
        if needed > self.limits.num_kv_blocks:
            raise RequestTooLarge(
                f"the request needs {needed} KV blocks but the pool holds {self.limits.num_kv_blocks}",
                param="max_tokens",
            )

    def add_request(
        self,
        request_id: str,
        prompt: str | SequenceABC[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        output_kind: OutputKind = OutputKind.DELTA,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue a request. Nothing is held if it raises.

        Raises:
            InvalidRequest: bad prompt, parameters or duplicate id (``RequestTooLarge`` if it can
                never fit).
        """
        if request_id in self._states:
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        if not isinstance(params, SamplingParams):
            raise InvalidRequest("sampling params must be a SamplingParams", param="sampling_params")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequest("priority must be an integer", param="priority")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequest("cache_salt must be a non-empty string", param="cache_salt")
        ids = self.tokenize_prompt(prompt)
        self.check_fits(len(ids), params)
        now = time.monotonic() if arrival_time is None else arrival_time
        seq = Sequence(
            RequestId(request_id),
            ids,
            params,
            arrival_time=now,
            arrival_index=next(self._arrivals),
            priority=priority,
            cache_salt=cache_salt,
        )
        text = prompt if isinstance(prompt, str) else None
        self._states[seq.request_id] = self.output_processor.new_state(
            seq, output_kind, text, RequestMetrics(arrival_time=now)
        )
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; returns its final output."""
        state = self._states.pop(RequestId(request_id), None)
        if state is None:
            return None
        self.scheduler.finish(state.seq, SequenceStatus.FINISHED_ABORTED)
        self.runner.release(state.seq.request_id)
        return self.output_processor.make_output(state)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- one step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and forward; return the outputs that are due."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = time.monotonic()
        for s in sched.scheduled:
            metrics = self._states[s.seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        sampled, result = self.runner.execute(sched.scheduled)
        tokens: dict[RequestId, int] = {}
        logprobs: dict[RequestId, TokenLogprob] = {}
        if result is not None:
            for i, s in enumerate(sampled):
                rid = s.seq.request_id
                tokens[rid] = result.token_ids[i]
                lp = result.logprobs[i]
                if lp is not None:
                    logprobs[rid] = TokenLogprob(result.token_ids[i], lp[0], lp[1], tuple(lp[2]))
        progressed = self.scheduler.update(sched, tokens)
        outputs = []
        for seq in progressed:
            state = self._states[seq.request_id]
            stop = self.output_processor.on_new_token(state, logprobs.get(seq.request_id))
            if stop is not None:
                if seq.is_finished:
                    seq.status = stop  # a stop string outranks a simultaneous length stop
                else:
                    self.scheduler.finish(seq, stop)
            out = self.output_processor.make_output(state)
            if out is not None:
                outputs.append(out)
            if seq.is_finished:
                del self._states[seq.request_id]
                self.runner.release(seq.request_id)
        return outputs

    # ---- introspection ----------------------------------------------------------------------

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_total_blocks,
            num_cached_blocks=bm.num_cached_blocks,
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.stats.queries,
            prefix_cache_hits=bm.stats.hits,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def take_kv_events(self) -> list[KVEvent]:
        return self.block_manager.take_events()

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()
