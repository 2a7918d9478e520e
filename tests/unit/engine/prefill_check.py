"""Checks the Triton varlen paged prefill kernel (through the Triton backend's forward) against the
torch reference backend on mixed steps: decodes first, then prompt chunks after cached context.

Imported by the CPU test (in a subprocess with TRITON_INTERPRET=1, after ``kernel_check``, which
installs the interpreter fix-up) and by the GPU test (compiled kernels on CUDA).
"""

import random

import torch

from tandem.engine.attention.backend import AttentionMetadata
from tandem.engine.attention.torch_backend import TorchAttentionBackend
from tandem.engine.attention.triton_backend import TritonAttentionBackend

CASES = [
    # (block_size, Hq, Hkv, D, [(cached context, new tokens) per sequence], window)
    (16, 4, 4, 32, [(0, 1), (5, 1), (0, 20), (16, 33), (40, 7)], None),  # GQA 1
    (32, 8, 2, 64, [(3, 1), (0, 70), (64, 64), (31, 2)], None),  # GQA 4, chunk inside a block
    (16, 8, 1, 32, [(0, 45), (100, 17), (47, 1)], None),  # GQA 8
    (16, 6, 6, 16, [(10, 1), (30, 40), (0, 25)], 12),  # sliding window
    (16, 16, 2, 64, [(70, 1), (0, 9), (50, 30)], 20),  # GQA 8 under a window
    (16, 12, 4, 32, [(0, 3), (2, 140)], None),  # GQA 3 (a padded group)
]


def check_case(block_size, hq, hkv, d, seqs, window, *, device="cpu", dtype=torch.float32, seed=0):
    """Returns the max abs error; raises AssertionError past tolerance. Decodes go first, as the
    runner orders a step; every sequence's pages are shuffled over the pool."""
    seqs = sorted(seqs, key=lambda s: s[1] != 1)
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lens = [c + n for c, n in seqs]
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    max_blocks = max(-(-n // block_size) for n in lens)
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int64)
    for i, n in enumerate(lens):
        for j in range(-(-n // block_size)):
            tables[i, j] = ids.pop()
    kv_cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=g).to(dtype)
    qlens = [n for _, n in seqs]
    tokens = sum(qlens)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    slots = []
    for i, (c, n) in enumerate(seqs):
        for pos in range(c, c + n):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    q = torch.randn(tokens, hq, d, generator=g).to(dtype)
    k = torch.randn(tokens, hkv, d, generator=g).to(dtype)
    v = torch.randn(tokens, hkv, d, generator=g).to(dtype)

    def meta(device) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=tables.to(device),
            seq_lens=torch.tensor(lens, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(qsl, dtype=torch.int64, device=device),
            num_decodes=sum(1 for n in qlens if n == 1),
            seq_lens_cpu=lens,
            query_start_loc_cpu=qsl,
            block_size=block_size,
        )

    scale = d**-0.5
    want = TorchAttentionBackend().forward(
        q.float(), k.float(), v.float(), kv_cache.float(), meta("cpu"), scale=scale,
        sliding_window=window,
    )  # fmt: skip
    backend = TritonAttentionBackend()
    backend.SDPA_FROM_TOKENS = 1 << 30  # every chunk through the paged kernel
    cache = kv_cache.to(device)
    got = backend.forward(
        q.to(device),
        k.to(device),
        v.to(device),
        cache,
        meta(device),
        scale=scale,
        sliding_window=window,
    )
    err = (got.float().cpu() - want).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert err < tol, (block_size, hq, hkv, d, seqs, window, err)
    return err


def check_kv_stored(name: str) -> None:
    """``kv_stored=True`` (rotary_and_store wrote the slots): backend ``name`` stores nothing
    and attends as the reference does."""
    from tandem.engine.attention import get_attention_backend

    g = torch.Generator().manual_seed(0)
    bs, h, d = 4, 2, 16
    q, k, v = (torch.randn(3, h, d, generator=g) for _ in range(3))
    slots = torch.tensor([9, 10, 11])  # block 2, offsets 1..3, after one cached token at offset 0
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=torch.tensor([[2]]),
        seq_lens=torch.tensor([4]),
        query_start_loc=torch.tensor([0, 3]),
        num_decodes=0,
        seq_lens_cpu=[4],
        query_start_loc_cpu=[0, 3],
        block_size=bs,
    )
    kv_cache = torch.randn(2, 4, bs, h, d, generator=g)
    kv_cache[0].view(-1, h, d)[slots] = k  # the caller's write
    kv_cache[1].view(-1, h, d)[slots] = v
    before = kv_cache.clone()
    want = get_attention_backend("torch").forward(
        q, k, v, kv_cache.clone(), meta, scale=0.3, sliding_window=None
    )

    def stored_again(*args):
        raise AssertionError("stored again")

    backend = get_attention_backend(name)
    backend.store = stored_again
    got = backend.forward(q, k, v, kv_cache, meta, scale=0.3, sliding_window=None, kv_stored=True)
    assert torch.equal(kv_cache, before)
    torch.testing.assert_close(got, want)


if __name__ == "__main__":
    for case in CASES:
        print(case, check_case(*case))
