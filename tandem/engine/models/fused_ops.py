"""Fused elementwise kernels (Triton) for the half-precision CUDA path: RMSNorm, rotary, SiLU-and-mul.

Unfused, each of these is 3-10 PyTorch kernels per layer; at decode batch sizes they are tiny and
their count, not their bytes, sets their cost (and their launches dominate an eager prefill's
host time). Each kernel here reads its inputs once and writes once. They compute in float32
like the reference ops, but round differently in places, so they are used for bfloat16/float16
only: float32 keeps PyTorch's exact ops (the parity mode against transformers).
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
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), shape[-1], eps,
                                         BLOCK=triton.next_power_of_2(shape[-1]))
    return out.view(shape)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_ot, stride_oh,
                   stride_ct, num_heads, HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    ok = heads < num_heads
    base = x_ptr + token * stride_xt + heads * stride_xh
    x1 = tl.load(base + dims, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + dims, mask=ok, other=0.0).to(tl.float32)
    # cos/sin rows are [cos(f), cos(f)] for the two halves (rotate-half convention).
    c = tl.load(cos_ptr + token * stride_ct + dims).to(tl.float32)
    s = tl.load(sin_ptr + token * stride_ct + dims).to(tl.float32)
    obase = out_ptr + token * stride_ot + heads * stride_oh
    tl.store(obase + dims, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(obase + HALF + dims, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=ok)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by cos/sin [T, 1, D] (rotate-half convention) into a new tensor."""
    tokens, heads, dim = x.shape
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        cos2, sin2 = cos.reshape(tokens, dim), sin.reshape(tokens, dim)
        _rotary_kernel[(tokens,)](x, cos2, sin2, out, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                                  cos2.stride(0), heads, HALF=dim // 2, HEADS_PAD=triton.next_power_of_2(heads))
    return out


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
        _silu_and_mul_kernel[(tokens, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block)
    return out
