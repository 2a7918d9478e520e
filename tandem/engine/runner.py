"""Model runner: turns a scheduled step into one batched forward and samples the next tokens.

All scheduled tokens go through the model in one flat batch: decodes first (one token each),
then prompt chunks. The runner builds positions, slot mapping and block tables with NumPy, runs
the model over the paged KV cache, computes logits only for the rows that sample, and samples
on the device. It owns the weights, the KV cache and the per-request random generators.

Under tensor parallelism (``tensor_parallel_size`` > 1) every rank has a runner over its shard of
the weights and of the KV pool; rank 0's builds each step's host inputs once (a ``StepPlan``),
sends them to the other ranks (``tp_ranks.FollowerRanks``) and samples; the others run the same
forward (``follow``), their layers' all-reduces meeting rank 0's. A prefill engine's exported
pages are gathered onto rank 0 with every kv head (``parallel.kv_pages``) for its KV hook.
"""

import dataclasses
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from tandem.api.errors import ModelLoadError, TandemError
from tandem.api.ids import BlockId, RequestId
from tandem.engine import prompt_logprobs
from tandem.engine.attention import AttentionMetadata, get_attention_backend, resolve_backend_name
from tandem.engine.attention.selector import triton_supports
from tandem.engine.config import EngineConfig
from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
from tandem.engine.models import load_model
from tandem.engine.parallel import TPGroup, shard_for_config
from tandem.engine.parallel.kv_pages import gather_pages, layer_group
from tandem.engine.sampler import Sampler, SamplerOutput, SamplingRow
from tandem.engine.scheduler import ScheduledSequence
from tandem.engine.structured_output import StructuredOutputManager
from tandem.engine.uploads import upload
from tandem.model_dir import ModelConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device, model_dtype: str | None) -> torch.dtype:
    """``auto`` is float32 on CPU; on CUDA bfloat16, or float16 for float16 checkpoints."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if model_dtype == "float16" else torch.bfloat16


def block_tables(scheduled: list[ScheduledSequence]) -> np.ndarray:
    """[sequences, most blocks] int64 block ids, one row per sequence, padded with 0.

    One concatenation and one masked write: no per-row Python work beyond collecting the rows
    (the block manager hands out its tables as arrays already).
    """
    rows = [s.block_ids for s in scheduled]
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    tables = np.zeros((len(rows), int(lens.max())), dtype=np.int64)
    tables[np.arange(tables.shape[1]) < lens[:, None]] = np.concatenate(rows)
    return tables


def profile_batch(
    tokens: int, rows: int, max_model_len: int, block_size: int
) -> tuple[list[ScheduledSequence], int]:
    """The worst-case step the KV pool is sized around: ``tokens`` tokens over at most ``rows``
    sequences (prompt chunks no longer than a request may be, the rest one-token decodes),
    every row sampling with the costliest parameters (prompt logprobs included). Returns (the
    step, blocks it needs)."""
    from tandem.api.sampling_params import SamplingParams
    from tandem.engine.sequence import Sequence

    chunk = max(1, min(tokens, max_model_len - 1))
    decodes = max(0, min(rows - 1, tokens - chunk))
    lengths = []
    left = tokens - decodes
    while left > 0 and len(lengths) + decodes < rows:
        lengths.append(min(chunk, left))
        left -= lengths[-1]
    lengths += [1] * decodes
    params = SamplingParams(
        temperature=0.8,
        top_p=0.9,
        top_k=50,
        min_p=0.01,
        repetition_penalty=1.1,
        frequency_penalty=0.1,
        logprobs=20,
        prompt_logprobs=20,  # prompt chunks scored too (prompt_logprobs.ROWS_PER_SLICE at once)
        max_tokens=1,
        ignore_eos=True,
    )
    steps, next_block = [], 0
    for i, n in enumerate(lengths):
        seq = Sequence(f"profile-{i}", [1 + i % 7] * n, params, arrival_time=0.0, arrival_index=i)
        need = -(-n // block_size)
        blocks = np.arange(next_block, next_block + need, dtype=np.int64)
        next_block += need
        steps.append(ScheduledSequence(seq, 0, n, blocks, samples=True))
    return steps, next_block


class KVLayerHook(Protocol):
    """Called during the forward each time another layer's KV is written (prefill pods).

    Under tensor parallelism rank 0 asks it first which blocks the step sends
    (``export_block_ids``), every rank gathers its heads of those blocks onto rank 0 at each
    boundary of ``layers_per_group`` layers, and the hook sees only those gathered pages.
    """

    layers_per_group: int

    def on_layers_computed(
        self,
        scheduled: list[ScheduledSequence],
        num_layers_done: int,
        kv_cache: torch.Tensor,
        first_layer: int = 0,
    ) -> None: ...

    def export_block_ids(self, scheduled: list[ScheduledSequence]) -> np.ndarray: ...


class StepFollowers(Protocol):
    """The other ranks of a tensor-parallel group, as rank 0's runner drives them
    (``tp_ranks.FollowerRanks``)."""

    def step(self, plan: "StepPlan", device_input_ids: torch.Tensor | None) -> None: ...

    def copy_blocks(self, src: list[int], dst: list[int]) -> None: ...

    def kill(self, reason: str) -> None: ...


class TPGroupBroken(TandemError):
    """A step failed between rank 0 and the other ranks of its tensor-parallel group: they can
    never step together again (the engine must be restarted)."""


@dataclass(slots=True)
class StepPlan:
    """A step's forward inputs on the host (NumPy arrays), before their upload.

    Rank 0 builds it once; under tensor parallelism the other ranks receive it and upload it to
    their own devices, so every rank runs the same forward over its shard.
    """

    input_ids: np.ndarray | None
    """None: the tokens are on rank 0's device already (async scheduling) and are broadcast."""
    positions: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    num_decodes: int
    block_size: int
    logits_slices: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    """Hidden-state rows whose logits rank 0 computes before sampling (prompt logprobs), one
    call each, in order; then ``sample_rows``. Under tensor parallelism every rank computes its
    vocabulary rows of the same logits (``compute_logits`` is a collective)."""
    sample_rows: np.ndarray | None = None
    """Hidden-state rows of the sampling sequences (their last tokens)."""
    export_block_ids: np.ndarray | None = None
    """A tensor-parallel prefill engine: the pool blocks whose pages leave this step (sorted).
    Every rank sends its heads of them to rank 0 at each layer-group boundary."""
    export_layers_per_group: int = 0


@dataclass(slots=True)
class ForwardBatch:
    """Device inputs of one step's forward."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    order: list[ScheduledSequence]
    """The scheduled sequences in batch order (decodes first)."""
    logits_indices: torch.Tensor
    """Rows of the hidden states whose logits are sampled (each sampling sequence's last token)."""
    sampling: list[ScheduledSequence]
    """The sequences that sample, aligned with ``logits_indices``."""
    plan: StepPlan | None = None
    """The host inputs this batch was uploaded from."""
    scored: list = dataclasses.field(default_factory=list)
    """Prompt positions whose logprobs this step computes (``prompt_logprobs.plan``)."""


class LaunchedStep:
    """A step queued on the device; ``result()`` waits for its tokens (once).

    Tokens sampled without logprobs stay on the device (``tokens``), so that the next step can
    be launched with them as inputs before the host has read them (async scheduling); their copy
    to the host is queued at once and ``result()`` waits for that copy only, not for any step
    launched after this one.
    """

    __slots__ = ("sampled", "tokens", "prompt_logprobs", "_host", "_copied", "_output")

    def __init__(
        self,
        sampled: list[ScheduledSequence],
        tokens: torch.Tensor | None = None,
        output: SamplerOutput | None = None,
    ) -> None:
        self.sampled = sampled
        """The sequences that sample a token this step, in the output's row order."""
        self.tokens = tokens
        """The sampled tokens on the device (None: sampled with logprobs, or nothing sampled)."""
        self.prompt_logprobs: list = []
        """Prompt logprobs this step computed (``prompt_logprobs.compute``), read on the host;
        the engine appends them (``prompt_logprobs.apply``) once the step is done."""
        self._output = output
        self._host = self._copied = None
        if tokens is not None:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=tokens.is_cuda)
            self._host.copy_(tokens, non_blocking=True)
            if tokens.is_cuda:
                self._copied = torch.cuda.Event()
                self._copied.record()

    def result(self) -> tuple[list[ScheduledSequence], SamplerOutput | None]:
        """The sequences that sampled and their sampler output."""
        if self._output is None and self._host is not None:
            if self._copied is not None:
                self._copied.synchronize()
            self._output = SamplerOutput(self._host.tolist(), [None] * len(self.sampled))
        return self.sampled, self._output


class ModelRunner:
    """Owns the weights, the paged KV cache and the sampler of one engine.

    Built whole: the model is loaded first, then the KV pool is sized from what memory is left
    and allocated, so a constructed runner is ready to execute steps.
    """

    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        *,
        structured_output: StructuredOutputManager | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        """
        Args:
            structured_output: the engine's grammar matchers; the runner asks it for the masks
                of constrained rows (``_sample``) and frees a request's matcher (``release``).
            tp: this process's tensor-parallel group (None: one rank). Every rank constructs
                its runner at the same time: loading, the profiled step and the pool's size
                agree over the group's collectives.
        """
        self.tp = tp or TPGroup.single()
        self.shard = shard_for_config(model_config, self.tp.world_size, self.tp.rank)
        self._followers: StepFollowers | None = None
        self._broken: str | None = None
        """Why rank 0 and its followers are out of step (a step failed between them)."""
        self.config = config
        self.model_config = model_config
        self.eos_token_ids = eos_token_ids
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("device cuda was requested but no CUDA GPU is available")
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(
                self.device
            )  # Triton launches on the current device: make it ours
        self.dtype = resolve_dtype(config.dtype, self.device, model_config.torch_dtype)
        self.backend_name = resolve_backend_name(config.attention_backend, self.device.type)
        if self.backend_name == "triton" and not triton_supports(
            model_config.head_dim, config.block_size
        ):
            logger.warning(
                "the triton backend needs a power-of-two head_dim and block size <= 128 "
                "(head_dim %d, block size %d): using the torch backend",
                model_config.head_dim,
                config.block_size,
            )
            self.backend_name = "torch"
        self.backend = get_attention_backend(self.backend_name)
        self.model = load_model(
            config.model,
            model_config,
            self.backend,
            device=self.device,
            dtype=self.dtype,
            dummy=config.load_format == "dummy",
            tp=self.tp,
        )
        self.kv_spec = KVCacheSpec.for_model(
            model_config, config.block_size, self.dtype, num_kv_heads=self.shard.num_kv_heads
        )
        """This rank's pool: its shard's kv heads."""
        self.kv_wire_spec = KVCacheSpec.for_model(model_config, config.block_size, self.dtype)
        """The pages as KV transfers carry them: every kv head of the model (``kv_spec`` at one
        rank)."""
        self.sampler = Sampler(self.device, config.seed)
        self.structured_output = structured_output
        self._generators: dict[RequestId, torch.Generator] = {}
        self._kv_layer_hook: KVLayerHook | None = None
        self.graphs = None
        """Decode CUDA graphs (``cuda_graphs.DecodeGraphs``), captured by
        ``capture_decode_graphs``."""
        self.profiled_step_bytes: int | None = None
        """Peak memory of the worst-case step run at start-up (CUDA, pool sized from memory)."""
        self.kv_cache = PagedKVCache(
            self.kv_spec,
            self._num_kv_blocks(max_model_len),
            self.device,
            path=config.kv_pool_path,
        )
        if self.tp.world_size > 1 and config.cuda_graphs and self.device.type == "cuda":
            logger.warning(
                "decode CUDA graphs are not captured under tensor parallelism yet: "
                "decode steps run eagerly"
            )
        elif self.device.type == "cuda" and config.cuda_graphs and self.backend_name == "triton":
            from tandem.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model,
                self.kv_cache,
                config.block_size,
                min(config.max_cuda_graph_batch, config.max_num_seqs),
                -(-max_model_len // config.block_size),
                self.device,
            )

    # ---- memory -----------------------------------------------------------------------------

    def _num_kv_blocks(self, max_model_len: int) -> int:
        """KV pool size: explicit, else what the memory budget affords (never more than useful);
        under tensor parallelism the smallest any rank affords (one block manager for all)."""
        return self.tp.min_int(self._affordable_kv_blocks(max_model_len), self.device)

    def _affordable_kv_blocks(self, max_model_len: int) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = self.kv_spec.bytes_per_block
        if self.device.type == "cuda":
            budget = self._free_gpu_bytes(max_model_len)
        else:
            budget = self.config.kv_cache_memory_bytes
        blocks_per_seq = -(-max_model_len // self.config.block_size)
        useful = self.config.max_num_seqs * blocks_per_seq
        num = min(budget // per_block, useful)
        if num < blocks_per_seq:
            raise ModelLoadError(
                f"the KV budget holds {num} blocks, fewer than one {max_model_len}-token sequence "
                f"needs ({blocks_per_seq}); lower max_model_len or raise the memory budget"
            )
        return int(num)

    GPU_HEADROOM_BYTES = 512 << 20
    """Kept free when the pool is sized by what is free right now (others hold the rest): CUDA
    graphs, cuBLAS workspaces, the allocator's slack."""

    def _free_gpu_bytes(self, max_model_len: int) -> int:
        """KV bytes on CUDA: this engine's share of the GPU minus its weights and the peak of a
        profiled worst-case step.

        As in vLLM (V1), ``gpu_memory_utilization`` is this instance's share of the whole GPU, so
        two engines on one GPU take e.g. 0.45 each; and never more than is free right now, so an
        engine started beside others cannot take memory they already hold.
        """
        step_bytes = self.profiled_step_bytes = self._profile_step(max_model_len)
        torch.cuda.empty_cache()  # return blocks the caching allocator holds but does not use
        free, total = torch.cuda.mem_get_info(self.device)
        cfg = self.config
        share = int(total * cfg.gpu_memory_utilization) - torch.cuda.memory_allocated(self.device)
        if free - self.GPU_HEADROOM_BYTES < share:
            logger.warning(
                "gpu_memory_utilization %.2f asks for %.1f GiB more, but %.1f GiB is free on %s "
                "(other processes hold the rest): the KV pool takes what is free",
                cfg.gpu_memory_utilization,
                share / 2**30,
                free / 2**30,
                self.device,
            )
        budget = min(share, free - self.GPU_HEADROOM_BYTES) - step_bytes
        logger.info(
            "profiled step (%d tokens, %d rows, sampling): peak %.2f GiB; KV budget %.2f GiB",
            cfg.max_num_batched_tokens,
            cfg.max_num_seqs,
            step_bytes / 2**30,
            max(budget, 0) / 2**30,
        )
        return budget

    def _profile_step(self, max_model_len: int) -> int:
        """Bytes the worst admissible step allocates at its peak, measured by running one (vLLM's
        profile run): ``max_num_batched_tokens`` tokens over ``max_num_seqs`` rows, as prompt
        chunks plus one-token decodes, every row sampling with top-k/top-p, penalties and
        logprobs, on a pool just large enough for it. Memory the step takes outside torch's
        allocator (cuBLAS workspaces, kernels loaded) counts too."""
        steps, blocks = profile_batch(
            self.config.max_num_batched_tokens,
            self.config.max_num_seqs,
            max_model_len,
            self.config.block_size,
        )
        self.kv_cache = PagedKVCache(self.kv_spec, blocks, self.device)
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            free_before = torch.cuda.mem_get_info(self.device)[0]
            reserved_before = torch.cuda.memory_reserved(self.device)
            held = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.execute(steps)
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - held
            outside = (free_before - torch.cuda.mem_get_info(self.device)[0]) - (
                torch.cuda.memory_reserved(self.device) - reserved_before
            )
        finally:
            self.kv_cache = None
            torch.cuda.empty_cache()
        return peak + max(outside, 0)

    @property
    def kv_layer_hook(self) -> KVLayerHook | None:
        return self._kv_layer_hook

    def set_kv_layer_hook(self, hook: KVLayerHook | None) -> None:
        """Have ``hook`` see each layer's KV as soon as the forward wrote it (prefill pods)."""
        self._kv_layer_hook = hook

    # ---- one step ---------------------------------------------------------------------------

    def prepare(
        self, scheduled: list[ScheduledSequence], input_ids: torch.Tensor | None = None
    ) -> ForwardBatch:
        """Flat inputs and attention metadata for a step; decodes are placed first.

        ``input_ids``: a decode-only step's tokens already on the device (see ``launch``).
        """
        assert input_ids is None or all(s.num_new_tokens == 1 for s in scheduled)
        order = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)
        bs = self.config.block_size
        starts = np.fromiter((s.start for s in order), dtype=np.int64, count=len(order))
        qlens = np.fromiter((s.num_new_tokens for s in order), dtype=np.int64, count=len(order))
        qsl = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(qlens, out=qsl[1:])
        num_tokens = int(qsl[-1])
        seq_index = np.repeat(np.arange(len(order)), qlens)
        positions = np.arange(num_tokens, dtype=np.int64) - qsl[:-1][seq_index] + starts[seq_index]
        tables = block_tables(order)
        ids = None
        if input_ids is None:
            ids = np.fromiter(
                itertools.chain.from_iterable(
                    s.seq.token_ids[s.start : s.start + s.num_new_tokens] for s in order
                ),
                dtype=np.int64,
                count=num_tokens,
            )
        plan = StepPlan(
            input_ids=ids,
            positions=positions,
            slot_mapping=tables[seq_index, positions // bs] * bs + positions % bs,
            block_tables=tables,
            seq_lens=starts + qlens,
            query_start_loc=qsl,
            num_decodes=int(np.count_nonzero(qlens == 1)),
            block_size=bs,
        )
        plan.sample_rows = qsl[1:][[s.samples for s in order]] - 1
        # Rows asking for prompt logprobs score their chunk's prompt positions too.
        scored = prompt_logprobs.plan(order, qsl.tolist())
        plan.logits_slices = prompt_logprobs.slices(scored)
        device_ids, positions_t, meta = self._upload(plan, input_ids)
        return ForwardBatch(
            input_ids=device_ids,
            positions=positions_t,
            attn=meta,
            order=order,
            logits_indices=upload(plan.sample_rows, self.device),
            sampling=[s for s in order if s.samples],
            plan=plan,
            scored=scored,
        )

    def _upload(
        self, plan: StepPlan, input_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input ids, positions, attention metadata) of ``plan`` on this rank's device."""
        dev = self.device
        if input_ids is None:
            input_ids = upload(plan.input_ids, dev)
        meta = AttentionMetadata(
            slot_mapping=upload(plan.slot_mapping, dev),
            block_tables=upload(plan.block_tables, dev),
            seq_lens=upload(plan.seq_lens, dev),
            query_start_loc=upload(plan.query_start_loc, dev),
            num_decodes=plan.num_decodes,
            seq_lens_cpu=plan.seq_lens.tolist(),
            query_start_loc_cpu=plan.query_start_loc.tolist(),
            block_size=plan.block_size,
        )
        return input_ids, upload(plan.positions, dev), meta

    # ---- tensor parallelism -----------------------------------------------------------------

    def _forward_with_followers(
        self, batch: ForwardBatch, input_ids
    ) -> tuple[list, torch.Tensor | None]:
        """Rank 0's forward and logits (``_logits``) with the other ranks running the same
        collectives. A failure in between leaves them inside the step's collectives, out of
        step with any later one for good: they are ended, and every later step fails at once
        (``TPGroupBroken``). The KV hook's own errors are held until the step's last collective
        and raised then: the step fails, as on one rank, and the group stays in step."""
        if self._broken is not None:
            raise TPGroupBroken(self._broken)
        held: list[BaseException] = []
        hook = self._tp_export_hook(batch, held)  # before the plan leaves: it names the blocks
        try:
            self._followers.step(batch.plan, input_ids)
            hidden = self.model(
                batch.input_ids, batch.positions, self.kv_cache.tensor, batch.attn, hook
            )
            result = self._logits(hidden, batch)
        except BaseException as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            self._followers.kill(self._broken)
            raise
        if held:
            raise held[0]
        return result

    def attach_followers(self, followers: StepFollowers) -> None:
        """Rank 0: send every later step to ``followers`` (the group's other ranks) before
        running it. Attached after construction: the constructors' collectives (the profiled
        step, the pool's size) run on every rank by themselves."""
        self._followers = followers

    def _tp_export_hook(
        self, batch: ForwardBatch, held: list[BaseException]
    ) -> Callable[[int], None] | None:
        """Rank 0 of a tensor-parallel prefill engine: the step's layer hook, and the blocks it
        exports put in the plan the followers receive.

        At each layer-group boundary every rank gathers its heads of those blocks onto rank 0
        (``gather_pages``); the KV hook then sees the gathered pages, with each sequence's block
        table renumbered to their order (blocks it does not send this step read -1). An error of
        the KV hook is appended to ``held`` (the gathers go on: the followers run them anyway)
        and the hook is not called again this step.
        """
        export = self._kv_layer_hook
        if export is None:
            return None
        ids = export.export_block_ids(batch.order)
        if not len(ids):
            return None  # nothing leaves this step: no gather, and nothing to hand the hook
        batch.plan.export_block_ids = ids
        batch.plan.export_layers_per_group = export.layers_per_group
        gather = self._export_gather(batch.plan)
        order = [
            dataclasses.replace(s, block_ids=_renumbered(np.asarray(s.block_ids), ids))
            for s in batch.order
        ]

        def hook(n: int) -> None:
            pages = gather(n)
            if pages is not None and not held:
                try:
                    export.on_layers_computed(order, n, pages, first_layer=n - pages.shape[0])
                except Exception as exc:  # noqa: BLE001 - raised after the step's collectives
                    held.append(exc)

        return hook

    def _export_gather(self, plan: StepPlan) -> Callable[[int], torch.Tensor | None]:
        """A layer hook that gathers ``plan.export_block_ids`` onto rank 0 at each layer-group
        boundary: the pages (all kv heads) on rank 0 there, None everywhere else."""
        ids = upload(plan.export_block_ids, self.device)  # int64 (``tp_ranks._widen``)
        total = self.model_config.num_layers
        heads = self.model_config.num_kv_heads
        kv = self.kv_cache.tensor

        def gather(n: int) -> torch.Tensor | None:
            layers = layer_group(n, total, plan.export_layers_per_group)
            if layers is None:
                return None
            return gather_pages(self.tp, kv, layers, ids, heads)

        return gather

    @torch.inference_mode()
    def follow(self, plan: StepPlan, input_ids: torch.Tensor | None = None) -> None:
        """Ranks after the first: run rank 0's step over this rank's shard (no sampling: rank 0
        samples from logits every rank holds alike), sending its heads of the step's exported
        pages to rank 0 (a prefill pod)."""
        if self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            torch.cuda.set_device(self.device)
        ids, positions, meta = self._upload(plan, input_ids)
        hook = None
        if plan.export_block_ids is not None and len(plan.export_block_ids):
            hook = self._export_gather(plan)
        hidden = self.model(ids, positions, self.kv_cache.tensor, meta, hook)
        self._follower_logits(hidden, plan)

    def _follower_logits(self, hidden: torch.Tensor, plan: StepPlan) -> None:
        """This rank's part of every logits rank 0 computes in the step, in rank 0's order
        (prompt logprobs' slices, then the sampling rows): the vocabulary-parallel head's
        gathers meet rank 0's."""
        for start, stop in plan.logits_slices:
            self.model.compute_logits(hidden[start:stop])
        if plan.sample_rows is not None and len(plan.sample_rows):
            rows = upload(plan.sample_rows, self.device)
            self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def copy_block_ids(self, src: list[int], dst: list[int]) -> None:
        """Copy KV blocks ``src[i]`` to ``dst[i]`` in this rank's pool (every layer, K and V)."""
        src_t = upload(torch.tensor(src, dtype=torch.long), self.device)
        dst_t = upload(torch.tensor(dst, dtype=torch.long), self.device)
        kv = self.kv_cache.tensor
        kv.index_copy_(2, dst_t, kv.index_select(2, src_t))

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[BlockId, BlockId]]) -> None:
        """Copy KV blocks (source, destination) in every layer, K and V: the block manager's
        copy-on-write of a shared block (``BlockManager.fork``). Queued on the device's stream
        before the next step, so that step reads and writes the copies; every rank copies its
        shard."""
        src = [int(c[0]) for c in copies]
        dst = [int(c[1]) for c in copies]
        if self._followers is not None:
            if self._broken is not None:
                raise TPGroupBroken(self._broken)
            self._followers.copy_blocks(src, dst)
        self.copy_block_ids(src, dst)

    def execute(
        self, scheduled: list[ScheduledSequence]
    ) -> tuple[list[ScheduledSequence], SamplerOutput | None]:
        """Run one step. Returns the sequences that sampled and their sampler output."""
        return self.launch(scheduled).result()

    @torch.inference_mode()
    def launch(
        self, scheduled: list[ScheduledSequence], input_ids: torch.Tensor | None = None
    ) -> LaunchedStep:
        """Queue one step on the device and return before it finishes (on CUDA).

        The step's only synchronisation is ``result()`` reading the sampled tokens, so the caller
        can do host work meanwhile. A step with logprobs is sampled here, synchronously.

        ``input_ids``: the (decode-only) step's input tokens as a device tensor, one per
        sequence, when the host does not have them yet: the tokens of the step before, still
        in flight (async scheduling).
        """
        if self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            torch.cuda.set_device(self.device)  # the engine thread's own current device
        if self._graph_step(scheduled):
            return self._launch_graph(scheduled, input_ids)
        batch = self.prepare(scheduled, input_ids)
        kv = self.kv_cache.tensor
        hook = None
        if self._kv_layer_hook is not None:
            export = self._kv_layer_hook

            def hook(n: int) -> None:
                export.on_layers_computed(batch.order, n, kv)

        if self._followers is None:
            hidden = self.model(batch.input_ids, batch.positions, kv, batch.attn, hook)
            computed, logits = self._logits(hidden, batch)
        else:
            computed, logits = self._forward_with_followers(batch, input_ids)
        step = LaunchedStep([]) if logits is None else self._sample(logits, batch.sampling)
        step.prompt_logprobs = computed
        return step

    def _logits(
        self, hidden: torch.Tensor, batch: ForwardBatch
    ) -> tuple[list, torch.Tensor | None]:
        """(the prompt logprobs the step computes, the sampling rows' logits or None).

        Under tensor parallelism every ``compute_logits`` is a collective: a follower's own step
        (the profiled one, at start-up) computes its part of the same logits and gets ([], None).
        Prompt logprobs are computed synchronously: such steps are prefills, never the decode
        steps launched ahead.
        """
        if not self.tp.is_first:
            self._follower_logits(hidden, batch.plan)
            return [], None
        scored = batch.scored
        computed = (
            prompt_logprobs.compute(hidden, scored, self.model.compute_logits) if scored else []
        )
        if not batch.sampling:
            return computed, None
        return computed, self.model.compute_logits(hidden[batch.logits_indices])

    def _sample(self, logits: torch.Tensor, sampling: list[ScheduledSequence]) -> LaunchedStep:
        """Tokens for the sampling rows, on the device: one argmax when every row is plain greedy
        (the common batch; no per-row Python beyond the check), else the full sampler; read on
        the host here only when a row wants logprobs."""
        if all(
            s.seq.sampling_params.argmax_only
            and s.seq.num_output_tokens + s.ahead >= s.seq.sampling_params.min_tokens
            for s in sampling
        ):
            return LaunchedStep(sampling, tokens=self.sampler.argmax_tokens(logits))
        rows = [self._sampling_row(s) for s in sampling]
        self._constrain(sampling, rows)
        if all(r.params.logprobs is None for r in rows):
            return LaunchedStep(sampling, tokens=self.sampler.tokens(logits, rows))
        return LaunchedStep(sampling, output=self.sampler(logits, rows))

    def synchronize(self) -> None:
        """Wait until every step launched on the device has finished."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _graph_step(self, scheduled: list[ScheduledSequence]) -> bool:
        """Whether this step can replay a decode CUDA graph (capturing them first if needed)."""
        g = self.graphs
        return (
            g is not None
            and self._kv_layer_hook is None
            and len(scheduled) <= g.max_batch
            and all(
                s.num_new_tokens == 1 and s.samples and len(s.block_ids) <= g.max_blocks
                for s in scheduled
            )
            and self.capture_decode_graphs()  # prefill pods (with a hook) never get here
        )

    def capture_decode_graphs(self) -> bool:
        """Capture the decode CUDA graphs now (decode pods, before serving). False: none in use.

        A capture that fails (out of memory, say) turns graphs off: decode steps run eagerly.
        """
        if self.graphs is None:
            return False
        if not self.graphs._graphs:
            try:
                self.graphs.capture_all()
            except Exception:  # noqa: BLE001 - eager decoding still works
                logger.exception("capturing the decode CUDA graphs failed: decoding without them")
                self.graphs = None
                torch.cuda.empty_cache()
                return False
        return True

    def _launch_graph(
        self, scheduled: list[ScheduledSequence], input_ids: torch.Tensor | None
    ) -> LaunchedStep:
        bs = self.config.block_size
        starts = np.fromiter((s.start for s in scheduled), dtype=np.int64, count=len(scheduled))
        if input_ids is None:
            ids = np.fromiter(
                (s.seq.token_ids[s.start] for s in scheduled), dtype=np.int64, count=len(scheduled)
            )
        else:
            ids = np.zeros(len(scheduled), dtype=np.int64)  # overwritten on the device by input_ids
        tables = block_tables(scheduled)
        slots = tables[np.arange(len(scheduled)), starts // bs] * bs + starts % bs
        logits = self.graphs.run(ids, starts, slots, starts + 1, tables, device_ids=input_ids)
        return self._sample(logits, scheduled)

    def _sampling_row(self, s: ScheduledSequence) -> SamplingRow:
        seq = s.seq
        params = seq.sampling_params
        generator = (
            self._generator_for(seq) if params.seed is not None and not params.is_greedy else None
        )
        stop_ids: tuple[int, ...] = ()
        if seq.num_output_tokens + s.ahead < params.min_tokens:
            eos = () if params.ignore_eos else self.eos_token_ids
            stop_ids = tuple(eos) + params.stop_token_ids
        penalties = params.has_penalties
        return SamplingRow(
            params=params,
            prompt_token_ids=seq.prompt_token_ids if penalties else [],
            output_token_ids=seq.output_token_ids if penalties else [],
            generator=generator,
            stop_ids_for_min_tokens=stop_ids,
        )

    def _generator_for(self, seq) -> torch.Generator:
        generator = self._generators.get(seq.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seq.sampling_params.seed)
            self._generators[seq.request_id] = generator
        return generator

    def skip_sampling_draws(self, seq, count: int) -> None:
        """Advance a seeded request's generator past ``count`` sampling draws made elsewhere.

        A decode pod continues a request whose first token a prefill pod sampled with the same
        seed, and a migrated request continues the tokens another pod sampled; skipping their
        draws (one per token, the sampler's row of the exponential race) makes the tokens
        identical to an uninterrupted colocated run. One draw at a time: a single larger draw
        need not leave the generator in the same state.
        """
        params = seq.sampling_params
        if count <= 0 or params.seed is None or params.is_greedy:
            return
        generator = self._generator_for(seq)
        row = torch.empty(self.model_config.vocab_size, device=self.device)
        for _ in range(count):
            row.exponential_(generator=generator)

    def _constrain(self, sampling: list[ScheduledSequence], rows: list[SamplingRow]) -> None:
        """Give constrained rows their grammar's mask of allowed tokens (their previous tokens
        are all consumed: such rows are never scheduled ahead, ``schedule_next_decode``)."""
        so = self.structured_output
        if so is None or all(r.params.structured_outputs is None for r in rows):
            return
        masks = so.bitmasks([s.seq for s in sampling])
        for s, row, mask in zip(sampling, rows, masks, strict=True):
            row.allowed_tokens = mask
            if mask is not None and row.stop_ids_for_min_tokens and so.is_complete(s.seq):
                row.stop_ids_for_min_tokens = ()  # only EOS is left: it outranks min_tokens

    def release(self, request_id: RequestId) -> None:
        """Forget a finished request's generator and grammar matcher."""
        self._generators.pop(request_id, None)
        if self.structured_output is not None:
            self.structured_output.release(request_id)


def _renumbered(block_ids: np.ndarray, exported: np.ndarray) -> np.ndarray:
    """``block_ids`` as positions in ``exported`` (sorted), -1 for blocks not in it."""
    pos = np.searchsorted(exported, block_ids)
    pos = np.minimum(pos, len(exported) - 1)
    return np.where(exported[pos] == block_ids, pos, -1)
