"""GPU attention backend: a Triton paged-decode kernel, flash attention for prefills.

Decodes (one new token each, the batch's leading rows) read K/V in place through the block
tables (``triton_paged_decode``): no gather, one pass over the context at memory bandwidth, and
only device tensors, so a decode-only step can be captured in a CUDA graph. A prefill chunk
with no cached context runs SDPA's causal flash kernel on its own K/V (no cache read at all);
a chunk after cached prefix blocks, or under a sliding window, gathers its pages and runs SDPA
with an explicit mask (the reference backend's path: the gather costs little next to the
prefill's FLOPs).
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tandem.engine.attention.backend import AttentionMetadata
from tandem.engine.attention.torch_backend import TorchAttentionBackend
from tandem.engine.attention.triton_paged_decode import choose_num_splits, paged_decode, store_kv


_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_ALL_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *_PREFILL_BACKENDS]
_CUDNN_FROM_TOKENS = 4096


class TritonAttentionBackend(TorchAttentionBackend):
    """Paged Triton decode + SDPA prefill (CUDA; on CPU only under ``TRITON_INTERPRET=1``)."""

    def __init__(self) -> None:
        self._num_sms: int | None = None

    def num_splits(self, batch: int, num_kv_heads: int, max_context: int, block_size: int, device) -> int:
        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                             if device.type == "cuda" else 4)
        return choose_num_splits(batch, num_kv_heads, max_context, block_size, self._num_sms)

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, *, scale: float, sliding_window):
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        num_kv_heads = k_cache.shape[-2]
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            splits = meta.scratch.get("num_splits")
            if splits is None:
                max_context = meta.block_tables.shape[1] * meta.block_size
                splits = meta.scratch["num_splits"] = self.num_splits(
                    nd, num_kv_heads, max_context, meta.block_size, q.device)
            paged_decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale=scale,
                         window=sliding_window, num_splits=splits, out=out[:nd])
        qsl = meta.query_start_loc_cpu
        for i in range(nd, meta.num_seqs):
            start, end = qsl[i], qsl[i + 1]
            if meta.seq_lens_cpu[i] == end - start and sliding_window is None:
                # The whole context is this chunk: causal flash attention on its own K/V. Short
                # chunks avoid cuDNN, which builds a plan per new length (tens of ms each); long
                # ones amortise that and gain from its Hopper kernels (~20% at 32k tokens).
                with sdpa_kernel(_PREFILL_BACKENDS if end - start < _CUDNN_FROM_TOKENS else _ALL_BACKENDS):
                    o = F.scaled_dot_product_attention(
                        q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None],
                        v[start:end].transpose(0, 1)[None], is_causal=True, scale=scale, enable_gqa=True)
                out[start:end] = o[0].transpose(0, 1)
            else:
                with sdpa_kernel(_PREFILL_BACKENDS):
                    out[start:end] = self._prefill(q[start:end], k_cache, v_cache, meta, i, scale, sliding_window)
        return out
