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
        if meta.seq_lens_cpu[i] == len(q) and window is None:
            # The whole context is this chunk: causal flash attention on its own K/V. Short
            # chunks avoid cuDNN, which builds a plan per new length (tens of ms each); long
            # ones amortise that and gain from its Hopper kernels (~20% at 32k tokens).
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
        with sdpa_kernel(_PREFILL_BACKENDS):
            return self._prefill(q, k_cache, v_cache, meta, i, scale, window)
