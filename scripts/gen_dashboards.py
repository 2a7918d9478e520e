"""Write the Grafana dashboards (deploy/helm/tandem/files/dashboards/*.json) from this one source.

Dashboards as code: panels are declared below and rendered to Grafana's JSON model, so every
panel has the same variables, units and layout rules, and a reviewer reads PromQL, not JSON.
The chart ships the output as a ConfigMap for Grafana's dashboard sidecar; tests check that the
committed JSON is what this script writes and that every metric it queries is exported.

    python scripts/gen_dashboards.py          # rewrite the JSON files
    python scripts/gen_dashboards.py --check  # exit 1 if they are stale
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "deploy/helm/tandem/files/dashboards"
SEL = 'namespace=~"$namespace", model_name=~"$model"'
"""Label selector of every pod series (vllm:* and tandem_kv_*)."""
NS = 'namespace=~"$namespace"'
"""Label selector of router and kvstore series (they carry no model_name)."""
RATE = "$__rate_interval"


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]
    """(PromQL, legend) pairs."""
    unit: str = "short"
    description: str = ""
    width: int = 12
    kind: str = "timeseries"
    extra: dict = field(default_factory=dict)


def quantiles(
    metric: str, selector: str, by: str = "", qs=(0.5, 0.9, 0.99)
) -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    legend_by = "".join(f" {{{{{b.strip()}}}}}" for b in by.split(",") if b.strip())
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{int(q * 100)}{legend_by}",
        )
        for q in qs
    ]


def row(title: str) -> Panel:
    return Panel(title, [], kind="row", width=24)


SERVING = [
    row("Requests"),
    Panel(
        "Router requests by status",
        [(f"sum by (status) (rate(tandem_router_requests_total{{{NS}}}[{RATE}]))", "{{status}}")],
        unit="reqps",
        description="HTTP requests answered by the routers, by status code.",
    ),
    Panel(
        "Errors and retries",
        [
            (
                f'sum(rate(tandem_router_requests_total{{{NS}, status=~"5..|429"}}[{RATE}])) '
                f"/ sum(rate(tandem_router_requests_total{{{NS}}}[{RATE}]))",
                "error ratio (5xx, 429)",
            ),
            (
                f"sum(rate(tandem_router_attempts_total{{{NS}}}[{RATE}])) "
                f"/ sum(rate(tandem_router_routing_decisions_total{{{NS}}}[{RATE}])) - 1",
                "retries per request",
            ),
        ],
        unit="percentunit",
    ),
    Panel(
        "Token throughput",
        [
            (f"sum(rate(vllm:generation_tokens_total{{{SEL}}}[{RATE}]))", "generated tokens/s"),
            (
                f'sum(rate(vllm:prompt_tokens_total{{{SEL}, role="prefill"}}[{RATE}]))',
                "prompt tokens/s (prefill pods)",
            ),
            (
                f'sum(rate(vllm:prompt_tokens_total{{{SEL}, role="decode"}}[{RATE}]))',
                "prompt tokens/s (colocated)",
            ),
        ],
        unit="short",
    ),
    Panel(
        "Routing",
        [
            (
                f"sum by (mode) (rate(tandem_router_routing_decisions_total{{{NS}}}[{RATE}]))",
                "{{mode}}",
            ),
            (
                f"sum by (reason) (rate(tandem_router_prefill_choices_total{{{NS}}}[{RATE}]))",
                "prefill by {{reason}}",
            ),
        ],
        unit="reqps",
        description="Disaggregated vs colocated placements; why each prefill pod was chosen.",
    ),
    row("Latency"),
    Panel(
        "Time to first token (decode pods)",
        quantiles("vllm:time_to_first_token_seconds", f'{SEL}, role="decode"'),
        unit="s",
        description="From arrival at the decode pod (admission, KV wait, first token).",
    ),
    Panel(
        "Inter-token latency",
        quantiles("vllm:inter_token_latency_seconds", f'{SEL}, role="decode"'),
        unit="s",
    ),
    Panel(
        "End-to-end latency (decode pods)",
        quantiles("vllm:e2e_request_latency_seconds", f'{SEL}, role="decode"'),
        unit="s",
    ),
    Panel(
        "Router time to response start",
        quantiles("tandem_router_request_duration_seconds", NS, by="route"),
        unit="s",
        description="Non-streaming: the whole response. Streaming: until the stream starts.",
    ),
    Panel(
        "Queue time",
        quantiles("vllm:request_queue_time_seconds", SEL, by="role", qs=(0.5, 0.99)),
        unit="s",
        description="From arrival at a pod to its first scheduling step.",
    ),
    Panel(
        "Prefill time on prefill pods",
        quantiles("vllm:e2e_request_latency_seconds", f'{SEL}, role="prefill"'),
        unit="s",
        description="Queue plus prompt computation on prefill pods.",
    ),
    row("Queues"),
    Panel(
        "Requests running", [(f"sum by (role) (vllm:num_requests_running{{{SEL}}})", "{{role}}")]
    ),
    Panel(
        "Requests waiting",
        [
            (f"sum by (role) (vllm:num_requests_waiting{{{SEL}}})", "{{role}} waiting"),
            (
                f"sum(tandem_pod_requests_waiting_for_kv{{{SEL}}})",
                "decode: admitted, waiting for KV",
            ),
        ],
        description="What the autoscalers act on (vllm:num_requests_waiting per role).",
    ),
]

KV = [
    row("KV cache"),
    Panel(
        "KV cache usage per pod",
        [(f"vllm:kv_cache_usage_perc{{{SEL}}}", "{{role}} {{pod}}")],
        unit="percentunit",
    ),
    Panel(
        "Prefix cache hit rate per pod",
        [
            (
                f"sum by (role, pod) (rate(vllm:prefix_cache_hits_total{{{SEL}}}[{RATE}])) "
                f"/ sum by (role, pod) (rate(vllm:prefix_cache_queries_total{{{SEL}}}[{RATE}]))",
                "{{role}} {{pod}}",
            )
        ],
        unit="percentunit",
        description="Share of prompt tokens served from the pod's prefix cache.",
    ),
    Panel(
        "Queued prefill tokens per pod",
        [(f'tandem_pod_queued_prefill_tokens{{{SEL}, role="prefill"}}', "{{pod}}")],
        description="The load term of prefix-aware routing.",
    ),
    Panel(
        "Preemptions",
        [
            (
                f"sum by (role, pod) (rate(vllm:num_preemptions_total{{{SEL}}}[{RATE}]))",
                "{{role}} {{pod}}",
            )
        ],
        unit="ops",
        description="Requests recomputed because KV blocks ran out.",
    ),
    row("KV transfer"),
    Panel(
        "KV transfer bandwidth",
        [
            (
                "sum by (pod) "
                f'(rate(tandem_kv_transfer_bytes_total{{{SEL}, role="prefill"}}[{RATE}]))',
                "sent by {{pod}}",
            ),
            (
                "sum by (pod) "
                f'(rate(tandem_kv_transfer_bytes_total{{{SEL}, role="decode"}}[{RATE}]))',
                "received by {{pod}}",
            ),
        ],
        unit="Bps",
    ),
    Panel(
        "KV transfer duration",
        quantiles("tandem_kv_transfer_duration_seconds", f'{SEL}, role="prefill"'),
        unit="s",
        description="From a transfer's first chunk to the decode pod's acknowledgement.",
    ),
    Panel(
        "KV transfers by outcome",
        [(f"sum by (outcome) (rate(tandem_kv_transfers_total{{{SEL}}}[{RATE}]))", "{{outcome}}")],
        unit="ops",
    ),
    row("kvstore (prefix index)"),
    Panel(
        "Index entries",
        [(f"max(tandem_kvstore_index_entries{{{NS}}})", "entries")],
        description="Block entries in the index (bounded by kvstore.capacity).",
    ),
    Panel(
        "Lookups and hits",
        [
            (f"sum(rate(tandem_kvstore_lookups_total{{{NS}}}[{RATE}]))", "lookups/s"),
            (
                f"sum(rate(tandem_kvstore_lookup_hit_blocks_total{{{NS}}}[{RATE}])) "
                f"/ sum(rate(tandem_kvstore_lookups_total{{{NS}}}[{RATE}]))",
                "matched blocks per lookup",
            ),
        ],
    ),
    Panel(
        "Lookup latency",
        quantiles("tandem_kvstore_lookup_duration_seconds", NS),
        unit="s",
        description=(
            "The router abandons lookups slower than --kvstore-timeout-s (50 ms) "
            "and routes by load."
        ),
    ),
    Panel(
        "Event lag",
        quantiles("tandem_kvstore_event_lag_seconds", NS),
        unit="s",
        description="From a pod publishing a cache event to the index applying it.",
    ),
    Panel(
        "Events, rejections, errors",
        [
            (f"sum by (kind) (rate(tandem_kvstore_events_total{{{NS}}}[{RATE}]))", "{{kind}}"),
            (
                f"sum by (reason) (rate(tandem_kvstore_rejected_batches_total{{{NS}}}[{RATE}]))",
                "rejected: {{reason}}",
            ),
            (f"sum(rate(tandem_kvstore_sequence_gaps_total{{{NS}}}[{RATE}]))", "sequence gaps"),
            (f"sum(rate(tandem_kvstore_redis_errors_total{{{NS}}}[{RATE}]))", "Redis errors"),
        ],
        unit="ops",
    ),
]


def dashboard(uid: str, title: str, panels: list[Panel]) -> dict:
    out, x, y, pid = [], 0, 0, 1
    for p in panels:
        if p.kind == "row":
            if x:
                x, y = 0, y + 8
            out.append(
                {
                    "id": pid,
                    "type": "row",
                    "title": p.title,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y += 1
        else:
            if x + p.width > 24:
                x, y = 0, y + 8
            out.append(
                {
                    "id": pid,
                    "type": p.kind,
                    "title": p.title,
                    "description": p.description,
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
                    "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                    "options": {
                        "legend": {
                            "displayMode": "list",
                            "placement": "bottom",
                            "showLegend": True,
                        },
                        "tooltip": {"mode": "multi", "sort": "desc"},
                    },
                    "targets": [
                        {
                            "refId": chr(ord("A") + i),
                            "expr": expr,
                            "legendFormat": legend,
                            "datasource": {"type": "prometheus", "uid": "${datasource}"},
                        }
                        for i, (expr, legend) in enumerate(p.targets)
                    ],
                    **p.extra,
                }
            )
            x += p.width
        pid += 1
    variable = lambda name, label, query, multi=True: {  # noqa: E731
        "name": name,
        "label": label,
        "type": "query",
        "query": {"query": query, "refId": name},
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "refresh": 2,
        "multi": multi,
        "includeAll": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }
    return {
        "uid": uid,
        "title": title,
        "tags": ["tandem", "llm"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable(
                    "namespace", "Namespace", "label_values(vllm:num_requests_running, namespace)"
                ),
                variable(
                    "model",
                    "Model",
                    'label_values(vllm:num_requests_running{namespace=~"$namespace"}, model_name)',
                ),
            ]
        },
        "panels": out,
        "links": [
            {"title": "Tandem", "type": "dashboards", "tags": ["tandem"], "asDropdown": False}
        ],
    }


DASHBOARDS = {
    "tandem-serving.json": dashboard("tandem-serving", "Tandem / Serving", SERVING),
    "tandem-kv.json": dashboard("tandem-kv", "Tandem / KV cache, transfer and index", KV),
}


def rendered() -> dict[str, str]:
    return {name: json.dumps(d, indent=2) + "\n" for name, d in DASHBOARDS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    args = parser.parse_args()
    stale = []
    for name, text in rendered().items():
        path = OUT / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        sys.exit(f"stale dashboards: {', '.join(stale)}; run python scripts/gen_dashboards.py")


if __name__ == "__main__":
    main()
