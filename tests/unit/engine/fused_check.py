"""Checks ``fused_ops``' residual add + RMSNorm and rotary + KV store against the reference ops.

Imported by the CPU test (in a subprocess with TRITON_INTERPRET=1, so Triton runs its
interpreter) and by the GPU test (compiled kernels on CUDA). The CPU test checks float32 and
float16 only: the interpreter runs bfloat16 kernels, but its float32 -> bfloat16 casts truncate
instead of rounding to nearest even, so the exact-rounding checks below would fail there.

Under the interpreter (NumPy, deterministic) the new kernels must also be bit-equal to the
unfused kernels they replace (``rms_norm`` of the rounded sum, ``rotary``): that pins their
rounding, which a tolerance cannot. Compiled kernels may contract or schedule float math
differently, so on a GPU only the tolerance against the reference ops applies.
"""

import torch

from tandem.engine.models import fused_ops
from tandem.engine.models.rope import apply_rotary

NORM_CASES = [
    # (rows, hidden): a power of two, a padded hidden size, one row (decode), no rows
    (7, 64),
    (5, 96),
    (1, 48),
    (0, 32),
]

ROTARY_CASES = [
    # (block_size, tokens, Hq, Hkv, D, padding rows on the scratch slot)
    (16, 5, 4, 2, 32, 0),
    (16, 1, 8, 8, 64, 3),  # a decode, no GQA, CUDA-graph padding rows
    (32, 7, 6, 2, 16, 0),  # Hq not a power of two
    (32, 40, 4, 1, 32, 2),  # more tokens than a block
]


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    """float32: the reference's own rounding; half: two units in the last place (and eps near 0)."""
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    eps = torch.finfo(dtype).eps
    return {"rtol": 2 * eps, "atol": eps}


def check_add_rms_norm(
    rows, hidden, *, device="cpu", dtype=torch.float32, seed=0, eps=1e-5
) -> None:
    """``add_rms_norm`` on strided rows: the residual bit-equal to PyTorch's add, the norm to
    RMSNorm's ops."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(rows, hidden + 24, generator=g) * 2).to(device, dtype)
    x = wide[:, 8 : 8 + hidden]  # strided rows, as a slice of a wider tensor
    residual = (torch.randn(rows, hidden, generator=g) * 3).to(device, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    wide_before, residual_before = wide.clone(), residual.clone()

    normed, res_out = fused_ops.add_rms_norm(x, residual, w, eps)

    want_res = x + residual  # PyTorch's half add: float32 math, one rounding
    r32 = want_res.float()
    want = w * (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    assert normed.dtype == res_out.dtype == dtype and normed.shape == res_out.shape == x.shape
    assert torch.equal(res_out, want_res), (
        rows,
        hidden,
        dtype,
        (res_out.float() - want_res.float()).abs().max(),
    )
    torch.testing.assert_close(normed, want, **_tolerance(dtype))
    if not normed.is_cuda:
        assert torch.equal(normed, fused_ops.rms_norm(want_res, w, eps))
    assert torch.equal(wide, wide_before) and torch.equal(
        residual, residual_before
    )  # inputs are only read


def check_rotary_and_store(
    block_size, tokens, hq, hkv, d, padding, *, device="cpu", dtype=torch.float32, seed=0
) -> None:
    """``rotary_and_store`` on strided q/k/v views and a fragmented slot mapping.

    q_rot and k_rot match rotary in float32 (rounded once); the cache holds exactly k_rot and v
    at the slots; every other slot (but the padding rows' scratch slot) is unchanged.
    """
    g = torch.Generator().manual_seed(seed)
    n = tokens + padding
    width = (hq + 2 * hkv) * d
    qkv = torch.randn(n, width + 16, generator=g).to(
        device, dtype
    )  # rows wider than q|k|v: strided
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d : width].view(n, hkv, d)
    ang = torch.rand(n, 1, d // 2, generator=g) * 100
    cos = torch.cat([ang.cos()] * 2, -1).to(device, dtype)
    sin = torch.cat([ang.sin()] * 2, -1).to(device, dtype)
    num_blocks = -(-tokens // block_size) + 4
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(device, dtype)
    # Distinct slots spread over the whole pool (fragmented pages, any offset); padding rows
    # all write one scratch slot, as the CUDA graphs' padding rows do.
    perm = torch.randperm(num_blocks * block_size, generator=g)
    live, scratch = perm[:tokens], perm[tokens : tokens + 1]
    slots = torch.cat([live, scratch.expand(padding)])
    qkv_before, k_before, v_before = qkv.clone(), k_cache.clone(), v_cache.clone()

    q_rot, k_rot = fused_ops.rotary_and_store(q, k, v, cos, sin, k_cache, v_cache, slots.to(device))

    want_q, want_k = apply_rotary(q.float(), k.float(), cos.float(), sin.float())
    assert q_rot.shape == q.shape and k_rot.shape == k.shape and q_rot.dtype == k_rot.dtype == dtype
    assert q_rot.is_contiguous() and k_rot.is_contiguous()
    torch.testing.assert_close(q_rot.float(), want_q, **_tolerance(dtype))
    torch.testing.assert_close(k_rot.float(), want_k, **_tolerance(dtype))
    if (
        not q_rot.is_cuda
    ):  # the interpreter has no fused multiply-add: the same float32 math, rounded once
        assert torch.equal(q_rot, want_q.to(dtype)) and torch.equal(k_rot, want_k.to(dtype))

    k_flat, v_flat = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    live = live.to(device)
    assert torch.equal(k_flat[live], k_rot[:tokens])
    assert torch.equal(v_flat[live], v[:tokens])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    untouched = untouched.to(device)
    assert torch.equal(k_flat[untouched], k_before.view(-1, hkv, d)[untouched])
    assert torch.equal(v_flat[untouched], v_before.view(-1, hkv, d)[untouched])
    assert torch.equal(qkv, qkv_before)  # q, k, v are only read


if __name__ == "__main__":
    for dtype in (torch.float32, torch.float16):
        for case in NORM_CASES:
            check_add_rms_norm(*case, dtype=dtype)
        for case in ROTARY_CASES:
            check_rotary_and_store(*case, dtype=dtype)
    print("ok")
