"""Every service's /metrics: the names, types and labels operators rely on, and counters that
move."""

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

POD_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:cache_config_info": "gauge",
    "tandem_kv_transfer_bytes": "counter",
    "tandem_kv_transfer_duration_seconds": "histogram",
}
ROUTER_METRICS = {
    "tandem_router_requests": "counter",
    "tandem_router_request_duration_seconds": "histogram",
    "tandem_router_routing_decisions": "counter",
    "tandem_router_prefill_choices": "counter",
    "tandem_router_attempts": "counter",
}
KVSTORE_METRICS = {
    "tandem_kvstore_index_entries": "gauge",
    "tandem_kvstore_lookups": "counter",
    "tandem_kvstore_lookup_hit_blocks": "counter",
    "tandem_kvstore_evictions": "gauge",
    "tandem_kvstore_lookup_duration_seconds": "histogram",
    "tandem_kvstore_event_lag_seconds": "histogram",
    "tandem_kvstore_events": "counter",
}


def scrape(url: str) -> dict:
    families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
    return {f.name: f for f in families}


def value(families: dict, name: str, suffix: str = "", **labels) -> float:
    total = 0.0
    for sample in families[name].samples:
        if sample.name == name + suffix and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            total += sample.value
    return total


def test_every_service_exports_its_metrics_and_counters_move(cluster):
    pods = cluster.pods("prefill") + cluster.pods("decode")
    before = {
        s.name: scrape(s.metrics_url)
        for s in pods + [cluster.by_name("router"), cluster.by_name("kvstore")]
    }
    for i in range(3):
        r = httpx.post(
            f"{cluster.router_url}/v1/completions",
            json={"prompt": f"metrics {i} " + "shared prefix " * 10, "max_tokens": 5},
            timeout=60,
        )
        assert r.status_code == 200
    after = {name: scrape(cluster.by_name(name).metrics_url) for name in before}

    for pod in pods:
        role = pod.name.split("-")[0]
        families = after[pod.name]
        for name, kind in POD_METRICS.items():
            assert name in families, f"{pod.name} lacks {name}"
            assert families[name].type == kind, (name, families[name].type)
            for sample in families[name].samples:
                assert sample.labels["model_name"] == "llama" and sample.labels["role"] == role
                assert not any(k in sample.labels for k in ("request_id", "prompt"))
        info = next(s for s in families["vllm:cache_config_info"].samples)
        assert info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == "256"
    prefill = cluster.pods("prefill")[0].name
    decodes = [p.name for p in cluster.pods("decode")]

    def grew(name, metric, suffix):
        return value(after[name], metric, suffix) > value(before[name], metric, suffix)

    assert grew(prefill, "vllm:prefix_cache_queries", "_total")
    assert grew(prefill, "tandem_kv_transfer_bytes", "_total")
    assert grew(prefill, "vllm:prompt_tokens", "_total")
    assert any(grew(d, "vllm:generation_tokens", "_total") for d in decodes)
    assert any(grew(d, "vllm:e2e_request_latency_seconds", "_count") for d in decodes)
    assert any(grew(d, "vllm:inter_token_latency_seconds", "_count") for d in decodes)
    assert sum(
        value(after[d], "tandem_kv_transfer_bytes", "_total")
        - value(before[d], "tandem_kv_transfer_bytes", "_total")
        for d in decodes
    ) == value(after[prefill], "tandem_kv_transfer_bytes", "_total") - value(
        before[prefill], "tandem_kv_transfer_bytes", "_total"
    )  # every byte sent was received

    for name, kind in ROUTER_METRICS.items():
        assert after["router"][name].type == kind
    assert (
        value(
            after["router"],
            "tandem_router_requests",
            "_total",
            route="/v1/completions",
            status="200",
        )
        - value(
            before["router"],
            "tandem_router_requests",
            "_total",
            route="/v1/completions",
            status="200",
        )
        == 3
    )
    for name, kind in KVSTORE_METRICS.items():
        assert after["kvstore"][name].type == kind
    assert grew("kvstore", "tandem_kvstore_lookups", "_total")
    assert value(after["kvstore"], "tandem_kvstore_events", "_total", kind="stored") > 0


DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy/helm/tandem/files/dashboards"


def queried_metrics(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [
        v["query"]["query"]
        for v in dashboard["templating"]["list"]
        if isinstance(v.get("query"), dict)
    ]
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
        names |= set(re.findall(r"label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*)", expr))
    return names - {"sum", "rate", "max", "histogram_quantile"}


def exported_series(families: dict) -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {name + s for name, f in families.items() for s in suffixes.get(f.type, [""])}


def test_every_metric_the_dashboards_query_is_exported(cluster):
    httpx.post(
        f"{cluster.router_url}/v1/completions",
        json={"prompt": "dashboards", "max_tokens": 3},
        timeout=60,
    )
    services = (
        cluster.pods("prefill")
        + cluster.pods("decode")
        + [cluster.by_name("router"), cluster.by_name("kvstore")]
    )
    exported = set().union(*(exported_series(scrape(s.metrics_url)) for s in services))
    files = sorted(DASHBOARDS.glob("*.json"))
    assert len(files) == 2
    for path in files:
        queried = queried_metrics(json.loads(path.read_text()))
        assert len(queried) > 10, path.name
        assert sorted(queried - exported) == [], path.name
