"""Prometheus metrics of a prefill or decode pod: vLLM's core set with the same names and meaning
(so existing dashboards and autoscalers work), plus ``tandem_*`` for what vLLM does not have.

Gauges and cumulative counters are read from the engine's stats snapshot at scrape time (no
work on the engine thread); latency histograms are observed when requests finish. Every series
carries ``model_name`` and ``role``; none carries a request id or prompt.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.api.outputs import RequestMetrics

LABELS = ["model_name", "role"]
# vLLM's buckets for these histograms.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class _EngineStatsCollector:
    """vllm:* gauges and counters from the engine core's latest EngineStats snapshot."""

    def __init__(self, source, labels: dict[str, str]) -> None:
        self.source = source
        self.labels = labels

    def collect(self):
        s = self.source.stats
        values = list(self.labels.values())

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(values, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            s.kv_cache_usage,
        )
        yield counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", s.prefix_cache_queries
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", s.prefix_cache_hits
        )
        yield counter(
            "vllm:num_preemptions", "Cumulative number of preemptions.", s.num_preemptions
        )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", s.generation_tokens
        )
        yield gauge(
            "tandem_pod_requests_waiting_for_kv",
            "Requests holding blocks while their KV arrives.",
            s.num_waiting_for_kv,
        )
        yield gauge(
            "tandem_pod_queued_prefill_tokens",
            "Prompt tokens queued for prefill.",
            s.num_queued_prefill_tokens,
        )


class PodMetrics:
    def __init__(self, core, *, model_name: str, role: str, cache_config: dict[str, str]) -> None:
        self.registry = r = CollectorRegistry()
        self.labels = {"model_name": model_name, "role": role}
        r.register(_EngineStatsCollector(core, self.labels))
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the KV cache configuration.",
            LABELS + sorted(cache_config),
            registry=r,
        )
        info.labels(**self.labels, **cache_config).set(1)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token, from arrival at this pod.",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        ).labels(**self.labels)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            LABELS,
            buckets=ITL_BUCKETS,
            registry=r,
        ).labels(**self.labels)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end latency of requests at this pod.",
            LABELS,
            buckets=E2E_BUCKETS,
            registry=r,
        ).labels(**self.labels)
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time requests spent waiting to be scheduled.",
            LABELS,
            buckets=E2E_BUCKETS,
            registry=r,
        ).labels(**self.labels)
        self.kv_bytes = Counter(
            "tandem_kv_transfer_bytes",
            "KV page bytes pushed (prefill) or received (decode), by transport.",
            LABELS + ["transport"],
            registry=r,
        )
        self.kv_fallbacks = Counter(
            "tandem_kv_transfer_fallbacks",
            "KV transfers that used a slower transport than configured (--kv-transport).",
            LABELS + ["wanted", "transport"],
            registry=r,
        )
        self.kv_seconds = Histogram(
            "tandem_kv_transfer_duration_seconds",
            "From a transfer's first chunk to its acknowledgement.",
            LABELS,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        ).labels(**self.labels)
        self.kv_transfers = Counter(
            "tandem_kv_transfers", "KV transfers by outcome.", LABELS + ["outcome"], registry=r
        )

    def fallback(self, wanted: str, transport: str) -> None:
        self.kv_fallbacks.labels(**self.labels, wanted=wanted, transport=transport).inc()

    def serve(self, port: int) -> None:
        """Expose /metrics over HTTP on ``port`` (a thread of prometheus_client)."""
        start_http_server(port, registry=self.registry)

    def observe_finished(self, m: RequestMetrics) -> None:
        """A request finished on this pod: its queue time, TTFT and end-to-end latency."""
        end = m.finished_time or time.monotonic()
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
        self.e2e.observe(end - m.arrival_time)

    def transfer(
        self,
        outcome: str,
        nbytes: int = 0,
        seconds: float | None = None,
        transport: str = "grpc",
    ) -> None:
        self.kv_transfers.labels(**self.labels, outcome=outcome).inc()
        if nbytes:
            self.kv_bytes.labels(**self.labels, transport=transport).inc(nbytes)
        if seconds is not None:
            self.kv_seconds.observe(seconds)
