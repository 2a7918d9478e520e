"""LLMEngine: the step-level API that the offline LLM and every service drive.

``add_request`` validates and queues; each ``step`` schedules a batch, runs one forward,
appends the sampled tokens, applies stop rules and returns the outputs that are due.
Single-threaded by design: a service calls it from one engine loop.
"""

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

import torch

from tandem.api.errors import CapacityExceeded, InvalidRequest, ModelLoadError, TandemError
from tandem.api.fingerprint import ModelFingerprint
from tandem.api.hashing import BlockHasher
from tandem.api.ids import BlockId, RequestId
from tandem.api.kv_events import KVEvent
from tandem.api.outputs import OutputKind, RequestMetrics, RequestOutput, TokenLogprob
from tandem.api.requests import check_num_output_tokens
from tandem.api.sampling_params import SamplingParams
from tandem.api.stats import EngineStats
from tandem.api.step_outputs import StepOutputs
from tandem.engine import prompt_logprobs
from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig, ResolvedLimits, SchedulerConfig
from tandem.engine.models.loader import DUMMY_SEED
from tandem.engine.output_processor import OutputProcessor, RequestState
from tandem.engine.parallel import shard_for_config
from tandem.engine.parallel_sampling import ParentRequest, is_parallel
from tandem.engine.request_validation import RequestValidator
from tandem.engine.runner import LaunchedStep, ModelRunner
from tandem.engine.scheduler import Scheduler, SchedulerOutput
from tandem.engine.sequence import Sequence, SequenceStatus
from tandem.engine.structured_output import StructuredOutputManager
from tandem.engine.token_outputs import TokenOutputProcessor
from tandem.engine.tp_ranks import FollowerRanks, cpu_threads_per_rank, resolve_devices
from tandem.engine.uploads import upload
from tandem.model_dir import config_digest, load_model_config, weights_digest
from tandem.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Reservation:
    """Blocks a decode engine holds for a prompt whose KV a prefill pod will push."""

    request_id: RequestId
    block_ids: tuple[BlockId, ...]
    num_cached_tokens: int
    """Leading prompt tokens already in this engine's prefix cache (their blocks need no push)."""


class EngineStepError(TandemError):
    """The forward of a step failed; the requests of that step were aborted."""

    def __init__(self, message: str, request_ids: list[str]) -> None:
        super().__init__(message)
        self.request_ids = request_ids


class LLMEngine:
    """One model instance: validates requests, schedules steps, runs them, emits outputs.

    Single-threaded: drive it from one thread (the offline ``LLM``, or a pod's engine core process).
    """

    def __init__(
        self, config: EngineConfig, *, enable_kv_events: bool = False, detokenize: bool = True
    ) -> None:
        """
        Args:
            enable_kv_events: record prefix-cache events (``take_kv_events``).
            detokenize: build ``RequestOutput``s with text and stop strings (``step`` returns
                them). False in an engine core process: ``step`` returns nothing and each step's
                new tokens are taken as columns with ``take_step_outputs``; the pod's front
                process detokenizes them.
        """
        config = config.with_batch_defaults()
        self.config = config
        self.model_config = load_model_config(config.model)
        self.tokenizer = Tokenizer(config.model)
        eos = self.model_config.eos_token_ids
        if not eos and self.tokenizer.eos_token_id is not None:
            eos = (self.tokenizer.eos_token_id,)
        self.eos_token_ids: tuple[int, ...] = eos
        max_model_len = self._max_model_len()
        self.structured_output = StructuredOutputManager(
            self.tokenizer, self.model_config.vocab_size, eos
        )
        """Grammar matchers of the requests with ``structured_outputs``."""
        self._followers = None
        """The other ranks of a tensor-parallel engine (``tp_ranks.FollowerRanks``)."""
        self._threads_before: int | None = None
        """Torch's thread count before a CPU tensor-parallel engine shared the cores out."""
        self.runner = self._build_runner(config, eos, max_model_len)
        # A request's last token is never written to the cache: a pool of N tokens holds a context
        # of N + 1.
        pool_context = self.runner.kv_cache.num_blocks * config.block_size + 1
        if pool_context < max_model_len:
            # A request as long as the context could never fit: serve what the pool can hold.
            logger.warning(
                "the KV pool holds %d tokens, less than max_model_len %d: "
                "serving contexts up to %d tokens",
                pool_context - 1,
                max_model_len,
                pool_context,
            )
            max_model_len = pool_context
        self.limits = ResolvedLimits(
            num_kv_blocks=self.runner.kv_cache.num_blocks, max_model_len=max_model_len
        )
        mc = self.model_config
        self.fingerprint = ModelFingerprint(
            architecture=mc.architecture,
            # Dummy weights are drawn from a fixed seed (models/loader.py): engines on the same kind
            # of device hold the same ones, so a benchmark's prefill and decode pods can share KV.
            weights_digest=(
                weights_digest(config.model)
                if config.load_format != "dummy"
                else f"dummy-seed{DUMMY_SEED}-{self.runner.device.type}-"
                f"{config_digest(config.model)}"
            ),
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
        self.validator = RequestValidator(
            self.tokenizer, mc.vocab_size, self.limits, config.block_size
        )
        self.output_processor = (
            OutputProcessor(self.tokenizer) if detokenize else TokenOutputProcessor()
        )
        self._states: dict[RequestId, RequestState] = {}
        """By sequence id: a request's, or each sample's of a parallel-sampling request."""
        self._parents: dict[RequestId, ParentRequest] = {}
        """Requests with n or best_of above 1, by request id (``parallel_sampling``)."""
        self._samples: dict[RequestId, tuple[ParentRequest, int]] = {}
        """Each live sample's request and index."""
        self._held_samples: dict[RequestId, list[Sequence]] = {}
        """By lead sample id: the samples queued once the lead's prompt is computed."""
        self._arrivals = itertools.count()
        self._unemitted: list[tuple[Sequence, TokenLogprob | None]] = []
        """Sequences that received a token in the last step, whose outputs are not built yet."""
        self._ready: list[RequestOutput] = []
        self._awaiting_grammar: list[Sequence] = []
        """New sequences held out of the scheduler while their grammar compiles."""
        self._grammar_failures: dict[RequestId, str] = {}
        """Sequences whose grammar rejected a token in the last step: ``step`` fails them."""
        """Outputs built during a step that then failed: the next ``step`` returns them."""
        self._inflight: tuple[SchedulerOutput, LaunchedStep] | None = None
        """A step launched ahead by ``step`` (async scheduling), whose tokens are not read yet."""
        self.last_step_num_tokens = 0
        """Tokens the latest step computed (0: nothing was schedulable)."""
        self.num_prompt_tokens = 0
        """Cumulative: prompt tokens of requests whose prefill completed here."""
        self.num_generation_tokens = 0
        """Cumulative: tokens sampled here."""
        logger.info(
            "engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
            mc.architecture,
            config.device,
            self.fingerprint.dtype,
            self.limits.num_kv_blocks,
            config.block_size,
            self.limits.max_model_len,
        )

    def _build_runner(
        self, config: EngineConfig, eos: tuple[int, ...], max_model_len: int
    ) -> ModelRunner:
        """This process's runner; under tensor parallelism rank 0's, with the other ranks
        started beside it (their shapes are checked first, so that a model that does not
        split fails here, before any process starts)."""
        tp = config.tensor_parallel_size

        def runner(config: EngineConfig, group=None) -> ModelRunner:
            return ModelRunner(
                config,
                self.model_config,
                eos,
                max_model_len,
                structured_output=self.structured_output,
                tp=group,
            )

        if tp == 1:
            return runner(config)
        for rank in range(tp):
            shard_for_config(self.model_config, tp, rank)
        config = config.model_copy(update={"device": resolve_devices(config.device, tp)})
        if torch.device(config.device).type == "cpu":
            # The ranks share this host's cores (restored by ``close``).
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(cpu_threads_per_rank(tp))
        followers, group = FollowerRanks.start(config, eos, max_model_len)
        try:
            rank0 = runner(config, group)
            followers.wait_ready(rank0.kv_cache.num_blocks)
        except BaseException as exc:
            failure = followers.failure()
            followers.close()
            group.destroy()
            self._restore_threads()
            if failure is not None and not isinstance(exc, TandemError):
                raise ModelLoadError(failure) from exc
            raise
        rank0.attach_followers(followers)
        self._followers = followers
        return rank0

    def rank_filenos(self) -> list[int]:
        """File descriptors that turn readable when another tensor-parallel rank fails (none for
        one rank): a serving loop polls them and stops, since the group cannot step without
        it."""
        return self._followers.filenos() if self._followers is not None else []

    def rank_kv_pools(self) -> list[bytes]:
        """Ranks 1..N-1's KV pools, shared over CUDA IPC (``EngineConfig.share_rank_pools``):
        ``pickle.loads`` maps one; [] for one rank, on CPU, or when not shared."""
        return self._followers.shared_pools() if self._followers is not None else []

    def rank_failure(self) -> str | None:
        """What a failed tensor-parallel rank reported, if one did."""
        return self._followers.failure() if self._followers is not None else None

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel engine and leave its group (nothing to do
        for one rank). The engine is unusable afterwards."""
        if self._followers is not None:
            followers, self._followers = self._followers, None
            followers.close()
            self.runner.tp.destroy()
            self._restore_threads()

    def _restore_threads(self) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def _max_model_len(self) -> int:
        model_max = self.model_config.max_position_embeddings
        max_len = self.config.max_model_len or model_max
        if max_len > model_max:
            raise ModelLoadError(
                f"max_model_len {max_len} exceeds the model's max_position_embeddings {model_max}"
            )
        return max_len

    def _scheduler_config(self) -> SchedulerConfig:
        c = self.config
        return SchedulerConfig(
            max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=self.limits.max_model_len,
            enable_prefix_caching=c.enable_prefix_caching,
            scheduling_policy=c.scheduling_policy,
            step_policy=c.step_policy,
        )

    # ---- requests ---------------------------------------------------------------------------

    def _new_sequence(
        self,
        request_id: str,
        prompt: str | SequenceABC[int],
        params: SamplingParams,
        priority: int,
        cache_salt: str | None,
        arrival_time: float | None,
        num_output_tokens: int = 0,
    ) -> Sequence:
        if request_id in self._states or request_id in self._parents:
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        self.validator.check_fields(params, priority, cache_salt)
        ids = self.validator.prompt_ids(prompt)
        num_prompt = len(ids) - check_num_output_tokens(
            num_output_tokens, len(ids), params.max_tokens
        )
        self.validator.check_fits(num_prompt, params)
        return Sequence(
            RequestId(request_id),
            ids[:num_prompt],
            params,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            arrival_index=next(self._arrivals),
            priority=priority,
            cache_salt=cache_salt,
            output_token_ids=ids[num_prompt:],
        )

    def _track(
        self, seq: Sequence, prompt: str | SequenceABC[int], output_kind: OutputKind
    ) -> None:
        text = prompt if isinstance(prompt, str) else None
        self._states[seq.request_id] = self.output_processor.new_state(
            seq, output_kind, text, RequestMetrics(arrival_time=seq.arrival_time)
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
        num_output_tokens: int = 0,
    ) -> None:
        """Validate and queue a request. Nothing is held if it raises.

        Args:
            num_output_tokens: the last this many tokens of ``prompt`` are output the request
                generated already on another engine (a migrated request): they count toward
                ``max_tokens`` and ``min_tokens`` and in penalties, a seeded generator continues
                after them, and outputs carry only the tokens generated here.

        Raises:
            InvalidRequest: bad prompt, parameters or duplicate id (``RequestTooLarge`` if it can
                never fit).

        A request with ``n`` or ``best_of`` above 1 runs as that many samples sharing the
        prompt's blocks (``parallel_sampling``); its outputs carry each sample's ``index``.
        """
        if is_parallel(params):
            parent, seqs = self._new_family(
                request_id, prompt, params, priority, cache_salt, arrival_time, num_output_tokens
            )
            self._track_family(parent, seqs, prompt, output_kind)
            self._queue(seqs[0])
            return
        seq = self._new_sequence(
            request_id, prompt, params, priority, cache_salt, arrival_time, num_output_tokens
        )
        self._track(seq, prompt, output_kind)
        self._queue(seq)
        self.runner.skip_sampling_draws(seq, seq.num_output_tokens)

    def _queue(self, seq: Sequence) -> None:
        """Hand a new sequence to the scheduler, or, while its grammar compiles on a compile
        thread, hold it (``_admit_compiled`` queues it when the compile is done)."""
        so = seq.sampling_params.structured_outputs
        if so is not None and self.structured_output.prepare(so) is not None:
            self._awaiting_grammar.append(seq)
        else:
            self.scheduler.add(seq)

    def _admit_compiled(self) -> EngineStepError | None:
        """Queue the held sequences whose grammar compiled; fail those whose compile failed
        (the error names them, as a rejected token's does). An engine with nothing else to run
        waits briefly for a compile instead of spinning."""
        held, self._awaiting_grammar = self._awaiting_grammar, []
        grammars = self.structured_output
        for seq in held:
            if seq.is_finished:  # aborted while its grammar compiled
                continue
            try:
                ready = grammars.compiled(seq.sampling_params.structured_outputs)
            except InvalidRequest as exc:
                self._grammar_failures[seq.request_id] = str(exc)
                continue
            if ready:
                self.scheduler.add(seq)
            else:
                self._awaiting_grammar.append(seq)
        grammars.forget_failed()
        idle = not (self.scheduler.has_unfinished or self._inflight or self._unemitted)
        if self._awaiting_grammar and idle:
            grammars.wait_for_compile(0.01)
        return self._fail_grammar_errors() if self._grammar_failures else None

    def _new_family(
        self,
        request_id: str,
        prompt: str | SequenceABC[int],
        params: SamplingParams,
        priority: int,
        cache_salt: str | None,
        arrival_time: float | None,
        num_output_tokens: int,
    ) -> tuple[ParentRequest, list[Sequence]]:
        """A parallel-sampling request's samples, validated (not tracked yet); the lead first."""
        if num_output_tokens:
            raise InvalidRequest(
                "a request with n or best_of above 1 cannot continue output generated elsewhere "
                "(such requests are not migrated)",
                param="num_output_tokens",
            )
        if request_id in self._states or request_id in self._parents:
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        parent = ParentRequest(request_id, params, OutputKind.DELTA)
        seqs: list[Sequence] = []
        for i, sid in enumerate(parent.sample_ids):
            source = prompt if i == 0 else seqs[0].prompt_token_ids  # tokenized once
            seqs.append(
                self._new_sequence(
                    sid, source, parent.sample_params(i), priority, cache_salt, arrival_time
                )
            )
        return parent, seqs

    def _track_family(
        self,
        parent: ParentRequest,
        seqs: list[Sequence],
        prompt: str | SequenceABC[int],
        output_kind: OutputKind,
    ) -> None:
        """Track every sample; all but the lead are held until its prompt is computed."""
        parent.kind = output_kind
        self._parents[RequestId(parent.request_id)] = parent
        for i, seq in enumerate(seqs):
            self._track(seq, prompt, parent.sample_kind())
            self._samples[seq.request_id] = (parent, i)
        self._held_samples[seqs[0].request_id] = seqs[1:]

    def _release_samples(self, lead: Sequence) -> None:
        """The lead's prompt is computed: queue the samples held behind it, each holding the
        lead's prompt blocks by reference (``BlockManager.fork``; the partial last block is
        copied on its first write) and computing only the prompt's last token, for its own
        first token. A lead that holds no blocks any more (its first token ended it) leaves
        them the prefix cache: its full blocks hit, the rest is recomputed."""
        samples = self._held_samples.pop(lead.request_id, ())
        bm = self.block_manager
        shared = bm.holds(lead.request_id) and lead.num_computed_tokens >= lead.num_prompt_tokens
        for seq in samples:
            if seq.is_finished:
                continue
            if shared:
                n = seq.num_prompt_tokens
                bm.fork(lead.request_id, seq.request_id, n, record_stats=True)
                seq.num_computed_tokens = seq.num_cached_tokens = n - 1
            self.scheduler.add(seq)

    def has_room_for(self, num_prompt_tokens: int) -> bool:
        """Whether a prompt's blocks fit now, leaving one block per growing sequence.

        The admission rule of decode pods, for colocated requests too: a pod that cannot take
        the prompt now says so, and the router tries another, instead of queueing it here.
        """
        need = self.block_manager.blocks_needed(num_prompt_tokens)
        return self.block_manager.num_free_blocks - need >= self.scheduler.num_growing

    def reserve_remote_prefill(
        self,
        request_id: str,
        prompt_token_ids: SequenceABC[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        output_kind: OutputKind = OutputKind.DELTA,
        num_output_tokens: int = 0,
    ) -> Reservation:
        """Admit a request whose prompt KV another engine computes: hold its blocks now.

        Admission control for decode pods: the reservation either fits now, leaving one free
        block per running sequence so they can keep growing, or is refused. The blocks cover
        every token of ``prompt_token_ids``, ``num_output_tokens`` (as ``add_request``) included.

        Raises:
            InvalidRequest: as ``add_request``.
            CapacityExceeded: not enough free KV blocks now (retry later or elsewhere).
        """
        family = None
        if is_parallel(params):  # the blocks are the lead's; the other samples run here after
            family = self._new_family(
                request_id, prompt_token_ids, params, priority, cache_salt, None, num_output_tokens
            )
            seq = family[1][0]
        else:
            seq = self._new_sequence(
                request_id, prompt_token_ids, params, priority, cache_salt, None, num_output_tokens
            )
        if not self.scheduler.reserve(seq, keep_free=self.scheduler.reservation_headroom):
            need = self.block_manager.blocks_needed(seq.num_tokens)
            raise CapacityExceeded(
                f"no room for a {seq.num_tokens}-token prompt ({need} KV blocks): "
                f"{self.block_manager.num_free_blocks} of "
                f"{self.block_manager.num_total_blocks} blocks free"
            )
        if params.structured_outputs is not None:  # compiles while the prefill pod runs
            self.structured_output.prepare(params.structured_outputs)
        if family is not None:
            self._track_family(*family, prompt_token_ids, output_kind)
        else:
            self._track(seq, prompt_token_ids, output_kind)
        block_ids = tuple(self.block_manager.block_ids(seq.request_id).tolist())
        return Reservation(RequestId(request_id), block_ids, seq.num_computed_tokens)

    def complete_remote_prefill(
        self,
        request_id: str,
        first_token_id: int,
        *,
        logprob: TokenLogprob | None = None,
        num_cached_tokens: int = 0,
        prompt_logprobs: list[TokenLogprob] | None = None,
    ) -> list[RequestOutput]:
        """The reserved blocks now hold the prompt's KV and its first token was sampled remotely.

        The sequence joins the decode batch (or finishes, if the first token ends it). Returns
        the output for the first token, which carries ``prompt_logprobs`` (the prefill pod
        computed them) if the request asked for them. A parallel-sampling request's first token
        is its lead sample's; the other samples are queued behind it now.
        """
        state = self._states.get(self._lead_id(request_id))
        if state is None or state.seq.status != SequenceStatus.WAITING_FOR_KV:
            raise InvalidRequest(
                f"request {request_id!r} is not waiting for KV", param="request_id"
            )
        seq = state.seq
        if not 0 <= first_token_id < self.model_config.vocab_size:
            raise InvalidRequest(
                f"first token id {first_token_id} is outside the vocabulary", param="first_token_id"
            )
        seq.num_cached_tokens = num_cached_tokens
        if seq.prompt_logprobs is not None:
            seq.prompt_logprobs = list(prompt_logprobs or ())
        state.metrics.first_scheduled_time = time.monotonic()
        self.scheduler.complete_remote_prefill(seq, first_token_id)
        # Every output token so far was drawn elsewhere (a migrated request's too).
        self.runner.skip_sampling_draws(seq, seq.num_output_tokens)
        self._advance_grammar(seq)  # the prefill pod's token continues the grammar here
        if seq.request_id in self._grammar_failures:  # the request is aborted, nothing held
            raise InvalidRequest(str(self._fail_grammar_errors()), param="structured_outputs")
        self._release_samples(seq)
        out = self._emit(seq, logprob)
        return [out] if out is not None else []

    def _lead_id(self, request_id: str) -> RequestId:
        """The id of the sequence that runs a request's prompt: its own, or its lead sample's."""
        parent = self._parents.get(RequestId(request_id))
        return RequestId(parent.sample_ids[0] if parent is not None else request_id)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; returns its final output.

        A parallel-sampling request's id stops every sample (its final output carries each
        one's end); a sample's id stops that sample only (a pod's front found its stop string).
        """
        parent = self._parents.get(RequestId(request_id))
        if parent is not None:
            # The lead last: samples still held behind it end with it, outputs unseen.
            ids = reversed(parent.sample_ids)
            outs = [o for sid in ids if (o := self.abort_request(sid)) is not None]
            if not outs:
                return None
            # Streams get each sample's end; the ranked or final-only output comes last, alone.
            comps = sorted((c for o in outs for c in o.outputs), key=lambda c: c.index)
            return dataclasses.replace(outs[-1], outputs=comps)
        state = self._states.pop(RequestId(request_id), None)
        if state is None:
            return None
        pending = [(seq, lp) for seq, lp in self._unemitted if seq is state.seq]
        if pending:  # its newest token's text (async outputs) belongs in this final output
            self._unemitted = [(seq, lp) for seq, lp in self._unemitted if seq is not state.seq]
            for _, logprob in pending:
                self._apply_stop(state.seq, self.output_processor.on_new_token(state, logprob))
        self.scheduler.finish(
            state.seq, SequenceStatus.FINISHED_ABORTED
        )  # no-op if that stop ended it
        self.runner.release(state.seq.request_id)
        return self._sample_output(state.seq, self.output_processor.make_output(state))

    def _sample_output(self, seq: Sequence, out: RequestOutput | None) -> RequestOutput | None:
        """``out`` of ``seq``, or, for a sample, its request's output (``ParentRequest``); a
        finished sample leaves the bookkeeping, and the request with its last sample."""
        family = self._samples.get(seq.request_id)
        if family is None:
            return out
        parent, index = family
        if seq.is_finished:
            del self._samples[seq.request_id]
            for held in self._held_samples.pop(seq.request_id, ()):
                # The lead ended before its prompt was computed (it failed): so do the others.
                self.abort_request(held.request_id)
            if not any(sid in self._samples for sid in parent.sample_ids):
                del self._parents[RequestId(parent.request_id)]
        return parent.on_output(index, out) if out is not None else None

    def is_waiting_for_kv(self, request_id: str) -> bool:
        """Whether the request holds reserved blocks that a prefill pod is filling."""
        state = self._states.get(self._lead_id(request_id))
        return state is not None and state.seq.status == SequenceStatus.WAITING_FOR_KV

    def request_ids(self) -> list[str]:
        """Ids of every request the engine holds (queued, running or waiting for KV); a
        parallel-sampling request's own id, not its samples'."""
        return [rid for rid in self._states if rid not in self._samples] + list(self._parents)

    def has_unfinished_requests(self) -> bool:
        """Whether ``step`` has work: sequences to run or outputs still to return (requests
        waiting for remote KV need none)."""
        return (
            self.scheduler.has_unfinished
            or self._inflight is not None
            or bool(self._unemitted)
            or bool(self._ready)
            or bool(self._awaiting_grammar)
        )

    # ---- one step ---------------------------------------------------------------------------

    @property
    def async_output_processing(self) -> bool:
        """Whether a step's outputs are built during the next step's forward (``step``)."""
        return self._async_mode(self.config.async_output_processing)

    @property
    def async_scheduling(self) -> bool:
        """Whether a decode step is launched before the previous one's tokens are read
        (``step``)."""
        return self._async_mode(self.config.async_scheduling)

    def _async_mode(self, mode: str) -> bool:
        if mode == "auto":
            return self.runner.device.type == "cuda" and self.runner.kv_layer_hook is None
        return mode == "on"

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and forward; return the outputs that are due.

        Synchronously, a step returns its own tokens' outputs. With async output processing,
        the outputs of a step's tokens (detokenization, stop strings, RequestOutputs: host work
        that grows with the batch) are built while the GPU runs the next step, and returned by
        that next call; a call with nothing to schedule returns what is left.

        With async scheduling, a decode step that leaves nothing else to schedule launches the
        next one (same sequences, one position further, its input tokens taken on the device)
        before reading its own tokens, and returns with that next step in flight: the host's
        work for a step (reading tokens, the scheduler's update, outputs) overlaps the device's
        next step instead of leaving the GPU idle between steps. New requests end the run of
        such steps. Either way, a sequence that an EOS, stop token or stop string ends may have
        computed a token or two more, which are dropped (unseeded random rows therefore see
        other draws of the shared generator than in synchronous steps; seeded rows do not).

        Raises:
            EngineStepError: the forward failed; the step's requests were aborted (the engine
                stays usable for the others; outputs already built are returned by the next call).
        """
        outputs, self._ready = self._ready, []
        if self._awaiting_grammar:
            failed = self._admit_compiled()
            if failed is not None:
                self._ready = outputs  # returned by the next call
                raise failed
        current, self._inflight = self._inflight, None
        if current is None:
            sched = self.scheduler.schedule()
            self.last_step_num_tokens = sched.num_batched_tokens
            if sched.block_copies:  # copy-on-write of shared blocks, before any write into them
                try:
                    self.runner.copy_blocks(sched.block_copies)
                except Exception as exc:  # as a failed forward: the step's requests fail
                    raise self._step_failed(sched, outputs, exc, launched=False) from exc
            if sched.is_empty:
                return outputs + self._emit_unemitted()
            now = time.monotonic()
            for s in sched.scheduled:
                metrics = self._states[s.seq.request_id].metrics
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = now
            try:
                current = (sched, self.runner.launch(sched.scheduled))
            except Exception as exc:
                raise self._step_failed(sched, outputs, exc, launched=False) from exc
        else:
            self.last_step_num_tokens = current[0].num_batched_tokens
        sched, launched = current
        nxt = self._launch_next_decode(sched, launched) if self.async_scheduling else None
        overlap = nxt is not None or self.async_output_processing
        try:
            # The last step's outputs, if still due: host work while the device computes, and
            # always before this step's tokens are appended (an output is built from its token
            # being the sequence's newest).
            outputs += self._emit_unemitted()
            sampled, result = launched.result()
        except Exception as exc:
            raise self._step_failed(sched, outputs, exc, launched=True) from exc
        prompt_logprobs.apply(launched.prompt_logprobs)
        self._apply(sched, sampled, result)
        self._inflight = nxt
        failed = self._fail_grammar_errors() if self._grammar_failures else None
        if not overlap:
            outputs += self._emit_unemitted()
        if failed is not None:
            self._ready = outputs  # the others' outputs: returned by the next call
            raise failed
        return outputs

    def _launch_next_decode(self, sched: SchedulerOutput, launched: LaunchedStep):
        """Schedule and launch the decode step after ``sched`` before its tokens are read, if the
        batch allows it (``Scheduler.schedule_next_decode``); None otherwise."""
        if launched.tokens is None or len(launched.sampled) != len(sched.scheduled):
            return None  # tokens read on the host (logprobs), or not every sequence sampled
        try:
            plan = self.scheduler.schedule_next_decode(sched)
            if plan is None:
                return None
            nxt, rows = plan
            ids = launched.tokens
            if len(rows) != len(sched.scheduled):  # some sequences end with the pending token
                ids = ids[upload(torch.tensor(rows), ids.device)]
            return nxt, self.runner.launch(nxt.scheduled, input_ids=ids)
        except Exception:  # noqa: BLE001 - the step is scheduled again, normally, once tokens are read
            logger.exception(
                "launching a decode step ahead failed; it runs after the current one instead"
            )
            return None

    def _step_failed(
        self,
        sched: SchedulerOutput,
        outputs: list[RequestOutput],
        exc: Exception,
        *,
        launched: bool,
    ) -> EngineStepError:
        """Abort a failed step's requests (and a step launched after it: a subset of them); keep
        the other requests' outputs for the next call. Returns the error to raise."""
        if launched:
            self.runner.synchronize()  # the step must be over before its blocks are freed
        outputs = outputs + self._emit_unemitted()
        # The victims: the step's sequences still live. A step launched ahead may hold one that
        # finished meanwhile (its final output stands) or whose id was aborted and reused.
        ids = [
            s.seq.request_id
            for s in sched.scheduled
            if not s.seq.is_finished
            and (st := self._states.get(s.seq.request_id)) is not None
            and st.seq is s.seq
        ]
        # A failed sample fails its whole request (every sample is aborted, once).
        ids = list(dict.fromkeys(self._request_id_of(rid) for rid in ids))
        failed = set(ids)  # their outputs end with the error; the others' are kept for later
        self._ready = [o for o in outputs if o.request_id not in failed]
        logger.exception("forward failed; aborting %d requests", len(ids))
        for rid in ids:
            self.abort_request(rid)
        return EngineStepError(f"the forward failed: {exc}", ids)

    def _request_id_of(self, seq_id: RequestId) -> RequestId:
        """The request a sequence belongs to: its own id, or a sample's request's."""
        family = self._samples.get(seq_id)
        return RequestId(family[0].request_id) if family is not None else seq_id

    def _apply(self, sched: SchedulerOutput, sampled, result) -> None:
        """Advance the scheduler by a finished step's tokens; queue their outputs."""
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
        for seq in progressed:
            self._advance_grammar(seq)
        self.num_generation_tokens += len(progressed)
        for seq in progressed:
            if seq.num_output_tokens == 1:
                family = self._samples.get(seq.request_id)
                if family is None or family[1] == 0:  # a prompt computed once per request
                    self.num_prompt_tokens += seq.num_prompt_tokens
                if family is not None:
                    self._release_samples(seq)
            self._unemitted.append((seq, logprobs.get(seq.request_id)))

    def _advance_grammar(self, seq: Sequence) -> None:
        """Feed a constrained sequence's new tokens to its grammar; a rejected token marks it
        for ``_fail_grammar_errors``. A complete grammar allows only EOS next, which ends the
        sequence like any EOS (its text is all in the output); under ``ignore_eos`` the EOS it
        consumed ends it here ("stop")."""
        if seq.sampling_params.structured_outputs is None:
            return
        progress = self.structured_output.advance(seq)
        if progress.error is not None:  # even if the token ended it: the output is not valid
            self._grammar_failures[seq.request_id] = progress.error
        elif progress.stopped and not seq.is_finished and seq.token_ids[-1] in self.eos_token_ids:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)

    def _fail_grammar_errors(self) -> EngineStepError:
        """Abort the requests whose grammar rejected a token (before their outputs are built);
        the error names them, as a failed forward's does, and the engine goes on."""
        failures, self._grammar_failures = self._grammar_failures, {}
        for seq_id, why in failures.items():
            logger.warning("request %s failed: %s", seq_id, why)
        # A failed sample fails its whole request (every sample is aborted, once).
        ids = list(dict.fromkeys(self._request_id_of(seq_id) for seq_id in failures))
        for rid in ids:
            self.abort_request(rid)
        why = next(iter(failures.values()))
        return EngineStepError(f"structured outputs: {why}", ids)

    def _emit_unemitted(self) -> list[RequestOutput]:
        """Outputs of the tokens the last step appended (requests aborted since are skipped)."""
        pending, self._unemitted = self._unemitted, []
        outputs = []
        for seq, logprob in pending:
            if seq.request_id in self._states and self._states[seq.request_id].seq is seq:
                out = self._emit(seq, logprob)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _emit(self, seq: Sequence, logprob: TokenLogprob | None) -> RequestOutput | None:
        """Detokenize a sequence's new token, apply stop strings, build its output if due.

        A stop string may end a sequence that the steps in flight also compute: its blocks are
        freed now, while the device may still write those steps' KV into them. That is safe
        because every later use of a freed block comes after them on the device: the next
        steps run on the same stream, and pages pushed by a prefill pod wait for an event
        recorded when their blocks were reserved (``KVReceiver.expect``).
        """
        state = self._states[seq.request_id]
        self._apply_stop(seq, self.output_processor.on_new_token(state, logprob))
        out = self.output_processor.make_output(state)
        if seq.is_finished:
            del self._states[seq.request_id]
            self.runner.release(seq.request_id)
        return self._sample_output(seq, out)

    def _apply_stop(self, seq: Sequence, stop: SequenceStatus | None) -> None:
        """End ``seq`` with a stop string's status, if its newest text completed one."""
        if stop is not None:
            if seq.is_finished:
                seq.status = stop  # a stop string outranks a simultaneous length stop
            else:
                self.scheduler.finish(seq, stop)

    # ---- introspection ----------------------------------------------------------------------

    def get_stats(self) -> EngineStats:
        """Queues, KV pool and counters right now."""
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._awaiting_grammar),
            num_waiting_for_kv=len(self.scheduler.waiting_for_kv),
            num_queued_prefill_tokens=self.scheduler.num_queued_prefill_tokens,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_total_blocks,
            num_cached_blocks=bm.num_cached_blocks,
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.stats.queries,
            prefix_cache_hits=bm.stats.hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.num_prompt_tokens,
            generation_tokens=self.num_generation_tokens,
        )

    def take_step_outputs(self) -> StepOutputs:
        """The tokens recorded since the last call (an engine built with ``detokenize=False``)."""
        return self.output_processor.take()

    def take_kv_events(self) -> list[KVEvent]:
        """Prefix-cache events since the last call (with ``enable_kv_events``)."""
        return self.block_manager.take_events()

    def cached_block_hashes(self) -> list:
        """Hashes of every cached block (kvstore resyncs from this)."""
        return self.block_manager.cached_hashes()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block; only possible while no request holds blocks."""
        return self.block_manager.reset_prefix_cache()

    def set_kv_layer_hook(self, hook) -> None:
        """Let ``hook`` (a ``KVLayerHook``) see each layer's KV during the forward (prefill
        pods)."""
        self.runner.set_kv_layer_hook(hook)
