"""Engine configuration: one validated, frozen object, and the narrow views its parts receive.

``EngineConfig`` is what users pass (``LLM(model, **kwargs)``) and what the services embed in
their settings. Values derived at start-up (the number of KV blocks from memory, the context
length from the model) live in ``ResolvedLimits``, built once by the engine; nothing here is
mutated after construction.
"""

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

StepPolicy = Literal["decode-first", "prefill-first"]


class EngineOptions(BaseModel):
    """The engine's tunables. Service settings inherit these fields, so they become flat CLI
    flags and ``TANDEM_<SERVICE>_*`` variables of the prefill and decode services."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    device: str = "cpu"
    """torch device: "cpu", "cuda" or "cuda:N"."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and KV dtype; auto is float32 on CPU and bfloat16 (float16 for fp16 models) on
    CUDA."""
    block_size: int = Field(16, gt=0, le=1024)
    """Tokens per KV block."""
    num_kv_blocks: int | None = Field(None, gt=0)
    """KV pool size in blocks; default: from kv_cache_memory_bytes on CPU, free memory on CUDA."""
    kv_cache_memory_bytes: int = Field(512 << 20, gt=0)
    """KV pool budget on CPU when num_kv_blocks is not given."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of GPU memory the engine may use (weights, activations and KV pool)."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + output; default and maximum: the model's max_position_embeddings."""
    max_num_seqs: int | None = Field(None, gt=0)
    """Most sequences in one step's batch. Default (``batch_defaults``): 1024 on GPUs with at
    least 70 GiB, else 256 (vLLM's rule)."""
    max_num_batched_tokens: int | None = Field(None, gt=0)
    """Token budget of one step (prefill chunks + decodes). Longer prompts are prefilled in
    chunks over several steps (chunked prefill is always on, as in vLLM v1). Default
    (``batch_defaults``): 16384 on GPUs with at least 70 GiB, else 8192."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prefixes across requests."""
    scheduling_policy: str = "fcfs"
    """Waiting-queue order: fcfs, priority, shortest-prompt-first, or a registered policy name."""
    step_policy: StepPolicy = "decode-first"
    """Who gets a step's budget first: running sequences (decode-first) or waiting prompts."""
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    """Attention implementation: ``triton`` (paged decode and varlen paged prefill kernels; CUDA),
    ``torch`` (the gather-then-SDPA reference). ``auto``: triton on CUDA, torch on CPU."""
    cuda_graphs: bool = True
    """Replay decode-only steps from CUDA graphs captured per padded batch size (CUDA + triton)."""
    max_cuda_graph_batch: int = Field(256, ge=1)
    """Largest decode batch replayed from a graph; bigger batches run eagerly."""
    async_output_processing: Literal["auto", "on", "off"] = "auto"
    """Build step N's outputs (detokenize, stop strings) while the GPU runs step N+1, as vLLM
    V0's async output processing: outputs reach callers one step later. ``auto``: on for CUDA
    engines without a per-layer KV hook (not on prefill pods, whose output is the first token)."""
    async_scheduling: Literal["auto", "on", "off"] = "auto"
    """Launch a decode step before the previous one's tokens are read when nothing else waits
    (vLLM's async scheduling): the host's per-step work overlaps the GPU. ``auto``: on for CUDA
    engines without a per-layer KV hook."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """Ranks the model is split over (Megatron-style: attention heads and MLP columns), one
    process and one device each: the engine's own process is rank 0 and starts the others. On
    CUDA, rank r uses the device after ``device``'s index by r (``cuda`` -> cuda:0..N-1)."""
    load_format: Literal["auto", "dummy"] = "auto"
    """``dummy``: random weights instead of reading safetensors (benchmarks of model shapes)."""
    seed: int = 0
    """Seed of requests that carry none."""

    @field_validator("scheduling_policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        from tandem.engine.scheduling_policy import get_scheduling_policy

        get_scheduling_policy(name)
        return name

    @model_validator(mode="after")
    def _budget_covers_batch(self):
        if None not in (self.max_num_seqs, self.max_num_batched_tokens) and (
            self.max_num_batched_tokens < self.max_num_seqs
        ):
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}): every running sequence needs a token per step"
            )
        return self

    def engine_options(self) -> dict:
        """These fields as keyword arguments (for ``EngineConfig(model=..., **options)``)."""
        return {name: getattr(self, name) for name in EngineOptions.model_fields}


LARGE_GPU_BYTES = 70 << 30
"""GPUs with at least this much memory (H100 80GB, H200, B200) get the large batch defaults."""
BATCH_DEFAULTS = {"large-gpu": (1024, 16384), "other": (256, 8192)}
"""(max_num_seqs, max_num_batched_tokens) by device class, as vLLM's defaults for its ``LLM``
class: a large GPU holds enough KV for a thousand short requests, and a bigger token budget
lets more prompts join each step."""


def batch_defaults(device: str) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) when unset: large on a GPU of >= 70 GiB."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index
            total = torch.cuda.get_device_properties(
                torch.cuda.current_device() if index is None else index
            ).total_memory
            if total >= LARGE_GPU_BYTES:
                return BATCH_DEFAULTS["large-gpu"]
    return BATCH_DEFAULTS["other"]


class EngineConfig(EngineOptions):
    """Everything that shapes one engine instance."""

    model: str
    """Path of a Hugging Face model directory (config.json, *.safetensors, tokenizer.json)."""
    kv_pool_path: str | None = None
    """CPU only: allocate the KV pool in this file (under /dev/shm: shared memory), so other
    processes on the host can map it (a decode pod's front, and prefill pods' ``shm`` KV
    transport). The caller removes the file. Under tensor parallelism rank r's pool is the file
    ``kv_cache.rank_pool_path(kv_pool_path, r)``."""
    share_rank_pools: bool = False
    """GPUs, tensor parallelism: every follower rank shares its KV pool over CUDA IPC (only an
    allocation's owner may), relayed by rank 0 (``LLMEngine.rank_kv_pools``), so that a decode
    pod's front writes each rank's heads of pushed KV into its own rank's pool."""

    def with_batch_defaults(self) -> "EngineConfig":
        """This config with ``max_num_seqs`` and ``max_num_batched_tokens`` filled in for its
        device (``batch_defaults``); a default never exceeds the other limit's given value."""
        if self.max_num_seqs is not None and self.max_num_batched_tokens is not None:
            return self
        seqs, tokens = batch_defaults(self.device)
        if self.max_num_batched_tokens is not None:
            seqs = min(seqs, self.max_num_batched_tokens)
        if self.max_num_seqs is not None:
            tokens = max(tokens, self.max_num_seqs)
        return self.model_copy(
            update={
                "max_num_seqs": self.max_num_seqs or seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens or tokens,
            }
        )


@dataclass(slots=True, frozen=True)
class ResolvedLimits:
    """Values derived once at start-up from the config, the model and the device."""

    num_kv_blocks: int
    max_model_len: int


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    """The scheduler's narrow view of the configuration."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_prefix_caching: bool
    scheduling_policy: str
    step_policy: StepPolicy
