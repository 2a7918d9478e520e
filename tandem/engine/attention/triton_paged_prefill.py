"""Varlen paged prefill attention in Triton: every prompt chunk of a step in one launch, K/V read
in place through the block tables.

A step's prefill rows are the chunks of several sequences, each possibly after cached context
(prefix-cache hits, earlier chunks, a sliding window). Program ``(tile, kv_head)`` takes
``BLOCK_Q`` query tokens of one sequence and all ``GROUP`` query heads that share ``kv_head``
(GQA packed into the rows of one ``[BLOCK_Q * GROUP_PAD, D]`` tile, so each K/V page is loaded
once per group), and walks that sequence's pages from the window's start to its last query's
position with a FlashAttention-2 online softmax. Memory is O(tokens): no ``[q, ctx]`` scores,
no gathered copy of the context.

Two loops per tile: the pages every query of the tile sees in full (no mask), then the pages
along the causal diagonal (masked); under a sliding window every page is masked.

Shapes: q, out [T, Hq, D] (the step's rows); k_cache, v_cache [num_blocks, block_size, Hkv, D]
(one layer's pages); block_tables [S, max_blocks]; seq_lens [S] (tokens in the cache after this
step); query_start_loc [S + 1]; tiles: per tile its sequence and first query of the chunk.
Runs under ``TRITON_INTERPRET=1`` on CPU too, which is how CI tests the kernel's logic.
"""

from dataclasses import dataclass

import numpy as np
import triton
import triton.language as tl


@triton.jit
def _scalar(ptr):
    """One int64 scalar from ``ptr`` (a plain load is a block of one under the interpreter)."""
    return tl.sum(tl.load(ptr + tl.arange(0, 1)), 0).to(tl.int64)


@triton.jit
def _attend_pages(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    table_row,
    q_pos,
    kv_lo,
    kv_hi,
    qk_scale,
    window,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    dims = tl.arange(0, HEAD_DIM)
    offs = tl.arange(0, BLOCK_N)
    for start in tl.range(kv_lo, kv_hi, BLOCK_N):
        kpos = start + offs
        if MASKED:
            kv_ok = kpos < kv_hi
            page = tl.load(table_row + kpos // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
        else:  # whole iterations of keys every query sees: no bounds, no mask
            page = tl.load(table_row + kpos // BLOCK_SIZE).to(tl.int64)
        slot = (kpos % BLOCK_SIZE).to(tl.int64)
        k_ptrs = k_base + page[:, None] * stride_kb + slot[:, None] * stride_kt + dims[None, :]
        v_ptrs = v_base + page[:, None] * stride_vb + slot[:, None] * stride_vt + dims[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        # Scores in base 2: qk_scale is the softmax scale times log2(e), so exp2 stands in for exp.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * qk_scale
        if MASKED:
            seen = kv_ok[None, :] & (kpos[None, :] <= q_pos[:, None])
            if window > 0:
                seen = seen & (kpos[None, :] > q_pos[:, None] - window)
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen nothing yet (all -inf) keeps a finite reference of 0.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
            v = tl.load(v_ptrs)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(
            tl.float32
        )
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["window", "stride_tb"])
def _paged_prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    tables_ptr,
    lens_ptr,
    qsl_ptr,
    tile_seq_ptr,
    tile_q0_ptr,
    scale,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_tb,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _scalar(tile_seq_ptr + tile)
    q0 = _scalar(tile_q0_ptr + tile)
    row0 = _scalar(qsl_ptr + seq)
    qlen = _scalar(qsl_ptr + seq + 1) - row0
    seq_len = _scalar(lens_ptr + seq)
    context = seq_len - qlen  # tokens cached before this chunk

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // GROUP_PAD  # query index within the chunk
    head = rows % GROUP_PAD
    row_ok = (tok < qlen) & (head < GROUP)
    q_pos = context + tok
    dims = tl.arange(0, HEAD_DIM)
    q_off = (row0 + tok)[:, None] * stride_qt + (kv_head * GROUP + head)[:, None] * stride_qh
    q = tl.load(q_ptr + q_off + dims[None, :], mask=row_ok[:, None], other=0.0)
    qk_scale = scale * 1.4426950408889634  # log2(e)

    first_pos = context + q0
    last_pos = tl.minimum(context + q0 + BLOCK_Q, seq_len) - 1
    # [kv_lo, full_hi): keys every query of the tile sees (at or before the first query), in
    # whole iterations; the rest, up to the last query, needs the causal mask. Under a sliding
    # window the tile's keys are masked at both ends: all of them go through the masked loop.
    kv_lo = first_pos * 0
    full_hi = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    if window > 0:
        kv_lo = tl.maximum(first_pos - window + 1, 0)
        full_hi = kv_lo

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table_row = tables_ptr + seq * stride_tb
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    acc, m_i, l_i = _attend_pages(
        acc, m_i, l_i, q, k_base, v_base, table_row, q_pos, kv_lo, full_hi, qk_scale, window,
        stride_kb, stride_kt, stride_vb, stride_vt,
        False, HEAD_DIM, BLOCK_SIZE, BLOCK_N, PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_pages(
        acc, m_i, l_i, q, k_base, v_base, table_row, q_pos, full_hi, last_pos + 1, qk_scale, window,
        stride_kb, stride_kt, stride_vb, stride_vt,
        True, HEAD_DIM, BLOCK_SIZE, BLOCK_N, PRECISION,
    )  # fmt: skip
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (row0 + tok)[:, None] * stride_ot + (kv_head * GROUP + head)[:, None] * stride_oh
    tl.store(out_ptr + o_off + dims[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True, slots=True)
class PrefillTiles:
    """Which query tokens each program takes: built once per step on the host (numpy), uploaded
    once, shared by every layer."""

    seq: object
    """[tiles] int32 device tensor: the tile's sequence (an index into the step's tables)."""
    q0: object
    """[tiles] int32 device tensor: the tile's first query within its sequence's chunk."""
    block_q: int

    @property
    def count(self) -> int:
        return len(self.seq)


def launch_config(head_dim: int, group: int, itemsize: int = 2) -> tuple[int, int, int, int]:
    """(query tokens per tile, keys per iteration, num_warps, num_stages) for a head size and
    element size.

    A tile holds ``BLOCK_Q * next_pow2(group)`` rows: 128 for head_dim <= 128, 64 above (the
    register file), never fewer query tokens than one.
    """
    group_pad = triton.next_power_of_2(group)
    rows = 128 if head_dim <= 128 else 64
    block_q = max(1, rows // group_pad)
    # bench/prefill_attention.py --sweep on an H100 (bench/NOTES.md): 128 keys an iteration, 8
    # warps, 2 stages was best or within 3 % for 2k chunks after 6k and 30k cached tokens.
    block_n = 128 if head_dim <= 128 else 32
    if itemsize >= 4:  # float32 tiles: twice the shared memory (128 keys x 128 dims overflow it)
        block_n = min(block_n, 32)
    return block_q, block_n, 8 if block_q * group_pad >= 128 else 4, 2


def prefill_tiles(
    query_start_loc: list[int], seq_lens: list[int], first_seq: int, block_q: int, device
) -> PrefillTiles:
    """Tiles of ``block_q`` query tokens over sequences ``first_seq..``: the longest-context
    tiles first (they take longest; starting them first evens out the tail)."""
    from tandem.engine.uploads import upload

    qsl = np.asarray(query_start_loc, dtype=np.int64)
    qlens = np.diff(qsl)[first_seq:]
    lens = np.asarray(seq_lens, dtype=np.int64)[first_seq:]
    per_seq = -(-qlens // block_q)
    seq = np.repeat(np.arange(first_seq, first_seq + len(qlens)), per_seq)
    starts = np.zeros(len(per_seq) + 1, dtype=np.int64)
    np.cumsum(per_seq, out=starts[1:])
    q0 = (np.arange(len(seq)) - starts[:-1][seq - first_seq]) * block_q
    reach = (lens - qlens)[seq - first_seq] + np.minimum(q0 + block_q, qlens[seq - first_seq])
    order = np.argsort(-reach, kind="stable")
    # Through pinned memory: a copy from pageable memory would wait for the step in flight.
    both = upload(np.stack([seq[order], q0[order]]).astype(np.int32), device)
    return PrefillTiles(seq=both[0], q0=both[1], block_q=block_q)


def paged_prefill(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    tiles: PrefillTiles,
    *,
    scale: float,
    window: int | None,
    out,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Attention of the step's prefill rows (those ``tiles`` cover) over their paged context,
    written into ``out`` (rows outside the tiles are left alone). K/V of the new tokens must
    already be in the cache."""
    import torch

    if tiles.count == 0:
        return out
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    _, default_n, default_warps, default_stages = launch_config(head_dim, group, q.element_size())
    _paged_prefill_kernel[(tiles.count, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        tiles.seq,
        tiles.q0,
        scale,
        window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_Q=tiles.block_q,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=block_n or default_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or default_warps,
        num_stages=num_stages or default_stages,
    )
    return out
