"""GPU attention backend: Triton paged kernels for decodes and for prefills.

Decodes (one new token each, the batch's leading rows) read K/V in place through the block
tables (``triton_paged_decode``): no gather, one pass over the context at memory bandwidth, and
only device tensors, so a decode-only step can be captured in a CUDA graph. Every prompt chunk
of the step, with or without cached context before it and under a sliding window too, goes
through one launch of ``triton_paged_prefill`` (in place, O(tokens) memory). The exception is
a step whose only prefill is one long prompt with no cached context: SDPA's flash/cuDNN kernels
on its own K/V are faster there (``SDPA_FROM_TOKENS``).
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tandem.engine.attention.backend import AttentionMetadata
from tandem.engine.attention.torch_backend import TorchAttentionBackend
from tandem.engine.attention.triton_paged_decode import choose_num_splits, paged_decode, store_kv
from tandem.engine.attention.triton_paged_prefill import launch_config, paged_prefill, prefill_tiles

_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_ALL_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *_PREFILL_BACKENDS]
_CUDNN_FROM_TOKENS = 4096


class TritonAttentionBackend(TorchAttentionBackend):
    """Paged Triton decode and prefill (CUDA; on CPU only under ``TRITON_INTERPRET=1``)."""

    SDPA_FROM_TOKENS = 2048
    """A lone no-context prompt chunk at least this long runs SDPA (flash/cuDNN) on its own K/V."""

    def __init__(self) -> None:
        self._num_sms: int | None = None

    def prefills_into(self, out, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, window):
        """Every prompt chunk of the step in one launch of the paged prefill kernel (or SDPA for
        a lone long chunk with nothing cached before it)."""
        nd = meta.num_decodes
        qsl = meta.query_start_loc_cpu
        if self._sdpa_prefill(meta, window):
            rows = slice(qsl[nd], qsl[nd + 1])
            out[rows] = self.prefill(
                q[rows], k[rows], v[rows], k_cache, v_cache, meta, nd, scale, window
            )
            return
        tiles = meta.scratch.get("prefill_tiles")
        if tiles is None:  # once per step, shared by every layer
            block_q = launch_config(q.shape[-1], q.shape[1] // k_cache.shape[-2])[0]
            tiles = meta.scratch["prefill_tiles"] = prefill_tiles(
                qsl, meta.seq_lens_cpu, nd, block_q, q.device
            )
        paged_prefill(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            tiles,
            scale=scale,
            window=window,
            out=out,
        )

    def _sdpa_prefill(self, meta: AttentionMetadata, window: int | None) -> bool:
        """Whether the step's prefill is one long chunk with nothing cached before it."""
        nd = meta.num_decodes
        if window is not None or meta.num_seqs != nd + 1:
            return False
        qsl = meta.query_start_loc_cpu
        qlen = qsl[nd + 1] - qsl[nd]
        return qlen >= self.SDPA_FROM_TOKENS and meta.seq_lens_cpu[nd] == qlen

    def num_splits(
        self, batch: int, num_kv_heads: int, max_context: int, block_size: int, device
    ) -> int:
        if self._num_sms is None:
            self._num_sms = (
                torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda"
                else 4
            )
        return choose_num_splits(batch, num_kv_heads, max_context, block_size, self._num_sms)

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def decode_into(self, out, q, k_cache, v_cache, meta: AttentionMetadata, scale, window) -> None:
        splits = meta.scratch.get("num_splits")
        if splits is None:  # once per step (a CUDA graph bakes it in at capture)
            max_context = meta.block_tables.shape[1] * meta.block_size
            splits = meta.scratch["num_splits"] = self.num_splits(
                len(q), k_cache.shape[-2], max_context, meta.block_size, q.device
            )
        nd = len(q)
        paged_decode(
            q,
            k_cache,
            v_cache,
            meta.block_tables[:nd],
            meta.seq_lens[:nd],
            scale=scale,
            window=window,
            num_splits=splits,
            out=out,
        )

    def prefill(
        self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, i, scale, window
    ) -> torch.Tensor:
        """A long chunk with no cached context: causal flash attention on its own K/V. Below
        ``_CUDNN_FROM_TOKENS`` this avoids cuDNN (a plan per new length, tens of ms each); longer
        chunks amortise that and gain from its Hopper kernels (~20 % at 32k tokens)."""
        with sdpa_kernel(_PREFILL_BACKENDS if len(q) < _CUDNN_FROM_TOKENS else _ALL_BACKENDS):
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
        return o[0].transpose(0, 1)
