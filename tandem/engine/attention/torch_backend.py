"""Reference attention backend in plain PyTorch (CPU and GPU).

Decodes are batched: their pages are gathered into a padded ``[B, L, H, D]`` tensor and one
masked SDPA call attends all of them. Each prefill sequence (a prompt chunk, possibly after
cached prefix blocks) gathers its own pages and runs one SDPA call with a causal mask offset by
its context. Correct everywhere, not fast: the GPU backend replaces the gathers.
"""

import torch
import torch.nn.functional as F

from tandem.engine.attention.backend import AttentionMetadata


class TorchAttentionBackend:
    """Gather-then-SDPA attention over the paged cache (the reference every backend must match)."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if not kv_stored:
            self.store(k, v, k_cache, v_cache, meta)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self.decode_into(out[:nd], q[:nd], k_cache, v_cache, meta, scale, sliding_window)
        if nd < meta.num_seqs:
            self.prefills_into(out, q, k, v, k_cache, v_cache, meta, scale, sliding_window)
        return out

    # The steps of a forward; other backends override them.

    def prefills_into(self, out, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, window):
        """Attention of every prompt chunk of the step (sequences ``num_decodes..``), into
        ``out``: here one ``prefill`` call per sequence."""
        qsl = meta.query_start_loc_cpu
        for i in range(meta.num_decodes, meta.num_seqs):
            rows = slice(qsl[i], qsl[i + 1])
            out[rows] = self.prefill(
                q[rows], k[rows], v[rows], k_cache, v_cache, meta, i, scale, window
            )

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
        """Write this step's K/V into their cache slots."""
        num_kv_heads, head_dim = k_cache.shape[-2:]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

    def decode_into(self, out, q, k_cache, v_cache, meta: AttentionMetadata, scale, window) -> None:
        """Attention of the leading one-token rows, into ``out``."""
        out[:] = self._decode(q, k_cache, v_cache, meta, scale, window)

    def prefill(
        self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, i, scale, window
    ) -> torch.Tensor:
        """Attention of sequence ``i``'s chunk (``k``/``v``: its new rows, already in the cache)."""
        return self._prefill(q, k_cache, v_cache, meta, i, scale, window)

    @staticmethod
    def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """[..., nb] block ids -> [..., nb * block_size, H, D] tokens."""
        pages = cache[block_ids]
        return pages.flatten(-4, -3)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, window):
        nd = meta.num_decodes
        bs = meta.block_size
        max_len = max(meta.seq_lens_cpu[:nd])
        nb = -(-max_len // bs)
        table = meta.block_tables[:nd, :nb]
        keys = self._gather(k_cache, table).transpose(1, 2)  # [nd, H, L, D]
        values = self._gather(v_cache, table).transpose(1, 2)
        mask = meta.scratch.get(("decode", window))
        if mask is None:
            lens = meta.seq_lens[:nd, None]
            pos = torch.arange(nb * bs, device=q.device)[None, :]
            mask = pos < lens
            if window is not None:
                mask &= pos >= lens - window
            mask = meta.scratch[("decode", window)] = mask[:, None, None, :]
        o = F.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
        return o[:, :, 0, :]

    def _prefill(self, q, k_cache, v_cache, meta: AttentionMetadata, i, scale, window):
        bs = meta.block_size
        ctx = meta.seq_lens_cpu[i]
        qlen = q.shape[0]
        nb = -(-ctx // bs)
        table = meta.block_tables[i, :nb]
        keys = self._gather(k_cache, table)[:ctx].transpose(0, 1)[None]  # [1, H, ctx, D]
        values = self._gather(v_cache, table)[:ctx].transpose(0, 1)[None]
        mask = meta.scratch.get(("prefill", i, window))
        if mask is None:
            q_pos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
            k_pos = torch.arange(ctx, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            meta.scratch[("prefill", i, window)] = mask
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
        return o[0].transpose(0, 1)
