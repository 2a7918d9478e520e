"""Online serving benchmark with vLLM ``bench serve`` semantics, colocated vs disaggregated in \
one run.

Open loop: requests are sent at their arrival times (Poisson at ``--rate`` req/s, or all at once
with ``--rate inf``), whatever the server's pace. Each request streams from
``/v1/completions`` with a random token-id prompt and a fixed output length (EOS ignored).
Measured client side, with vLLM ``bench serve``'s definitions: TTFT (send -> first chunk with
text), TPOT ((E2EL - TTFT) / (output tokens - 1)), ITL (every gap between chunks), E2EL, request
and token throughput over the run's wall time, and goodput against the SLOs given.

Each mode starts the system afresh and runs the same workload:

- ``colocated``: N decode workers, no prefill workers;
- ``disaggregated``: N/2 prefill + N/2 decode workers (same N);
- ``prefix-aware`` / ``load-only``: --prefill-workers + --decode-workers, with and without
  kvstore (prefix-aware routing), for the prefix-reuse workload.

``--url`` benchmarks a running router instead. Workloads: ``random`` (random token ids of
--input-len) and ``prefix-repetition`` (vLLM's shape: --num-prefixes shared prefixes of
--prefix-len tokens, each followed by its own --suffix-len tokens).

    python bench/serve.py                                   # CPU, tiny model, small workload
    python bench/serve.py --device cuda --model DIR --input-len 1024 --output-len 128 --rate 4
    python bench/serve.py --workload prefix-repetition --modes prefix-aware load-only
    python bench/serve.py --device cuda --model DIR --worker-args "--load-format dummy"  \
# a real shape, random weights
"""

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402
from mps import MPSDaemon  # noqa: E402
from profiling import Profiler  # noqa: E402
from workloads import w4_lengths  # noqa: E402


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (
            (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None
        )


async def one_request(
    session, url: str, prompt: list[int], output_len: int, start_at: float, t0: float
) -> RequestResult:
    """One streamed completion, timed as vLLM's ``bench serve`` does (and with its client,
    aiohttp: a pure-Python HTTP client would be the slowest part of a run of a thousand
    streams)."""
    import aiohttp

    await asyncio.sleep(max(0.0, t0 + start_at - time.perf_counter()))
    body = {
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(ok=False, prompt_tokens=len(prompt))
    sent = time.perf_counter()
    last = None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                result.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return result
            async for raw in r.content:
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in data:  # an error after the stream opened: a failed request
                    result.error = f"in-stream error: {data['error'].get('message')}"
                    return result
                if data.get("usage"):
                    result.output_tokens = data["usage"]["completion_tokens"]
                    result.cached_tokens = data["usage"]["prompt_tokens_details"]["cached_tokens"]
                if not data["choices"] or not data["choices"][0].get("text"):
                    continue
                if last is None:
                    result.ttft = now - sent
                else:
                    result.itls.append(now - last)
                last = now
        result.e2el = time.perf_counter() - sent
        result.ok = result.output_tokens == output_len
        if not result.ok:
            result.error = f"expected {output_len} tokens, got {result.output_tokens}"
    except (aiohttp.ClientError, TimeoutError) as e:
        result.error = repr(e)
    return result


def client_session():
    """An aiohttp session for a benchmark: no connection limit, no timeouts."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    )


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    s = sorted(values)

    def pct(p):
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {
        "mean": statistics.fmean(s),
        "median": statistics.median(s),
        "p90": pct(90),
        "p99": pct(99),
    }


def summarize(results: list[RequestResult], wall: float, slo: dict) -> dict:
    ok = [r for r in results if r.ok]
    good = [
        r
        for r in ok
        if (slo["ttft"] is None or r.ttft * 1000 <= slo["ttft"])
        and (slo["tpot"] is None or (r.tpot or 0) * 1000 <= slo["tpot"])
        and (slo["e2el"] is None or r.e2el * 1000 <= slo["e2el"])
    ]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "wall_s": wall,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / wall,
        "output_throughput": out_tokens / wall,
        "total_token_throughput": (in_tokens + out_tokens) / wall,
        "goodput": len(good) / wall,
        "cache_hit_rate": sum(r.cached_tokens for r in ok) / max(1, in_tokens),
        "ttft_ms": {
            k: v * 1000 if v is not None else None
            for k, v in percentiles([r.ttft for r in ok]).items()
        },
        "tpot_ms": {
            k: v * 1000 if v is not None else None
            for k, v in percentiles([r.tpot for r in ok if r.tpot]).items()
        },
        "itl_ms": {
            k: v * 1000 if v is not None else None
            for k, v in percentiles([g for r in ok for g in r.itls]).items()
        },
        "e2el_ms": {
            k: v * 1000 if v is not None else None
            for k, v in percentiles([r.e2el for r in ok]).items()
        },
    }


def workload(args, vocab: int):
    rng = random.Random(args.seed)
    if args.workload == "prefix-repetition":
        prefixes = [
            [rng.randrange(3, vocab) for _ in range(args.prefix_len)]
            for _ in range(args.num_prefixes)
        ]
        prompts = [
            prefixes[i % args.num_prefixes]
            + [rng.randrange(3, vocab) for _ in range(args.suffix_len)]
            for i in range(args.num_prompts)
        ]
        rng.shuffle(prompts)
    elif args.workload == "sharegpt":
        # W4: lengths shaped like ShareGPT conversations (means about 211 in / 202 out).
        prompts, output_lens = [], []
        for _ in range(args.num_prompts):
            n_in, n_out = w4_lengths(rng)
            prompts.append([rng.randrange(3, vocab) for _ in range(n_in)])
            output_lens.append(n_out)
    else:
        prompts = [
            [rng.randrange(3, vocab) for _ in range(args.input_len)]
            for _ in range(args.num_prompts)
        ]
    if args.workload != "sharegpt":
        output_lens = [args.output_len] * len(prompts)
    if args.rate == float("inf"):
        arrivals = [0.0] * args.num_prompts
    else:
        t, arrivals = 0.0, []
        for _ in range(args.num_prompts):
            arrivals.append(t)
            t += rng.expovariate(args.rate)
    return prompts, output_lens, arrivals


async def warm_up(url: str, vocab: int) -> None:
    """One short request outside the measurement (and outside the pods' counters): connections,
    first-use allocations. Its tokens share no prefix with the workload's prompts."""
    async with client_session() as client:
        result = await one_request(
            client, url, [vocab - 1 - i for i in range(16)], 4, 0.0, time.perf_counter()
        )
    if not result.ok:
        raise SystemExit(f"the warm-up request failed: {result.error}")


async def warm_up_with_workload(url: str, args, vocab: int) -> None:
    """``--num-warmups`` requests shaped like the workload's (their own random tokens, so no
    prefix is shared with the measured prompts), sent at the workload's rate and left out of
    the figures: kernel compilation for the prompt shapes, the prefill pod's first transfers to
    each decode pod (mappings, descriptors), clocks ramping up. Without them whichever mode ran
    first was measured slower (bench/NOTES.md, 2026-12-06)."""
    warm = argparse.Namespace(**vars(args))
    warm.num_prompts, warm.seed = args.num_warmups, args.seed + 1_000_003
    summary = await run_load(url, warm, vocab)
    if summary["failed"]:
        raise SystemExit(f"{summary['failed']} warm-up requests failed: {summary['errors']}")


async def run_load(url: str, args, vocab: int) -> dict:
    prompts, output_lens, arrivals = workload(args, vocab)
    async with client_session() as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(
                one_request(client, url, p, n, a, t0)
                for p, n, a in zip(prompts, output_lens, arrivals, strict=True)
            )
        )
        wall = time.perf_counter() - t0
    return summarize(
        list(results),
        wall,
        {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms, "e2el": args.slo_e2el_ms},
    )


def run_offline(model: Path, args, vocab: int) -> dict:
    """The same requests through the offline engine (one ``LLM.generate``, after a warm-up), with
    the workers' engine options: the ceiling the online figures are held against."""
    from services.cli import parse
    from tandem.engine import LLM, SamplingParams

    flags = ["decode", "--model", str(model), "--device", args.device, *args.worker_args]
    if args.num_kv_blocks:
        flags += ["--num-kv-blocks", str(args.num_kv_blocks)]
    _, settings = parse(flags)
    llm = LLM(model, **settings.engine_options())
    prompts, output_lens, _ = workload(args, vocab)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in output_lens]
    llm.generate(prompts[:8], params[:8])
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    return {
        "completed": len(outs),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_throughput": tokens / wall,
    }


def print_profile(mode: str, rows: list[dict]) -> None:
    print(f"\n{mode}: where each busy thread spent its time (py-spy, % of one core)")
    for r in rows:
        if r["busy_pct"] < 5:
            continue
        top = "; ".join(f"{f} {p}%" for f, p in r["top"][:4])
        print(f"  {r['process']:<16} {r['thread'][:40]:<40} {r['busy_pct']:5.1f}%  {top}")


def prefix_cache_counters(cluster) -> dict[str, tuple[int, int]]:
    """Per role, the pods' summed (prefix-cache queries, hits) in tokens, from their GetStats."""
    from services.local_cluster import pod_stats

    totals = {}
    for role in ("prefill", "decode"):
        stats = [pod_stats(pod, cluster.auth) for pod in cluster.pods(role)]
        totals[role] = (
            sum(st.prefix_cache_queries for st in stats),
            sum(st.prefix_cache_hits for st in stats),
        )
    return totals


def kv_transport_bytes(cluster) -> dict[str, float]:
    """KV bytes the prefill pods moved, by transport, and their transport fallbacks (so a run
    says which data plane it measured)."""
    from services.local_cluster import counter_totals

    totals: dict[str, float] = {}
    for pod in cluster.pods("prefill"):
        for transport, n in counter_totals(
            pod.metrics_url, "tandem_kv_transfer_bytes", "transport"
        ).items():
            totals[transport] = totals.get(transport, 0.0) + n
        fallbacks = counter_totals(pod.metrics_url, "tandem_kv_transfer_fallbacks", "transport")
        totals["fallbacks"] = totals.get("fallbacks", 0.0) + sum(fallbacks.values())
    return totals


def routing_counts(cluster) -> dict[str, float]:
    """The router's requests placed by mode, and its attempts (more than requests: retries)."""
    from services.local_cluster import counter_totals

    url = cluster.by_name("router").metrics_url
    modes = counter_totals(url, "tandem_router_routing_decisions", "mode")
    return {
        "colocated": modes.get("colocated", 0.0),
        "disaggregated": modes.get("disaggregated", 0.0),
        "attempts": counter_totals(url, "tandem_router_attempts").get(None, 0.0),
    }


def settled_routing_counts(cluster, before: dict, requests: int, timeout_s: float = 5.0) -> dict:
    """The router's counts once it counted all ``requests`` (a stream is counted as it closes,
    a moment after the client read its end)."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = routing_counts(cluster)
        placed = sum(after[k] - before[k] for k in ("colocated", "disaggregated"))
        if placed >= requests or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def routing_problem(mode: str, before: dict, after: dict) -> str | None:
    """Why the run did not measure ``mode`` (requests placed otherwise, or retried), if it did
    not."""
    placed = {k: after[k] - before[k] for k in after}
    requests = placed["colocated"] + placed["disaggregated"]
    wanted = "colocated" if mode == "colocated" else "disaggregated"
    if placed[wanted] != requests:
        return (
            f"{mode}: {placed['colocated']:g} requests ran colocated, "
            f"{placed['disaggregated']:g} disaggregated"
        )
    if placed["attempts"] != requests:
        return (
            f"{mode}: {placed['attempts']:g} attempts for {requests:g} requests "
            "(retries after failures)"
        )
    return None


def hit_rates(before: dict, after: dict) -> dict[str, float | None]:
    """Each role's prefix-cache hit rate over the run (None: that role saw no prompt)."""
    rates = {}
    for role in after:
        queries = after[role][0] - before[role][0]
        rates[role] = (after[role][1] - before[role][1]) / queries if queries else None
    return rates


def mode_workers(mode: str, args) -> tuple[int, int]:
    """(prefill, decode) workers a mode runs."""
    workers = args.workers
    return {
        "colocated": (0, workers),
        "disaggregated": (workers // 2, workers - workers // 2),
        "prefix-aware": (args.prefill_workers, args.decode_workers),
        "load-only": (args.prefill_workers, args.decode_workers),
    }[mode]


def start_system(model: Path, mode: str, args):
    from services.local_cluster import LocalCluster, UpOptions

    prefill, decode = mode_workers(mode, args)
    opts = UpOptions(
        model=model,
        port=0,
        device=args.device,
        num_kv_blocks=args.num_kv_blocks,
        prefill=prefill,
        decode=decode,
        worker_args=args.worker_args,
        kvstore=mode != "load-only",
        gpu_per_worker=getattr(args, "gpu_per_worker", False),
    )
    cluster = LocalCluster(opts, model, relay=False)
    cluster.start_redis()
    cluster.plan()
    cluster.start()
    problem = cluster.wait_ready(600)
    if problem:
        cluster.stop()
        raise SystemExit(f"{mode}: {problem}\n{''.join(list(cluster.log)[-40:])}")
    return cluster


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", help="benchmark this running router instead of starting the system")
    ap.add_argument("--model", type=Path, help="model directory (default: a generated tiny llama)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["colocated", "disaggregated"],
        choices=["colocated", "disaggregated", "prefix-aware", "load-only"],
    )
    ap.add_argument(
        "--workers", type=int, default=2, help="GPU workers per mode (disaggregated: half prefill)"
    )
    ap.add_argument(
        "--gpu-per-worker",
        action="store_true",
        help="CUDA: each worker on a GPU of its own (cuda:0, cuda:1, ...), not all sharing one",
    )
    ap.add_argument("--prefill-workers", type=int, default=2, help="prefix-aware / load-only modes")
    ap.add_argument("--decode-workers", type=int, default=1, help="prefix-aware / load-only modes")
    ap.add_argument(
        "--workload",
        choices=["random", "prefix-repetition", "sharegpt"],
        default="random",
        help="sharegpt: W4, lognormal lengths (median 150 in / 140 out, sigma 0.85)",
    )
    ap.add_argument(
        "--offline",
        action="store_true",
        help="also run the offline engine on the same requests; report online / offline",
    )
    ap.add_argument("--num-prefixes", type=int, default=10)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--suffix-len", type=int, default=256)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument(
        "--worker-args",
        type=shlex.split,
        default=[],
        help='extra flags for every worker, one string: --worker-args "--load-format dummy" '
        "(a lone flag: --worker-args=--enforce-eager)",
    )
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument(
        "--rate", type=float, default=float("inf"), help="requests/s (Poisson), inf: all at once"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--num-warmups",
        type=int,
        default=0,
        help="workload-shaped requests sent (at --rate) before the measured ones, per mode, "
        "and left out of the figures (vLLM bench serve's --num-warmups)",
    )
    ap.add_argument(
        "--mps",
        action="store_true",
        help="run the modes under a CUDA MPS control daemon private to this run (bench/mps.py; "
        "one for all modes, not for --offline): the workers sharing the GPU run their kernels "
        "concurrently instead of time-slicing it",
    )
    ap.add_argument("--slo-ttft-ms", type=float, default=None)
    ap.add_argument("--slo-tpot-ms", type=float, default=None)
    ap.add_argument("--slo-e2el-ms", type=float, default=None)
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument(
        "--trace-breakdown",
        action="store_true",
        help="export every service's spans to an in-process OTLP receiver; print each phase's "
        "start offset and duration per mode (bench/trace_breakdown.py)",
    )
    ap.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="record every process (py-spy, all threads) during the load; print where time went",
    )
    args = ap.parse_args()

    from tandem.model_dir import load_model_config

    model = args.model
    if model is None:
        from tandem.model_gen import ModelGenOptions, generate_model_dir

        model = generate_model_dir(
            ModelGenOptions(arch="llama", out=Path(tempfile.mkdtemp()) / "tiny")
        )
    vocab = load_model_config(model).vocab_size
    results, problems = {}, []
    if args.url:
        asyncio.run(warm_up(args.url, vocab))
        results["target"] = asyncio.run(run_load(args.url, args, vocab))
    else:
        receiver = None
        if args.trace_breakdown:
            import os

            from trace_breakdown import OTLPReceiver

            receiver = OTLPReceiver().__enter__()
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint  # the children inherit it
            os.environ["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
        with MPSDaemon() if args.mps else contextlib.nullcontext():
            for mode in args.modes:
                cluster = start_system(model, mode, args)
                try:
                    asyncio.run(warm_up(cluster.router_url, vocab))
                    if args.num_warmups:
                        asyncio.run(warm_up_with_workload(cluster.router_url, args, vocab))
                    before, routed = prefix_cache_counters(cluster), routing_counts(cluster)
                    kv_before = kv_transport_bytes(cluster)
                    profiler = Profiler(args.profile_dir / mode) if args.profile_dir else None
                    if profiler is not None:
                        profiler.start(cluster)
                    if receiver is not None:
                        time.sleep(6)  # the warm-up's spans are exported (batched) before the load
                        skip = len(receiver.spans())
                    results[mode] = asyncio.run(run_load(cluster.router_url, args, vocab))
                    if receiver is not None:
                        from trace_breakdown import phase_table, print_phase_table

                        time.sleep(6)  # batch span processors export every 5 s
                        table = phase_table(receiver.spans()[skip:])
                        results[mode]["trace_breakdown"] = table
                        print_phase_table(mode, table)
                    if profiler is not None:
                        profiler.stop()
                        results[mode]["profile"] = profiler.summary()
                        print_profile(mode, results[mode]["profile"])
                    # usage.cached_tokens also counts blocks the decode pod had cached (they are not
                    # sent): the prefill pods' own rate is what prefix-aware routing moves.
                    results[mode]["pod_cache_hit_rate"] = hit_rates(
                        before, prefix_cache_counters(cluster)
                    )
                    kv_after = kv_transport_bytes(cluster)
                    results[mode]["kv_transport_bytes"] = {
                        # A pod restarted mid-run resets its counters: never below zero.
                        k: max(0.0, v - kv_before.get(k, 0.0))
                        for k, v in kv_after.items()
                    }
                    if results[mode]["kv_transport_bytes"]:
                        moved = results[mode]["kv_transport_bytes"]
                        print(f"{mode}: KV bytes by transport {moved}")
                    # A disaggregated request whose prefill fails is retried colocated and still
                    # succeeds: check the run measured the mode it claims.
                    problem = routing_problem(
                        mode, routed, settled_routing_counts(cluster, routed, args.num_prompts)
                    )
                    if problem:
                        problems.append(problem)
                        print(
                            f"warning: {problem}; the workers' last lines:\n"
                            f"{''.join(list(cluster.log)[-20:])}",
                            file=sys.stderr,
                        )
                finally:
                    cluster.stop()
    offline = run_offline(model, args, vocab) if args.offline else None
    if offline is not None:
        for r in results.values():
            r["vs_offline"] = r["output_throughput"] / offline["output_throughput"]
    shape = {
        "prefix-repetition": (
            f"{args.num_prefixes} prefixes x ({args.prefix_len} + {args.suffix_len}) in"
        ),
        "sharegpt": "lognormal in (median 150, cap 1024)",
    }.get(args.workload, f"{args.input_len} in")
    out_shape = "lognormal (median 140)" if args.workload == "sharegpt" else args.output_len
    payload = {
        "workload": (
            f"{args.workload}: {shape} / {out_shape} out, "
            f"{args.num_prompts} prompts, rate {args.rate}"
        ),
        "device": args.device,
        "model": model.name,
        "worker_args": args.worker_args,
        "workers": {
            m: dict(zip(("prefill", "decode"), mode_workers(m, args), strict=True))
            for m in args.modes
        },
        "command": shlex.join(sys.argv),
        "num_warmups": args.num_warmups,
        "mps": args.mps,
        "results": results,
        "offline": offline,
    }
    path = write_result(f"serve-{args.workload}-{model.name}", args.device, payload, args.out_dir)
    rows = []
    for mode, r in results.items():
        rows.append(
            [
                mode,
                r["completed"],
                r["failed"],
                r["request_throughput"],
                r["output_throughput"],
                r["ttft_ms"]["median"],
                r["ttft_ms"]["p99"],
                r["tpot_ms"]["median"],
                r["itl_ms"]["median"],
                r["e2el_ms"]["median"],
                r["goodput"],
                r["cache_hit_rate"],
                r.get("pod_cache_hit_rate", {}).get("prefill"),
            ]
        )
    print_table(
        [
            "mode",
            "ok",
            "failed",
            "req/s",
            "out tok/s",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "TPOT p50 ms",
            "ITL p50 ms",
            "E2EL p50 ms",
            "goodput req/s",
            "cached (usage)",
            "prefill pods' hit rate",
        ],
        rows,
    )
    if len(results) == 2 and all(r["completed"] for r in results.values()):
        a, b = (results[m] for m in args.modes)
        print(
            f"{args.modes[1]}/{args.modes[0]}: output throughput "
            f"x{b['output_throughput'] / a['output_throughput']:.2f}, "
            f"TTFT p50 x{b['ttft_ms']['median'] / a['ttft_ms']['median']:.2f}, "
            f"TPOT p50 x{b['tpot_ms']['median'] / a['tpot_ms']['median']:.2f}"
        )
    if offline is not None:
        print(
            f"offline engine, same requests: {offline['output_throughput']:.1f} output tok/s; "
            + ", ".join(f"{m} x{r['vs_offline']:.2f} of it" for m, r in results.items())
        )
    print(f"wrote {path}")
    failed = sum(r["failed"] for r in results.values())
    if failed:
        raise SystemExit(f"{failed} requests failed: {[r['errors'] for r in results.values()]}")
    if problems:
        raise SystemExit("not a measurement of the modes named: " + "; ".join(problems))


if __name__ == "__main__":
    main()
