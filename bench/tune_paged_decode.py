"""Sweep the paged-decode kernel's launch knobs (tile, warps, pipeline stages) on the GPU.

    python bench/tune_paged_decode.py --device cuda

For each model's attention shape (query heads, KV heads, head dim) and each decode case (batch x
context), times ``paged_decode`` on fragmented block tables under every configuration and
prints the KV read rate against this run's measured copy bandwidth (the rate bench/engine.py's
decode floor uses; the kernel reads each K/V byte of the context once). Each case's best
configuration is marked. Small cases (batch 1) are bound by the Python launch of the two kernels, \
which
the events include: read them in the engine's profile instead (bench/profile_engine.py). Writes
JSON under bench/results/ (or --out-dir).
"""

import argparse
import itertools
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, write_result  # noqa: E402
from engine import measure_bandwidth  # noqa: E402

SHAPES = {  # name: (query heads, KV heads, head dim)
    "llama-3.2-1b": (32, 8, 64),
    "llama-3.1-8b": (32, 8, 128),
    "qwen3-0.6b": (16, 8, 128),
}
CASES = [(1, 1024), (1, 4096), (8, 4096), (32, 4096), (128, 1024), (256, 1024), (128, 4096)]


def time_kernel(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()

    from tandem.engine.attention.triton_paged_decode import choose_num_splits, paged_decode

    device = torch.device(args.device)
    bandwidth = measure_bandwidth(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bs = args.block_size
    rows, records = [], []
    configs = list(itertools.product(args.tiles, args.warps, args.stages))
    for name in args.shapes:
        hq, hkv, d = SHAPES[name]
        for batch, context in CASES:
            pages = -(-context // bs)
            num_blocks = batch * pages + 1
            kv = torch.randn(2, num_blocks, bs, hkv, d, device=device, dtype=torch.bfloat16)
            ids = list(range(num_blocks))
            random.Random(0).shuffle(ids)
            tables = torch.tensor(ids[: batch * pages], device=device).view(batch, pages)
            lens = torch.full((batch,), context, device=device, dtype=torch.int64)
            q = torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16)
            splits = choose_num_splits(batch, hkv, pages * bs, bs, sms)
            kv_bytes = 2 * batch * context * hkv * d * 2
            results = []
            for tile, warps, stages in configs:

                def run(
                    q=q,
                    kv=kv,
                    tables=tables,
                    lens=lens,
                    d=d,
                    splits=splits,
                    tile=tile,
                    warps=warps,
                    stages=stages,
                ):
                    paged_decode(
                        q,
                        kv[0],
                        kv[1],
                        tables,
                        lens,
                        scale=d**-0.5,
                        window=None,
                        num_splits=splits,
                        tile=tile,
                        num_warps=warps,
                        num_stages=stages,
                    )

                try:
                    t = time_kernel(run, args.iters)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    print(
                        f"{name} b{batch} ctx{context} tile {tile} warps {warps} "
                        f"stages {stages}: {e}"
                    )
                    continue
                results.append((t, tile, warps, stages))
            best = min(results)
            for t, tile, warps, stages in results:
                rate = kv_bytes / t
                rows.append(
                    [
                        name,
                        batch,
                        context,
                        splits,
                        tile,
                        warps,
                        stages,
                        t * 1e6,
                        rate / 1e9,
                        rate / bandwidth,
                        "best" if (t, tile, warps, stages) == best else "",
                    ]
                )
                records.append(
                    dict(
                        shape=name,
                        batch=batch,
                        context=context,
                        splits=splits,
                        tile=tile,
                        num_warps=warps,
                        num_stages=stages,
                        seconds=t,
                        read_Bps=rate,
                        of_copy_bandwidth=rate / bandwidth,
                    )
                )
            kv = q = None  # free this case's pool before the next allocates
    print(
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s "
        "(bytes read + written per second, the decode floor's rate)"
    )
    print_table(
        [
            "shape",
            "batch",
            "context",
            "splits",
            "tile",
            "warps",
            "stages",
            "us",
            "GB/s read",
            "of copy bw",
            "",
        ],
        rows,
    )
    path = write_result(
        "tune-paged-decode",
        args.device,
        {
            "bandwidth_Bps": bandwidth,
            "results": records,
            "device": device_name(args.device),
            "command": " ".join(sys.argv),
        },
        args.out_dir,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
