"""Checks the Triton paged-decode kernel against the torch reference backend.

Imported by the CPU test (in a subprocess with TRITON_INTERPRET=1, so Triton runs its
interpreter) and by the GPU test (compiled kernels on CUDA).
"""

import os
import random

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter turns 1-element arrays into loop bounds with int(array), which
    # NumPy >= 2.4 refuses; give it the element instead (interpreter only: compiled kernels
    # never go through this).
    from triton.runtime import interpreter as _interpreter

    _patch = _interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _patch_lang_tensor

from tandem.engine.attention.backend import AttentionMetadata
from tandem.engine.attention.torch_backend import TorchAttentionBackend
from tandem.engine.attention.triton_paged_decode import paged_decode

CASES = [
    # (block_size, Hq, Hkv, D, seq_lens, window, splits)
    (16, 4, 2, 32, [1, 17, 40, 64], None, 1),
    (16, 4, 2, 32, [1, 17, 40, 64], None, 3),
    (32, 8, 2, 64, [5, 33, 100, 0], None, 2),  # 0: a padding row (output 0)
    (16, 6, 6, 16, [70, 3], 20, 2),  # sliding window, no GQA
    (32, 16, 2, 64, [200], None, 7),  # one long sequence, more splits than pages in some
]


def check_case(
    block_size, hq, hkv, d, lens, window, splits, *, device="cpu", dtype=torch.float32, seed=0
):
    """Returns (max abs error, the output); raises AssertionError past tolerance."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 5
    max_blocks = max(1, max(-(-n // block_size) for n in lens))
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(device, dtype)
    ids = list(range(num_blocks))
    rng.shuffle(ids)  # fragmented: a sequence's pages are anywhere in the pool
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int64)
    for i, n in enumerate(lens):
        for j in range(-(-n // block_size)):
            tables[i, j] = ids.pop()
    q = torch.randn(len(lens), hq, d, generator=g).to(device, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    scale = d**-0.5
    got = paged_decode(
        q,
        k_cache,
        v_cache,
        tables.to(device),
        seq_lens.to(device),
        scale=scale,
        window=window,
        num_splits=splits,
    )
    live = [i for i, n in enumerate(lens) if n > 0]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        block_tables=tables[live].to(device),
        seq_lens=seq_lens[live].to(device),
        query_start_loc=torch.arange(len(live) + 1),
        num_decodes=len(live),
        seq_lens_cpu=[lens[i] for i in live],
        query_start_loc_cpu=list(range(len(live) + 1)),
        block_size=block_size,
    )
    want = TorchAttentionBackend()._decode(
        q[live].float(), k_cache.float(), v_cache.float(), meta, scale, window
    )
    err = (got[live].float() - want).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert err < tol, (block_size, hq, hkv, d, lens, window, splits, err)
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.all(got[i] == 0)
    return err, got


if __name__ == "__main__":
    for case in CASES:
        print(case, check_case(*case)[0])
