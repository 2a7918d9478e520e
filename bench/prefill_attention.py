"""Prefill attention alone: the varlen paged Triton kernel against SDPA, one layer, GPU.

    python bench/prefill_attention.py                    # 8B heads (32 q / 8 kv, head_dim 128)
    python bench/prefill_attention.py --sweep            # also the kernel's launch configurations

Cases (cached context : new tokens): chunks with no context (SDPA's causal flash kernel on the
chunk's own K/V is the baseline: what the engine runs for a lone long prompt), and chunks after
cached context (the baseline is the previous path: gather the pages, SDPA with a boolean mask,
which materialises [heads, q, ctx]; "OOM" where it cannot). A step of many short prompts
(W4-like: 64 prompts of 100-400 tokens) against one SDPA call per prompt. TFLOP/s counts causal
attention FLOPs (4 x head_dim per query head and visible key). Writes JSON under bench/results/.
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, write_result  # noqa: E402
from tune_paged_decode import time_kernel  # noqa: E402

CASES = ["0:2048", "0:8192", "6144:2048", "30720:2048", "0:512", "w4:64"]


def build(seqs, hq, hkv, d, bs, dtype, rng):
    """A step of prompt chunks [(context, new)] on shuffled pages: q, k, v, cache, metadata."""
    from tandem.engine.attention.backend import AttentionMetadata

    lens = [c + n for c, n in seqs]
    blocks = sum(-(-n // bs) for n in lens) + 1
    ids = list(range(blocks))
    rng.shuffle(ids)
    width = max(-(-n // bs) for n in lens)
    tables = torch.zeros(len(seqs), width, dtype=torch.int64)
    slots, qsl = [], [0]
    for i, (c, n) in enumerate(seqs):
        for j in range(-(-(c + n) // bs)):
            tables[i, j] = ids.pop()
        slots += [int(tables[i, p // bs]) * bs + p % bs for p in range(c, c + n)]
        qsl.append(qsl[-1] + n)
    dev = "cuda"
    kv = torch.randn(2, blocks, bs, hkv, d, device=dev, dtype=dtype)
    q = torch.randn(qsl[-1], hq, d, device=dev, dtype=dtype)
    k, v = (torch.randn(qsl[-1], hkv, d, device=dev, dtype=dtype) for _ in range(2))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev),
        block_tables=tables.to(dev),
        seq_lens=torch.tensor(lens, device=dev),
        query_start_loc=torch.tensor(qsl, device=dev),
        num_decodes=0,
        seq_lens_cpu=lens,
        query_start_loc_cpu=qsl,
        block_size=bs,
    )
    return q, k, v, kv, meta


def run_case(spec: str, hq: int, hkv: int, d: int, args, rng: random.Random):
    """One case: (table row, JSON record)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tandem.engine.attention.torch_backend import TorchAttentionBackend
    from tandem.engine.attention.triton_paged_prefill import (
        launch_config,
        paged_prefill,
        prefill_tiles,
    )

    scale = d**-0.5
    dtype = torch.bfloat16
    if spec.startswith("w4:"):
        seqs = [(0, rng.randint(100, 400)) for _ in range(int(spec[3:]))]
    else:
        c, n = map(int, spec.split(":"))
        seqs = [(c, n)]
    q, k, v, kv, meta = build(seqs, hq, hkv, d, args.block_size, dtype, rng)
    k_cache, v_cache = kv[0], kv[1]
    TorchAttentionBackend().store(k, v, k_cache, v_cache, meta)
    flops = sum(4 * (n * c + n * n / 2) * hq * d for c, n in seqs)
    out = torch.empty_like(q)
    block_q = launch_config(d, hq // hkv)[0]
    qsl = meta.query_start_loc_cpu

    tiles = prefill_tiles(qsl, meta.seq_lens_cpu, 0, block_q, q.device)  # once a step

    def kernel(**kw):
        paged_prefill(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            tiles, scale=scale, window=None, out=out, **kw,
        )  # fmt: skip

    def baseline():
        ref = TorchAttentionBackend()
        for i, (c, _) in enumerate(seqs):
            r = slice(qsl[i], qsl[i + 1])
            if c == 0:  # the chunk's own K/V, causal flash
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                    F.scaled_dot_product_attention(
                        q[r].transpose(0, 1)[None], k[r].transpose(0, 1)[None],
                        v[r].transpose(0, 1)[None], is_causal=True, scale=scale,
                        enable_gqa=True,
                    )  # fmt: skip
            else:  # the previous path: gather + masked SDPA
                meta.scratch.clear()
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                  SDPBackend.MATH]):  # fmt: skip
                    ref._prefill(q[r], k_cache, v_cache, meta, i, scale, None)

    t_kernel = time_kernel(kernel, 10)
    try:
        t_base = time_kernel(baseline, 10)
    except torch.OutOfMemoryError:
        t_base = None
        torch.cuda.empty_cache()
    best = None
    if args.sweep:
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    try:
                        t = time_kernel(
                            lambda bn=block_n, w=warps, s=stages: kernel(
                                block_n=bn, num_warps=w, num_stages=s
                            ),
                            5,
                        )
                    except Exception as exc:  # out of resources: not a candidate
                        print(f"  {block_n}/{warps}/{stages}: {type(exc).__name__}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, block_n, warps, stages)
    base_name = "SDPA flash" if all(c == 0 for c, _ in seqs) else "gather + masked SDPA"
    row = [
        spec,
        qsl[-1],
        t_kernel * 1e3,
        flops / t_kernel / 1e12,
        base_name,
        "OOM" if t_base is None else t_base * 1e3,
        "" if t_base is None else t_base / t_kernel,
        "" if best is None else f"{best[1]}/{best[2]}/{best[3]} {best[0] * 1e3:.3f} ms",
    ]
    record = dict(
        case=spec,
        seqs=seqs if len(seqs) < 5 else len(seqs),
        tokens=qsl[-1],
        kernel_seconds=t_kernel,
        kernel_tflops=flops / t_kernel / 1e12,
        baseline=base_name,
        baseline_seconds=t_base,
        speedup=None if t_base is None else t_base / t_kernel,
        best_config=best
        and dict(
            block_n=best[1], num_warps=best[2], num_stages=best[3], seconds=best[0]
        ),  # fmt: skip
    )
    return row, record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", nargs="+", default=CASES, help="CONTEXT:TOKENS, or w4:PROMPTS")
    ap.add_argument("--heads", default="32,8,128", help="q heads, kv heads, head_dim")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="time the kernel's launch configurations")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()

    hq, hkv, d = map(int, args.heads.split(","))
    rng = random.Random(0)
    rows, records = [], []
    for spec in args.cases:
        row, record = run_case(spec, hq, hkv, d, args, rng)
        rows.append(row)
        records.append(record)
        torch.cuda.empty_cache()
    print_table(
        ["case", "tokens", "kernel ms", "TFLOP/s", "baseline", "baseline ms", "speed-up", "best"],
        rows,
    )
    path = write_result(
        "prefill-attention",
        "cuda",
        dict(
            device=device_name("cuda"),
            heads=[hq, hkv, d],
            command=" ".join(sys.argv),
            results=records,
        ),  # fmt: skip
        args.out_dir,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
