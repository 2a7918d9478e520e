"""Llama-family decoder: Llama 2/3.x, Mistral, Qwen2/2.5 and Qwen3 in one module.

The variants differ only in options read from config.json (see ``ModelConfig``): q/k/v and
output biases, per-head q/k RMSNorm (Qwen3), tied embeddings, rope scaling, sliding windows.
Parameter names follow transformers' checkpoints, except that q/k/v and gate/up projections are
fused into one matrix each (one GEMM instead of three or two); the loader fills the shards.

The forward works on a flat batch of tokens from many sequences: no padding, no per-token
Python; attention reads and writes the paged KV cache through the attention backend. As in
vLLM, the residual stream travels beside the hidden states: each norm takes the previous
block's output and the residual, adds them and normalises the sum (one fused kernel in half
precision on CUDA, where rotary and the KV cache write are fused too), so a layer maps
``(h, residual)`` to ``(h, residual)`` and the final norm adds the last MLP's output.

Tensor parallelism (``tp``, a ``TPGroup`` of more than one rank; Megatron's split, as vLLM's
``QKVParallelLinear``/``MergedColumnParallelLinear``/``RowParallelLinear`` do it): each rank
holds its ``Shard`` (``tandem.engine.parallel.sharding``). ``qkv_proj`` and ``gate_up_proj`` are
column-parallel -- a plain ``nn.Linear`` over the rank's q and kv heads and its slice of the
intermediate size, no communication -- and ``o_proj``/``down_proj`` are row-parallel
(``RowParallelLinear``: the rank's input columns, a partial sum, one all-reduce, then the full
bias). The attention backend and the KV cache see only the rank's heads. The embedding and the
LM head are vocabulary-parallel (``VocabParallelEmbedding``, ``compute_logits``: each rank holds
``1 / tp`` of the vocabulary's rows, which for a 70B-class model at TP=8 saves ~3.7 GB a GPU
against replicas); the norms are replicated. At ``tp`` size 1 the modules are exactly the
single-device ones (no extra op).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine.attention import AttentionBackend, AttentionMetadata
from tandem.engine.attention.selector import triton_available
from tandem.engine.models.rope import RotaryEmbedding, apply_rotary
from tandem.engine.parallel import Shard, TPGroup, shard_for_config
from tandem.engine.parallel.sharding import vocab_rows
from tandem.model_dir import ModelConfig


def _fused_ops(x: torch.Tensor):
    """The Triton fused kernels for half precision on CUDA (``fused_ops``), else None."""
    if not x.is_cuda or not triton_available() or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    from tandem.engine.models import fused_ops

    return fused_ops


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as transformers does (exactness matters for parity tests).

    Called with a ``residual``, it first adds ``x`` to it and returns ``(norm(x + residual),
    x + residual)``: the pre-norm block's residual add, fused into the norm that follows it.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        if (ops := _fused_ops(x)) is not None:
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        # transformers adds `residual + hidden`; IEEE addition commutes, so the bits are its bits.
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := _fused_ops(x)) is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RowParallelLinear(nn.Module):
    """A linear layer split by input columns over the ranks of ``tp``: each rank multiplies its
    slice of the input by its columns of the weight, the partial sums are all-reduced, and the
    full bias (the same on every rank) is added once, after the reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """The embedding split by vocabulary rows over the ranks of ``tp`` (``vocab_rows``): each
    rank looks up the ids it holds, writes zeros for the others, and one all-reduce sums the
    ranks' rows (exactly: every sum has one non-zero term). The LM head reads the same rows
    when the embeddings are tied."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.rows, per_rank = vocab_rows(vocab_size, tp.world_size, tp.rank)
        self.weight = nn.Parameter(torch.empty(per_rank, hidden_size))
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.rows.start
        outside = (local < 0) | (local >= len(self.rows))
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(h)


def _row_parallel(in_features: int, out_features: int, bias: bool, tp: TPGroup) -> nn.Module:
    """``nn.Linear`` on one rank (exactly the single-device op), ``RowParallelLinear`` above."""
    if tp.world_size == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, tp)


class Attention(nn.Module):
    """Self-attention with fused q/k/v, optional q/k norm, rope, and a paged KV backend.

    Under tensor parallelism it holds the rank's q and kv heads only (``shard``)."""

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        backend: AttentionBackend,
        shard: Shard,
        tp: TPGroup,
    ) -> None:
        super().__init__()
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(  # column-parallel: the rank's heads, no communication
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias
        )
        self.o_proj = _row_parallel(self.q_size, config.hidden_size, config.o_proj_bias, tp)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.sliding_window = config.sliding_windows[layer_idx]
        self.scale = self.head_dim**-0.5
        self.pow2_head_dim = (
            self.head_dim & (self.head_dim - 1) == 0
        )  # the fused rotary kernel's need
        self.backend = backend

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, kv_cache, meta
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        kv_stored = self.pow2_head_dim and (ops := _fused_ops(q)) is not None
        if kv_stored:  # rotary of q and k and the cache write of k and v: one kernel
            q, k = ops.rotary_and_store(q, k, v, *rope, kv_cache[0], kv_cache[1], meta.slot_mapping)
        else:
            q, k = apply_rotary(q, k, *rope)
        o = self.backend.forward(
            q,
            k,
            v,
            kv_cache,
            meta,
            scale=self.scale,
            sliding_window=self.sliding_window,
            kv_stored=kv_stored,
        )
        return self.o_proj(o.reshape(n, self.q_size))


class MLP(nn.Module):
    """SwiGLU MLP with fused gate/up projection (the rank's intermediate slice of each under
    tensor parallelism; ``down_proj`` then row-parallel)."""

    def __init__(self, config: ModelConfig, shard: Shard, tp: TPGroup) -> None:
        super().__init__()
        self.intermediate_size = shard.intermediate_size
        self.gate_up_proj = nn.Linear(  # column-parallel: [gate slice; up slice]
            config.hidden_size, 2 * self.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = _row_parallel(
            self.intermediate_size, config.hidden_size, config.mlp_bias, tp
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := _fused_ops(x)) is not None:
            return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP, the residual adds fused into the norms."""

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        backend: AttentionBackend,
        shard: Shard,
        tp: TPGroup,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, backend, shard, tp)
        self.mlp = MLP(config, shard, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope, h, residual, kv_cache, meta):
        """``(h, residual)`` -> ``(h, residual)``: ``h`` is the previous layer's MLP output, not
        yet added to ``residual`` (the first layer gets the embeddings and ``residual=None``)."""
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        x = self.self_attn(rope, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderBody(nn.Module):
    """transformers' ``model.*`` submodule: embeddings, layers, final norm."""

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, shard: Shard, tp: TPGroup
    ) -> None:
        super().__init__()
        if tp.world_size == 1:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, backend, shard, tp) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope)


class DecoderLM(nn.Module):
    """Causal LM over a paged KV cache.

    ``tp``: this process's tensor-parallel group (None: one device); the model then holds the
    rank's ``shard`` of every layer and its KV cache holds ``shard.num_kv_heads`` heads. Every
    rank gets the same input ids and metadata and returns the same full hidden states; each
    computes the logits of its vocabulary rows, gathered onto rank 0 (``compute_logits``).
    """

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, tp: TPGroup | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp if tp is not None else TPGroup.single()
        self.shard = shard_for_config(config, self.tp.world_size, self.tp.rank)
        self.model = DecoderBody(config, backend, self.shard, self.tp)
        if not config.tie_word_embeddings:
            rows = vocab_rows(config.vocab_size, self.tp.world_size, self.tp.rank)[1]
            self.lm_head = nn.Linear(config.hidden_size, rows, bias=False)  # vocabulary-parallel

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        meta: AttentionMetadata,
        layer_hook: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch; ``kv_caches`` is [layers, 2, blocks, ...].

        ``layer_hook(n)`` runs after layer ``n - 1`` wrote its KV, so KV of finished layers can
        leave (prefill pods stream it) while later layers compute.
        """
        h = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(rope, h, residual, kv_caches[i], meta)
            if layer_hook is not None:
                layer_hook(i + 1)
        h, _ = self.model.norm(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [N, vocab] of the given hidden states (the LM head, tied or not).

        Under tensor parallelism every rank computes its vocabulary rows' logits and rank 0
        gathers them (it samples): a collective, so every rank calls it for the same rows in
        the same order (``StepPlan.logits_slices``); the other ranks get None.
        """
        weight = (
            self.model.embed_tokens.weight
            if self.config.tie_word_embeddings
            else self.lm_head.weight
        )
        logits = F.linear(hidden, weight)
        if self.tp.world_size == 1:
            return logits
        parts = self.tp.gather(logits)
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[:, : self.config.vocab_size]
