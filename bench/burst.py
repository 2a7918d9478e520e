"""Burst benchmark: N requests sent at once, every client kept connected; outcomes by class.

Reproduces issue 18's "bursts cancel live requests": every request opens its own connection at
the same moment, waits for its whole answer (no client timeout short of ``--client-timeout-s``)
and is classified by what came back: ``200``, ``429``/``503`` (with or without ``Retry-After``;
an overload answer without it is a defect), ``499`` (the router cancelled a request whose client
was still connected: the bug this benchmark exists for), any other status, or a transport error
(connection refused or reset, client timeout). Failures are counted, never raised.

Against a running router, or one started for the run (``--start``: a LocalCluster on the tiny
generated model, CPU, stopped afterwards):

    python bench/burst.py --url http://127.0.0.1:8000 --requests 2000
    python bench/burst.py --start --requests 2000 --max-tokens 8
    python bench/burst.py --start --requests 1 --prompts-per-request 1000   # one wide request

Prints a table of outcomes and writes bench/results/<date>_<device>_burst.json (or --out).
Exit status 1 when any request got 499, an overload answer lacked Retry-After, or (with
``--strict``) anything other than 200/429/503 came back.
"""

import argparse
import asyncio
import collections
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

OVERLOAD = (429, 503)


@dataclass(slots=True)
class Outcome:
    status: int | None
    """HTTP status, or None for a transport failure."""
    kind: str
    """"ok", "overload", "overload-no-retry-after", "cancelled", "http-<status>" or an exception
    class name."""
    seconds: float
    detail: str = ""
    """The error message (truncated), for anything but ok."""


def classify(status: int, headers: httpx.Headers, body: bytes, seconds: float) -> Outcome:
    if status == 200:
        return Outcome(status, "ok", seconds)
    try:
        detail = str(json.loads(body)["error"]["message"])[:160]
    except (ValueError, KeyError, TypeError):
        detail = "(no OpenAI error envelope) " + body[:120].decode("utf-8", "replace")
    if status in OVERLOAD:
        kind = "overload" if headers.get("retry-after") else "overload-no-retry-after"
    elif status == 499:
        kind = "cancelled"
    else:
        kind = f"http-{status}"
    return Outcome(status, kind, seconds, detail)


def request_body(args: argparse.Namespace, i: int) -> dict:
    # Distinct prompts, so no request rides entirely on another's cached prefix.
    prompts = [
        f"burst request {i} prompt {j}: the quick brown fox jumps over the lazy dog"
        for j in range(args.prompts_per_request)
    ]
    return {
        "model": args.model,
        "prompt": prompts if len(prompts) > 1 else prompts[0],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": args.stream,
    }


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict, start: asyncio.Event
) -> Outcome:
    await start.wait()
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            data = await resp.aread()
            if resp.status_code == 200 and body["stream"]:
                # An SSE stream that fails after its headers carries the error as an event.
                for line in data.decode("utf-8", "replace").splitlines():
                    if line.startswith("data: {") and '"error"' in line:
                        err = json.loads(line[6:]).get("error", {})
                        code = int(err.get("code") or 500)
                        return classify(
                            code, httpx.Headers(), json.dumps({"error": err}).encode(), 0.0
                        )
            return classify(resp.status_code, resp.headers, data, time.perf_counter() - t0)
    except Exception as e:  # counted, not raised: a connection error is an outcome like any other
        return Outcome(None, type(e).__name__, time.perf_counter() - t0, str(e)[:160])


async def burst(args: argparse.Namespace, base_url: str) -> tuple[list[Outcome], float]:
    """Fire ``args.requests`` requests at once, each on its own connection; wait for all."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(args.client_timeout_s, connect=args.client_timeout_s)
    url = f"{base_url.rstrip('/')}/v1/completions"
    start = asyncio.Event()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        tasks = [
            asyncio.create_task(one_request(client, url, request_body(args, i), start))
            for i in range(args.requests)
        ]
        await asyncio.sleep(0)  # every task is waiting on the start line
        t0 = time.perf_counter()
        start.set()
        outcomes = await asyncio.gather(*tasks)
    return outcomes, time.perf_counter() - t0


def summarize(outcomes: list[Outcome]) -> list[dict]:
    groups: dict[tuple, list[Outcome]] = collections.defaultdict(list)
    for o in outcomes:
        groups[(o.status, o.kind)].append(o)
    rows = []
    for (status, kind), group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        seconds = sorted(o.seconds for o in group)
        rows.append(
            {
                "status": status,
                "kind": kind,
                "count": len(group),
                "p50_s": seconds[len(seconds) // 2],
                "max_s": seconds[-1],
                "example": next((o.detail for o in group if o.detail), ""),
            }
        )
    return rows


def start_cluster(args: argparse.Namespace):
    from services.local_cluster import LocalCluster, UpOptions
    from tandem.model_gen import ensure_default_model

    model = ensure_default_model()
    opts = UpOptions(
        model=model,
        port=0,
        prefill=args.prefill,
        decode=args.decode,
        num_kv_blocks=args.num_kv_blocks,
        worker_args=args.worker_args,
        router_args=args.router_args,
    )
    cluster = LocalCluster(opts, model, relay=False)
    cluster.start_redis()
    cluster.plan()
    cluster.start()
    problem = cluster.wait_ready(300)
    if problem is not None:
        cluster.stop()
        raise SystemExit(f"cluster did not start: {problem}\n{''.join(list(cluster.log)[-40:])}")
    return cluster


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="router base URL (default: --start one)")
    p.add_argument("--start", action="store_true", help="start a LocalCluster for the run")
    p.add_argument("--model", default="tiny-llama", help="model name sent in requests")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--prompts-per-request", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--client-timeout-s", type=float, default=600.0)
    p.add_argument("--prefill", type=int, default=1, help="--start: prefill workers")
    p.add_argument("--decode", type=int, default=1, help="--start: decode workers")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="--start: per worker")
    p.add_argument("--worker-args", default="[]", help="--start: JSON list of worker flags")
    p.add_argument("--router-args", default="[]", help="--start: JSON list of router flags")
    p.add_argument("--strict", action="store_true", help="fail on anything but 200/429/503")
    p.add_argument("--out", type=Path, help="result directory (default bench/results)")
    p.add_argument("--log-tail", type=int, default=0, help="--start: print N lines of pod logs")
    args = p.parse_args()
    args.worker_args = json.loads(args.worker_args)
    args.router_args = json.loads(args.router_args)
    if not args.url and not args.start:
        p.error("give --url or --start")

    cluster = start_cluster(args) if args.start else None
    try:
        url = args.url or cluster.router_url
        outcomes, wall = asyncio.run(burst(args, url))
        logs = list(cluster.log) if cluster else []
    finally:
        if cluster is not None:
            cluster.stop()

    rows = summarize(outcomes)
    print(
        f"{args.requests} requests x {args.prompts_per_request} prompts, "
        f"max_tokens {args.max_tokens}, stream {args.stream}: {wall:.1f} s"
    )
    print_table(
        ["status", "kind", "count", "p50 s", "max s", "example"],
        [
            [r["status"], r["kind"], r["count"], r["p50_s"], r["max_s"], r["example"][:70]]
            for r in rows
        ],
    )
    marked_down = [line for line in logs if "marked down" in line]
    for line in marked_down[:10]:
        print(line, end="")
    for line in logs[-args.log_tail :] if args.log_tail else []:
        print(line, end="")
    path = write_result(
        "burst",
        "cpu",
        {
            "requests": args.requests,
            "prompts_per_request": args.prompts_per_request,
            "max_tokens": args.max_tokens,
            "stream": args.stream,
            "wall_s": wall,
            "outcomes": rows,
            "pods_marked_down": len(marked_down),
            "all": [asdict(o) for o in outcomes],
        },
        args.out,
    )
    print(f"wrote {path}")
    kinds = collections.Counter(o.kind for o in outcomes)
    bad = kinds["cancelled"] + kinds["overload-no-retry-after"]
    if args.strict:
        bad += sum(n for k, n in kinds.items() if k not in ("ok", "overload"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
