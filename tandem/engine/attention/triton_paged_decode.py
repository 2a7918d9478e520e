"""Paged decode attention in Triton: one query token per sequence, KV read in place through block
tables.

Split-KV ("flash-decoding"): program ``(b, kv_head, split)`` attends all query heads of one GQA
group over one slice of sequence ``b``'s pages with an online softmax, and writes a partial
(running max, sum, weighted values) in float32; a second kernel merges the splits. With few
sequences (batch 1 at long context) the splits keep every SM reading; with many, one split each.
Every K/V byte of the context is read once per step, which makes the kernel bandwidth-bound.

Shapes: q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (one layer's pages);
block_tables [B, max_blocks] int; seq_lens [B] int (0: a padding row, whose output is 0).
The grid depends only on B and the split count, never on the lengths: CUDA graphs can capture it.
Runs under ``TRITON_INTERPRET=1`` on CPU too, which is how CI tests the kernel's logic.
"""

import triton
import triton.language as tl


# Integers that change from step to step (table width, split count, window) must not make Triton
# compile a variant per value class (1, multiple of 16, other) in the middle of serving.
@triton.jit(do_not_specialize=["window", "stride_tb", "num_splits"])
def _paged_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    scale,
    window,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_tb,
    num_splits,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.sum(tl.load(lens_ptr + b + tl.arange(0, 1)), 0).to(
        tl.int32
    )  # a scalar (interpreter too)
    num_pages = tl.cdiv(seq_len, BLOCK_SIZE)
    pages_per_split = tl.cdiv(num_pages, num_splits)
    tok_start = split * pages_per_split * BLOCK_SIZE
    tok_end = tl.minimum((split + 1) * pages_per_split * BLOCK_SIZE, seq_len)
    if window > 0:  # sliding window: only the last `window` positions are visible
        tok_start = tl.maximum(tok_start, seq_len - window)

    heads = tl.arange(0, GROUP_PAD)
    head_ok = heads < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + b * stride_qb + (kv_head * GROUP + heads)[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_rows, mask=head_ok[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    offs = tl.arange(0, TILE)
    for start in tl.range(tok_start, tok_end, TILE):
        tok = start + offs
        tok_ok = tok < tok_end
        page = tl.load(tables_ptr + b * stride_tb + tok // BLOCK_SIZE, mask=tok_ok, other=0).to(
            tl.int64
        )
        slot = tok % BLOCK_SIZE
        k = tl.load(
            k_ptr
            + page[:, None] * stride_kb
            + slot[:, None] * stride_kt
            + kv_head * stride_kh
            + dims[None, :],
            mask=tok_ok[:, None],
            other=0.0,
        )
        s = (
            tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        )  # [GROUP_PAD, TILE]
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr
            + page[:, None] * stride_vb
            + slot[:, None] * stride_vt
            + kv_head * stride_vh
            + dims[None, :],
            mask=tok_ok[:, None],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(
            tl.float32
        )
        m_i = m_new

    # Partials: [B, Hq, num_splits, (D | 1)] float32.
    row = (b * (GROUP * tl.num_programs(1)) + kv_head * GROUP + heads) * num_splits + split
    tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_ok[:, None])
    tl.store(part_max_ptr + row, m_i, mask=head_ok)
    tl.store(part_sum_ptr + row, l_i, mask=head_ok)


@triton.jit(do_not_specialize=["num_heads", "num_splits"])
def _merge_splits_kernel(
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    ok = splits < num_splits
    rows = (b * num_heads + h) * num_splits + splits
    m = tl.load(part_max_ptr + rows, mask=ok, other=float("-inf"))
    sums = tl.load(part_sum_ptr + rows, mask=ok, other=0.0)
    m_all = tl.max(m, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)  # an empty sequence: every split is empty
    w = tl.where(ok & (m > float("-inf")), tl.exp(m - m_safe), 0.0)
    total = tl.sum(sums * w, 0)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(
        part_acc_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0
    )
    o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dims, o.to(out_ptr.dtype.element_ty))


def launch_config(head_dim: int, block_size: int) -> tuple[int, int, int]:
    """(tile, num_warps, num_stages) of the split kernel for a head size.

    From bench/tune_paged_decode.py on an H100 (bench/NOTES.md): with 128-wide heads, 128-token
    tiles and a 2-stage pipeline were within 4 % of each case's best on average (the previous
    64 / 4 / 3 was 17 % off); with 64-wide heads no configuration was consistently better.
    """
    if head_dim >= 128:
        return max(128, block_size), 4, 2
    return max(64, block_size), 4, 3


def paged_decode(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    *,
    scale: float,
    window: int | None,
    num_splits: int,
    out=None,
    tile: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Attention of one new token per sequence over its paged context -> [B, Hq, D] in q's dtype.

    ``tile`` (tokens per loop iteration), ``num_warps`` and ``num_stages`` are the launch's
    tuning knobs; unset, ``launch_config`` picks them (bench/tune_paged_decode.py sweeps them).
    """
    import torch

    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    # Per call: the caching allocator makes this cheap, eager steps give it back, and inside a
    # graph capture it lands in (and lives with) the graph's pool.
    part_acc = torch.empty(
        (batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
    )
    part_max = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    part_sum = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    block_size = k_cache.shape[1]
    default_tile, default_warps, default_stages = launch_config(head_dim, block_size)
    tile, num_warps, num_stages = (
        tile or default_tile,
        num_warps or default_warps,
        num_stages or default_stages,
    )
    _paged_decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        part_acc,
        part_max,
        part_sum,
        scale,
        window or 0,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        num_splits,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE=tile,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays exact (no TF32)
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _merge_splits_kernel[(batch, num_heads)](
        part_acc,
        part_max,
        part_sum,
        out,
        out.stride(0),
        out.stride(1),
        num_heads,
        num_splits,
        HEAD_DIM=head_dim,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
    )
    return out


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    stride_kt,
    stride_vt,
    row_size,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < row_size
    slot = tl.sum(tl.load(slots_ptr + token + tl.arange(0, 1)), 0).to(tl.int64)
    tl.store(
        k_cache_ptr + slot * row_size + cols,
        tl.load(k_ptr + token * stride_kt + cols, mask=ok),
        mask=ok,
    )
    tl.store(
        v_cache_ptr + slot * row_size + cols,
        tl.load(v_ptr + token * stride_vt + cols, mask=ok),
        mask=ok,
    )


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Write k, v [T, Hkv, D] into the caches' slots (one kernel for both, instead of two
    copies)."""
    tokens = k.shape[0]
    if tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    block = min(1024, triton.next_power_of_2(row))
    _store_kv_kernel[(tokens, triton.cdiv(row, block))](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), row, BLOCK=block
    )


def choose_num_splits(
    batch: int, num_kv_heads: int, max_context: int, block_size: int, num_sms: int
) -> int:
    """Splits per sequence: enough programs to fill the GPU twice over, each with 4+ pages to
    read."""
    if batch * num_kv_heads >= 2 * num_sms:
        return 1
    wanted = -(-2 * num_sms // (batch * num_kv_heads))
    most = max(1, -(-max_context // (4 * block_size)))
    return max(1, min(wanted, most, 64))
