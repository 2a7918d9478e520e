"""Offline throughput, nano-vllm's protocol: N requests with input and output lengths uniform
in [min, max], random token ids, seed 0, EOS ignored, one warm-up, output tokens / wall time of
one ``generate`` call.

    python bench/offline.py                          # CPU, generated tiny model, small N
    python bench/offline.py --device cuda --model DIR --num-requests 256 --min-len 100 \
--max-len 1024

Prints a table and the result as JSON to stdout, and writes the same JSON under bench/results/
(or ``--out-dir``); the path written goes to stderr, so stdout is only the table and the JSON.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402


def make_requests(n: int, lo: int, hi: int, vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    out_lens = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, out_lens


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, help="model directory (default: a generated tiny llama)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--out-dir", type=Path, help="where the JSON goes (default bench/results/)")
    args = ap.parse_args()

    from tandem.engine import LLM, SamplingParams

    model = args.model
    if model is None:
        from tandem.model_gen import ModelGenOptions, generate_model_dir

        model = generate_model_dir(
            ModelGenOptions(arch="llama", out=Path(tempfile.mkdtemp()) / "tiny")
        )
    llm = LLM(
        model,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
    )
    vocab = llm.engine.model_config.vocab_size
    prompts, out_lens = make_requests(
        args.num_requests, args.min_len, args.max_len, vocab, args.seed
    )
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in out_lens]
    llm.generate(["Benchmark: "], SamplingParams(max_tokens=8))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert out_tokens == sum(out_lens), "EOS is ignored: every request must produce max_tokens"
    in_tokens = sum(len(p) for p in prompts)
    stats = llm.engine.get_stats()
    result = {
        "workload": "W1-offline (nano-vllm protocol)",
        "model": str(model),
        "architecture": llm.engine.model_config.architecture,
        "device": args.device,
        "dtype": llm.engine.fingerprint.dtype,
        "num_requests": args.num_requests,
        "len_range": [args.min_len, args.max_len],
        "seed": args.seed,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "wall_s": elapsed,
        "output_tok_per_s": out_tokens / elapsed,
        "total_tok_per_s": (in_tokens + out_tokens) / elapsed,
        "num_kv_blocks": stats.num_total_blocks,
        "preemptions": stats.num_preemptions,
        "command": " ".join(sys.argv),
    }
    path = write_result("offline", args.device, result, args.out_dir)
    print_table(
        ["engine", "requests", "in tok", "out tok", "time s", "out tok/s", "total tok/s"],
        [
            [
                "tandem",
                args.num_requests,
                in_tokens,
                out_tokens,
                elapsed,
                result["output_tok_per_s"],
                result["total_tok_per_s"],
            ]
        ],
    )
    print(json.dumps(result, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
