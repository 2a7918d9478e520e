"""The router's Prometheus metrics (``tandem_router_*``), in a registry of its own."""

from prometheus_client import CollectorRegistry, Counter, Histogram


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tandem_router_requests", "HTTP requests by route and status code", ["route", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "tandem_router_request_duration_seconds", "Time to the response (non-streaming) or the stream start",
            ["route"], registry=self.registry,
        )
        self.routing_decisions = Counter(
            "tandem_router_routing_decisions", "Requests placed, by mode (disaggregated or colocated)", ["mode"],
            registry=self.registry,
        )
        self.prefill_choices = Counter(
            "tandem_router_prefill_choices",
            "Prefill pod choices by reason: prefix (a cached prefix won), load, index_unavailable",
            ["reason"], registry=self.registry,
        )
        self.attempts = Counter(
            "tandem_router_attempts", "Attempts to run requests on pods (more than requests: retries)",
            registry=self.registry,
        )
