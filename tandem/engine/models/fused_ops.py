"""Fused elementwise kernels (Triton) for the half-precision CUDA path.

The kernels: RMSNorm; residual add + RMSNorm (the residual stream's add fused into the next
norm, as vLLM's ``fused_add_rms_norm``); rotary of q and k fused with the write of k and v
into the paged KV cache; SiLU-and-mul. Unfused, each of these is 3-10 PyTorch kernels per
layer; at decode batch sizes they are tiny and their count, not their bytes, sets their cost
(and their launches dominate an eager prefill's host time). Each kernel here reads its inputs
once and writes once. They compute in float32 like the reference ops, but round differently in
places, so they are used for bfloat16/float16 only: float32 keeps PyTorch's exact ops (the
parity mode against transformers).

Every tensor's last dimension must be contiguous; rows and heads may be strided (views of a
fused projection's output). Outputs are new tensors: nothing is written in place except the
KV cache.
"""

import torch
import triton
import triton.language as tl


def use_fused(x: torch.Tensor) -> bool:
    """Fused kernels for half precision on CUDA; the exact PyTorch ops elsewhere."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 past ~2^31 elements
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    # As transformers: normalise in float32, round to the input dtype, then scale by the weight.
    y = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty_like(x2)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            weight,
            out,
            x2.stride(0),
            out.stride(0),
            shape[-1],
            eps,
            BLOCK=triton.next_power_of_2(shape[-1]),
        )
    return out.view(shape)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    # As PyTorch's half add: the sum in float32, rounded once to the dtype; the norm reads the
    # rounded sum (the residual stream's value), then rounds exactly as _rms_norm_kernel does.
    s = (x + r).to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * stride_ro + cols, s, mask=ok)
    s = s.to(tl.float32)
    inv = tl.rsqrt(tl.sum(s * s, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = (s * inv).to(out_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual_out = x + residual``, then RMSNorm of it, in one pass over the rows.

    Args:
        x: [..., hidden], the block's output (attention or MLP).
        residual: the residual stream, the same shape and dtype as ``x``.
        weight: [hidden] RMSNorm weight.
        eps: RMSNorm epsilon.

    Returns:
        ``(normed, residual_out)``: the next block's input and the updated residual stream,
        both new contiguous tensors of ``x``'s shape.
    """
    shape = x.shape
    x2, r2 = x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1])
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out,
            res_out,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            res_out.stride(0),
            shape[-1],
            eps,
            BLOCK=triton.next_power_of_2(shape[-1]),
        )
    return out.view(shape), res_out.view(shape)


@triton.jit
def _rotary_and_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    stride_kcs,
    stride_kch,
    stride_vcs,
    stride_vch,
    num_q_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF)[None, :]
    c = tl.load(cos_ptr + token * stride_cos + dims).to(tl.float32)
    s = tl.load(sin_ptr + token * stride_sin + dims).to(tl.float32)

    # q: every head rotated into q_out (contiguous [T, Hq, 2 * HALF]); float32 math, rounded once
    # (cos/sin rows are [cos(f), cos(f)] for the two halves: the rotate-half convention).
    qh = tl.arange(0, Q_HEADS_PAD)[:, None]
    q_ok = qh < num_q_heads
    src = q_ptr + token * stride_qt + qh * stride_qh
    x1 = tl.load(src + dims, mask=q_ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + dims, mask=q_ok, other=0.0).to(tl.float32)
    dst = q_out_ptr + token * num_q_heads * 2 * HALF + qh * 2 * HALF
    tl.store(dst + dims, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty), mask=q_ok)
    tl.store(dst + HALF + dims, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty), mask=q_ok)

    # k: rotated into k_out and into the cache slot; v: copied into the cache slot as it is.
    slot = tl.sum(tl.load(slots_ptr + token + tl.arange(0, 1)), 0).to(
        tl.int64
    )  # a scalar (interpreter too)
    kh = tl.arange(0, KV_HEADS_PAD)[:, None]
    k_ok = kh < num_kv_heads
    src = k_ptr + token * stride_kt + kh * stride_kh
    x1 = tl.load(src + dims, mask=k_ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + dims, mask=k_ok, other=0.0).to(tl.float32)
    y1 = (x1 * c - x2 * s).to(k_out_ptr.dtype.element_ty)
    y2 = (x2 * c + x1 * s).to(k_out_ptr.dtype.element_ty)
    dst = k_out_ptr + token * num_kv_heads * 2 * HALF + kh * 2 * HALF
    tl.store(dst + dims, y1, mask=k_ok)
    tl.store(dst + HALF + dims, y2, mask=k_ok)
    dst = k_cache_ptr + slot * stride_kcs + kh * stride_kch
    tl.store(dst + dims, y1.to(k_cache_ptr.dtype.element_ty), mask=k_ok)
    tl.store(dst + HALF + dims, y2.to(k_cache_ptr.dtype.element_ty), mask=k_ok)
    full = tl.arange(0, 2 * HALF)[None, :]
    val = tl.load(v_ptr + token * stride_vt + kh * stride_vh + full, mask=k_ok, other=0.0)
    tl.store(
        v_cache_ptr + slot * stride_vcs + kh * stride_vch + full,
        val.to(v_cache_ptr.dtype.element_ty),
        mask=k_ok,
    )


def rotary_and_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k and write rotated k and v into their cache slots: one kernel for the three.

    Args:
        q: [T, Hq, D] queries; D a power of two.
        k, v: [T, Hkv, D] keys and values (q, k and v may be strided views of one projection).
        cos, sin: [T, 1, D] (rotate-half convention, as ``RotaryEmbedding`` makes them).
        k_cache, v_cache: [num_blocks, block_size, Hkv, D], one layer's pages.
        slot_mapping: [T] contiguous int64 flat slots (block_id * block_size + offset).
            Distinct, except padding rows that share a scratch slot (whose content is then
            undefined: the rows race).

    Returns:
        ``(q_rot, k_rot)``, new contiguous tensors (prefills attend over the chunk's own k).
    """
    tokens, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    q_out = torch.empty((tokens, q_heads, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, kv_heads, dim), dtype=k.dtype, device=k.device)
    if tokens:
        cos2, sin2 = cos.reshape(tokens, dim), sin.reshape(tokens, dim)
        kc, vc = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
        _rotary_and_store_kernel[(tokens,)](
            q,
            k,
            v,
            cos2,
            sin2,
            kc,
            vc,
            slot_mapping,
            q_out,
            k_out,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            cos2.stride(0),
            sin2.stride(0),
            kc.stride(0),
            kc.stride(1),
            vc.stride(0),
            vc.stride(1),
            q_heads,
            kv_heads,
            HALF=dim // 2,
            Q_HEADS_PAD=triton.next_power_of_2(q_heads),
            KV_HEADS_PAD=triton.next_power_of_2(kv_heads),
        )
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=ok, other=0.0).to(tl.float32)
    # As PyTorch: silu rounded to the dtype, then the product rounded again.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2n] = [gate | up] -> silu(gate) * up [T, n]."""
    tokens, width = x.shape
    n = width // 2
    out = torch.empty((tokens, n), dtype=x.dtype, device=x.device)
    if tokens:
        block = 1024
        _silu_and_mul_kernel[(tokens, triton.cdiv(n, block))](
            x, out, x.stride(0), out.stride(0), n, BLOCK=block
        )
    return out
