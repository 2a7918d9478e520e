"""The Triton backend and the decode CUDA graphs on a GPU, against the torch reference backend."""

import random
import sys
from pathlib import Path

import pytest
import torch

from tandem.engine import LLM, SamplingParams

pytest.importorskip("triton")  # CUDA builds of torch bring it; elsewhere these tests cannot run
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "engine"))
import fused_check  # noqa: E402
import kernel_check  # noqa: E402
import prefill_check  # noqa: E402

pytestmark = pytest.mark.gpu

BIG_CASES = [
    (16, 32, 8, 64, [1, 1000, 4096, 17, 300], None, 1),  # Llama-3.2-1B heads
    (16, 32, 8, 128, [2048] * 3, None, 8),  # Llama-3.1-8B heads, split
    (32, 16, 8, 128, [5000, 3], None, 16),  # Qwen3-0.6B heads, block size 32
    (16, 32, 8, 128, [3000, 200], 1024, 4),  # sliding window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", kernel_check.CASES + BIG_CASES)
def test_paged_decode_kernel_matches_the_torch_backend(case, dtype):
    kernel_check.check_case(*case, device="cuda", dtype=dtype)


BIG_PREFILL_CASES = [
    # (block_size, Hq, Hkv, D, [(cached context, new tokens)], window)
    (16, 32, 8, 128, [(6144, 2048)], None),  # Llama-3.1-8B heads: a 2k chunk after 6k cached
    (16, 32, 8, 128, [(900, 1), (0, 1), (0, 200), (37, 500), (1000, 96)], None),  # mixed step
    (32, 32, 32, 128, [(0, 700), (513, 300), (5, 1)], None),  # GQA 1, block size 32
    (16, 32, 4, 128, [(100, 1000), (0, 17)], None),  # GQA 8
    (16, 32, 8, 64, [(4000, 1000), (0, 333), (20, 1)], None),  # Llama-3.2-1B heads
    (16, 16, 8, 256, [(300, 700), (3, 40)], None),  # head_dim 256
    (16, 32, 8, 128, [(3000, 1000), (100, 1)], 1024),  # sliding window
    (32, 16, 8, 128, [(0, 4096)], 512),  # window, no cached context
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", prefill_check.CASES + BIG_PREFILL_CASES)
def test_paged_prefill_kernel_matches_the_torch_backend(case, dtype):
    prefill_check.check_case(*case, device="cuda", dtype=dtype)


def test_paged_prefill_memory_is_linear_in_tokens():
    """A 2k chunk after 30k cached tokens (8B heads): the kernel's workspace is its tiles, not
    [heads, q, ctx] scores (the reference would need 32 x 2048 x 32768 x 4 B = 8 GiB; the
    first H200 run peaked at 104 MiB)."""
    from tandem.engine.attention.backend import AttentionMetadata
    from tandem.engine.attention.triton_backend import TritonAttentionBackend

    bs, ctx, n = 16, 30720, 2048
    blocks = (ctx + n) // bs
    kv = torch.randn(2, blocks, bs, 8, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    positions = torch.arange(ctx, ctx + n, device="cuda")
    meta = AttentionMetadata(
        slot_mapping=positions,
        block_tables=torch.arange(blocks, device="cuda")[None],
        seq_lens=torch.tensor([ctx + n], device="cuda"),
        query_start_loc=torch.tensor([0, n], device="cuda"),
        num_decodes=0,
        seq_lens_cpu=[ctx + n],
        query_start_loc_cpu=[0, n],
        block_size=bs,
    )
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = TritonAttentionBackend().forward(q, k, v, kv, meta, scale=0.088, sliding_window=None)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(out.float()).all()
    assert peak < 256 << 20  # the output (16 MiB) and small workspaces: not gigabytes


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral-swa"])
def test_cuda_graph_decode_matches_eager_torch_backend(arch, tiny_model):
    model = tiny_model(arch)
    rng = random.Random(0)
    vocab = 1000
    prompts = [
        [rng.randrange(3, vocab) for _ in range(n)] for n in (1, 5, 16, 33, 70)
    ]  # 5 rows: padded to 8
    # Different lengths: the batch shrinks 5 -> 1 across buckets and table widths as requests end.
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (30, 4, 20, 9, 14)
    ]
    kw = dict(
        device="cuda",
        dtype="float32",
        num_kv_blocks=128,
        max_num_seqs=16,
        max_num_batched_tokens=256,
    )
    graphed = LLM(model, attention_backend="triton", cuda_graphs=True, **kw)
    eager = LLM(model, attention_backend="torch", **kw)
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert got == want
    assert graphed.engine.runner.graphs.replays >= 15  # the decode steps came from graphs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_elementwise_kernels_match_the_reference_ops(dtype):
    from tandem.engine.models import fused_ops

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 2048, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(2048, device="cuda", generator=g)).to(dtype)
    x32 = x.float()
    want = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-5), want, atol=1e-2, rtol=1e-2)

    gu = torch.randn(37, 2 * 3000, device="cuda", generator=g).to(dtype)
    gate, up = gu.split(3000, -1)
    torch.testing.assert_close(
        fused_ops.silu_and_mul(gu), torch.nn.functional.silu(gate) * up, atol=2e-2, rtol=2e-2
    )


NORM_BIG_CASES = [
    (37, 2048),
    (1, 4096),
    (300, 3000),
]  # Llama-3.2-1B / 8B hidden sizes, a padded one
ROTARY_BIG_CASES = [
    # (block_size, tokens, Hq, Hkv, D, padding rows)
    (16, 1, 32, 8, 64, 7),  # a Llama-3.2-1B decode in a CUDA graph of 8
    (16, 37, 32, 8, 64, 0),
    (32, 300, 32, 8, 128, 0),  # Llama-3.1-8B heads, a prefill chunk
    (32, 9, 28, 4, 128, 3),  # Qwen2.5-7B heads (28: not a power of two)
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", fused_check.NORM_CASES + NORM_BIG_CASES)
def test_fused_add_rms_norm_matches_the_reference_ops(case, dtype):
    """The residual bit-equal to PyTorch's half add; the norm within two ulps of RMSNorm's ops."""
    fused_check.check_add_rms_norm(*case, device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", fused_check.ROTARY_CASES + ROTARY_BIG_CASES)
def test_fused_rotary_and_store_matches_the_reference_ops(case, dtype):
    """q_rot, k_rot against float32 rotary; the slots hold exactly k_rot and v; other slots
    untouched."""
    fused_check.check_rotary_and_store(*case, device="cuda", dtype=dtype)


def test_bfloat16_engine_with_fused_kernels_tracks_the_float32_engine(tiny_model):
    """bf16 (fused kernels, graphs) vs float32 (exact ops): the same greedy tokens for most of a
    run."""
    model = tiny_model("qwen3")
    prompts = [[5, 9, 13, 200, 31], list(range(3, 80))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    kw = dict(device="cuda", num_kv_blocks=64, max_num_seqs=8)
    bf16 = LLM(model, dtype="bfloat16", **kw).generate(prompts, params)
    fp32 = LLM(model, dtype="float32", **kw).generate(prompts, params)
    for a, b in zip(bf16, fp32, strict=True):
        assert a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0]
        assert abs(a.outputs[0].logprobs[0].logprob - b.outputs[0].logprobs[0].logprob) < 0.1


def test_bfloat16_graph_decode_matches_bfloat16_eager_decode(tiny_model):
    """The decode steps themselves in bf16: graphs + fused kernels vs the torch backend, eager."""
    model = tiny_model("llama")
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (3, 20, 41)]
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1) for n in (12, 6, 9)
    ]
    kw = dict(device="cuda", dtype="bfloat16", num_kv_blocks=64, max_num_seqs=8)
    graphed_llm = LLM(model, attention_backend="triton", **kw)
    graphed = graphed_llm.generate(prompts, params)
    eager = LLM(model, attention_backend="torch", **kw).generate(prompts, params)
    assert graphed_llm.engine.runner.graphs.replays > 0
    for a, b in zip(graphed, eager, strict=True):
        got, want = a.outputs[0], b.outputs[0]
        same = next(
            (
                i
                for i, (x, y) in enumerate(zip(got.token_ids, want.token_ids, strict=False))
                if x != y
            ),
            len(got.token_ids),
        )
        assert same >= 4, (
            got.token_ids,
            want.token_ids,
        )  # bf16 rounding may split a near-tie later on
        for x, y in zip(got.logprobs[:same], want.logprobs[:same], strict=False):
            assert abs(x.logprob - y.logprob) < 0.05
