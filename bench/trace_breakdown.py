"""Where a request's time goes, from its OpenTelemetry spans (``bench/serve.py --trace-breakdown``).

Every service exports its spans to an in-process OTLP receiver (the one the tracing tests use);
spans of one request share a trace id. For each (service, span) this reports, over the
requests, the median and p90 of the span's start offset from the request's first span (the
router's server span) and of its duration, and the median of every ``*_seconds`` attribute
(the decode pod's admission / KV wait / TTFT, the prefill pod's queue / compute / transfer).
All services run on one host, so their wall clocks agree to well under a millisecond.
"""

import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from otlp_receiver import OTLPReceiver, ReceivedSpan  # noqa: E402

__all__ = ["OTLPReceiver", "phase_table", "print_phase_table"]


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def phase_table(spans: list[ReceivedSpan], min_traces: int = 1) -> list[dict]:
    """One row per (service, span name, attribute): p50/p90 start offset and duration in ms."""
    by_trace: dict[str, list[ReceivedSpan]] = defaultdict(list)
    for s in spans:
        by_trace[s.trace_id].append(s)
    offsets: dict[tuple[str, str], list[float]] = defaultdict(list)
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)
    attrs: dict[tuple[str, str], list[float]] = defaultdict(list)
    traces = 0
    for trace_spans in by_trace.values():
        routers = [s for s in trace_spans if s.service.endswith("router") and not s.parent_id]
        if not routers:
            continue  # a trace without its root (health polls, warm-up cut short)
        traces += 1
        t0 = min(s.start_ns for s in routers)
        seen: set[tuple[str, str]] = set()
        for s in sorted(trace_spans, key=lambda s: s.start_ns):
            key = (s.service.removeprefix("tandem-"), s.name)
            if key in seen:
                continue  # retries and repeated client spans: the first one only
            seen.add(key)
            offsets[key].append((s.start_ns - t0) / 1e6)
            durations[key].append((s.end_ns - s.start_ns) / 1e6)
            for name, value in s.attributes.items():
                if name.endswith("_seconds") and isinstance(value, int | float):
                    attrs[(key[0], name)].append(value * 1e3)
    rows = []
    for key in sorted(offsets, key=lambda k: statistics.median(offsets[k])):
        if len(offsets[key]) < min_traces:
            continue
        rows.append(
            {
                "service": key[0],
                "span": key[1],
                "count": len(offsets[key]),
                "start_ms_p50": statistics.median(offsets[key]),
                "start_ms_p90": _pct(offsets[key], 0.9),
                "duration_ms_p50": statistics.median(durations[key]),
                "duration_ms_p90": _pct(durations[key], 0.9),
            }
        )
    for key in sorted(attrs):
        rows.append(
            {
                "service": key[0],
                "span": f"attr {key[1]}",
                "count": len(attrs[key]),
                "start_ms_p50": None,
                "start_ms_p90": None,
                "duration_ms_p50": statistics.median(attrs[key]),
                "duration_ms_p90": _pct(attrs[key], 0.9),
            }
        )
    return [{"traces": traces}, *rows]


def print_phase_table(mode: str, rows: list[dict]) -> None:
    head, *rows = rows
    print(f"\n{mode}: span timeline over {head['traces']} requests (ms, from the router's span)")
    columns = ("start p50", "p90", "dur p50", "p90")
    print(f"{'service':>10} {'span':<48} {'n':>5} " + "{:>9} {:>7} {:>8} {:>7}".format(*columns))
    for r in rows:
        start = (
            f"{r['start_ms_p50']:9.2f} {r['start_ms_p90']:7.2f}"
            if r["start_ms_p50"] is not None
            else f"{'':9} {'':7}"
        )
        print(
            f"{r['service']:>10} {r['span'][:48]:<48} {r['count']:5d} {start} "
            f"{r['duration_ms_p50']:8.2f} {r['duration_ms_p90']:7.2f}"
        )
