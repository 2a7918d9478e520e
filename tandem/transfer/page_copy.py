"""One Triton kernel that copies KV pages between two pools by block id: ``dst[l, kv,
dst_ids[i]] = src[l, kv, src_ids[i]]`` for a group of layers, in one pass.

The cuda-ipc transport's write (the destination is another process's pool, mapped). torch's
``index_select`` + ``index_copy_`` do the same in two passes through a temporary and reach a
fifth of a plain device copy's bandwidth on these 16-64 KiB pages (H100, bench/NOTES.md); this
reads and writes each byte once. Pools are ``[layers, 2, blocks, block_size, kv_heads,
head_dim]`` and contiguous, so a page is ``block_size * kv_heads * head_dim`` consecutive
elements. Runs under ``TRITON_INTERPRET=1`` on CPU, which is how CI tests it.
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_pairs", "l0", "src_nblocks", "dst_nblocks"])
def _copy_pages_kernel(
    src_ptr,
    dst_ptr,
    src_ids_ptr,
    dst_ids_ptr,
    n_pairs,
    l0,
    src_nblocks,
    dst_nblocks,
    PAGE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)  # (layer in the group, K|V, pair)
    chunk = tl.program_id(1)  # BLOCK elements of the page
    pair = pid % n_pairs
    lk = pid // n_pairs
    plane = (l0 * 2 + lk).to(tl.int64)  # layer * 2 + kv
    s = tl.load(src_ids_ptr + pair).to(tl.int64)
    d = tl.load(dst_ids_ptr + pair).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PAGE
    x = tl.load(src_ptr + (plane * src_nblocks + s) * PAGE + offs, mask=mask)
    tl.store(dst_ptr + (plane * dst_nblocks + d) * PAGE + offs, x, mask=mask)


def copy_pages(
    src: torch.Tensor,
    src_ids: torch.Tensor,
    dst: torch.Tensor,
    dst_ids: torch.Tensor,
    layers: tuple[int, int],
) -> None:
    """Copy pages of ``layers`` from ``src``'s blocks ``src_ids`` to ``dst``'s ``dst_ids`` (on the
    current stream). Both pools contiguous, same page shape and dtype, ids on the pools' device;
    the caller checked the ids are in range."""
    if src.dtype != dst.dtype or src.shape[3:] != dst.shape[3:] or src.shape[:2] != dst.shape[:2]:
        raise ValueError("the two pools' pages differ")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("pools must be contiguous")
    n = len(src_ids)
    l0, l1 = layers
    if n == 0 or l1 <= l0:
        return
    page = src.shape[3] * src.shape[4] * src.shape[5]
    block = min(4096, triton.next_power_of_2(page))
    grid = ((l1 - l0) * 2 * n, triton.cdiv(page, block))
    _copy_pages_kernel[grid](
        src,
        dst,
        src_ids,
        dst_ids,
        n,
        l0,
        src.shape[2],
        dst.shape[2],
        PAGE=page,
        BLOCK=block,
    )
