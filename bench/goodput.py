"""The disaggregation goodput study (issue 19): N GPUs as N colocated workers against N/2 prefill
+ N/2 decode workers, each worker on a GPU of its own, over a sweep of request rates.

DistServe's measure: a request is *good* when it meets the SLOs; a mode's goodput is the highest
rate (req/s) at which at least ``--attainment`` (90 %) of requests are good. The TPOT SLO is
``--slo-tpot-factor`` x the unloaded TPOT, measured first on one colocated worker with one request
at a time (the issue's "p90 TPOT <= 1.5x the unloaded TPOT"), and the same SLO holds for every
mode. An optional TTFT SLO (``--slo-ttft-ms``) is checked too. Failed requests count as not good.

    python bench/goodput.py                                   # CPU smoke run, tiny model
    python bench/goodput.py --device cuda --gpus 2 --model DIR \\
        --worker-args "--load-format dummy" --input-len 1024 --output-len 128 \\
        --num-prompts 200 --rates 1 2 4 8 16

Prints one row per (mode, rate) and the goodput of each mode; writes JSON under bench/results/.
"""

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402
from serve import run_load, start_system, warm_up  # noqa: E402

MODES = ("colocated", "disaggregated")


def unloaded_tpot_ms(url: str, args, vocab: int, requests: int) -> float:
    """Median TPOT of ``requests`` workload-shaped requests sent one at a time (nothing else
    running): the floor the SLO is a multiple of."""
    one = argparse.Namespace(**vars(args))
    one.num_prompts, one.rate = 1, float("inf")
    tpots = []
    for i in range(requests):
        one.seed = args.seed + 7_000_003 + i  # prompts of their own: no prefix hits
        summary = asyncio.run(run_load(url, one, vocab))
        if summary["failed"] or summary["tpot_ms"]["median"] is None:
            raise SystemExit(f"an unloaded request failed: {summary['errors']}")
        tpots.append(summary["tpot_ms"]["median"])
    return statistics.median(tpots)


def attainment(summary: dict, sent: int) -> float:
    """The share of the ``sent`` requests that met every SLO (failed ones did not)."""
    return summary["goodput"] * summary["wall_s"] / sent if sent else 0.0


def goodput(rows: list[dict], target: float) -> float | None:
    """The highest rate whose attainment reaches ``target`` (None: none does)."""
    rates = [r["rate"] for r in rows if r["attainment"] >= target]
    return max(rates) if rates else None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, help="model directory (default: a generated tiny llama)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpus", type=int, default=2, help="workers (GPUs on CUDA) per mode")
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    ap.add_argument("--num-prompts", type=int, default=24, help="per rate")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--slo-tpot-factor", type=float, default=1.5)
    ap.add_argument("--slo-ttft-ms", type=float, default=None)
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--unloaded-requests", type=int, default=5)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--worker-args", type=shlex.split, default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.gpus < 2 or args.gpus % 2:
        raise SystemExit("--gpus must be even and at least 2 (disaggregated: half prefill)")

    from tandem.model_dir import load_model_config

    model = args.model
    if model is None:
        from tandem.model_gen import ModelGenOptions, generate_model_dir

        model = generate_model_dir(
            ModelGenOptions(arch="llama", out=Path(tempfile.mkdtemp()) / "tiny")
        )
    vocab = load_model_config(model).vocab_size
    # What serve.py's helpers read.
    run = argparse.Namespace(
        **vars(args),
        workers=args.gpus,
        prefill_workers=args.gpus // 2,
        decode_workers=args.gpus // 2,
        gpu_per_worker=True,
        workload="random",
        rate=float("inf"),
        slo_tpot_ms=None,
        slo_e2el_ms=None,
    )
    one = argparse.Namespace(**{**vars(run), "workers": 1})
    cluster = start_system(model, "colocated", one)
    try:
        asyncio.run(warm_up(cluster.router_url, vocab))
        floor = unloaded_tpot_ms(cluster.router_url, run, vocab, args.unloaded_requests)
    finally:
        cluster.stop()
    run.slo_tpot_ms = args.slo_tpot_factor * floor
    print(f"unloaded TPOT {floor:.2f} ms: SLO TPOT <= {run.slo_tpot_ms:.2f} ms", flush=True)
    rows: list[dict] = []
    for mode in MODES:
        cluster = start_system(model, mode, run)
        try:
            asyncio.run(warm_up(cluster.router_url, vocab))
            for rate in args.rates:
                load = argparse.Namespace(**vars(run))
                load.rate = rate
                summary = asyncio.run(run_load(cluster.router_url, load, vocab))
                row = {
                    "mode": mode,
                    "rate": rate,
                    "attainment": attainment(summary, args.num_prompts),
                    "failed": summary["failed"],
                    "tpot_p90_ms": summary["tpot_ms"]["p90"],
                    "ttft_p90_ms": summary["ttft_ms"]["p90"],
                    "output_throughput": summary["output_throughput"],
                    "summary": summary,
                }
                rows.append(row)
                print(
                    f"{mode} at {rate:g} req/s: {row['attainment']:.0%} good, "
                    f"TPOT p90 {row['tpot_p90_ms']} ms, {row['failed']} failed",
                    flush=True,
                )
        finally:
            cluster.stop()
    best = {m: goodput([r for r in rows if r["mode"] == m], args.attainment) for m in MODES}
    ratio = (
        best["disaggregated"] / best["colocated"]
        if best["colocated"] and best["disaggregated"]
        else None
    )
    print_table(
        ["mode", "rate", "good", "failed", "TPOT p90 ms", "TTFT p90 ms", "out tok/s"],
        [
            [
                r["mode"],
                r["rate"],
                r["attainment"],
                r["failed"],
                r["tpot_p90_ms"],
                r["ttft_p90_ms"],
                r["output_throughput"],
            ]
            for r in rows
        ],
    )
    for m in MODES:
        print(f"goodput {m}: {best[m]} req/s (attainment >= {args.attainment:.0%})")
    print(f"disaggregated / colocated goodput: {ratio}")
    payload = {
        "command": shlex.join(sys.argv),
        "device": args.device,
        "model": model.name,
        "gpus": args.gpus,
        "workers": {"colocated": [0, args.gpus], "disaggregated": [args.gpus // 2] * 2},
        "unloaded_tpot_ms": floor,
        "slo": {"tpot_ms": run.slo_tpot_ms, "ttft_ms": args.slo_ttft_ms},
        "attainment_target": args.attainment,
        "rows": rows,
        "goodput": best,
        "disaggregated_over_colocated": ratio,
    }
    path = write_result(f"goodput-{model.name}", args.device, payload, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
