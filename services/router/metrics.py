"""The router's Prometheus metrics (``tandem_router_*``), in a registry of its own."""

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.router.flow import Route


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tandem_router_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "tandem_router_request_duration_seconds",
            "Time to the response (non-streaming) or the stream start",
            ["route"],
            registry=self.registry,
        )
        self.routing_decisions = Counter(
            "tandem_router_routing_decisions",
            "Requests placed, by mode (disaggregated or colocated)",
            ["mode"],
            registry=self.registry,
        )
        self.prefill_choices = Counter(
            "tandem_router_prefill_choices",
            "Prefill pod choices by reason: prefix (a cached prefix won), load, index_unavailable",
            ["reason"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "tandem_router_attempts",
            "Attempts to run requests on pods (more than requests: retries)",
            registry=self.registry,
        )
        # The prefill choice's score breakdown (the chosen pod's terms; every candidate's are on
        # the request's `route` span and in the DEBUG log).
        self.prefill_cached_fraction = Histogram(
            "tandem_router_prefill_cached_fraction",
            "Fraction of the prompt the chosen prefill pod caches (kvstore's answer), "
            "per request (its final choice)",
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=self.registry,
        )
        self.prefill_queued_tokens = Histogram(
            "tandem_router_prefill_queued_tokens",
            "Prefill tokens queued on the chosen pod when it was chosen (its load term), "
            "per request",
            buckets=(0, 256, 1024, 4096, 16384, 65536, 262144),
            registry=self.registry,
        )
        self.prefill_hotspot_choices = Counter(
            "tandem_router_prefill_hotspot_choices",
            "Prefill choices where the hot-spot guard denied some pod credit for its cache",
            registry=self.registry,
        )

        self.migrations = Counter(
            "tandem_router_migrations",
            "Requests moved to another decode pod after theirs failed mid-stream, by outcome: "
            "resumed (another pod continued the stream), failed (none could take it), limit "
            "(--max-migrations used up; 0 turns migration off), unsupported (n or best_of above "
            "1: such requests fail instead)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("resumed", "failed", "limit", "unsupported"):
            self.migrations.labels(outcome)

    def observe_route(self, route: Route, prompt_tokens: int) -> None:
        """Count one request's placement: mode, attempts, migrations, and the prefill choice's
        breakdown."""
        self.routing_decisions.labels(route.mode or "unplaced").inc()
        self.attempts.inc(route.attempts)
        for migration in route.migrations:
            self.migrations.labels(migration.outcome).inc()
        if route.prefill_reason and route.prefill:  # not when the last attempt ran colocated
            self.prefill_choices.labels(route.prefill_reason).inc()
        chosen = next((c for c in route.candidates if c.pod.address == route.prefill), None)
        if chosen is not None:
            self.prefill_cached_fraction.observe(chosen.cached_tokens / max(1, prompt_tokens))
            self.prefill_queued_tokens.observe(chosen.queued_tokens)
            if any(c.hot for c in route.candidates):
                self.prefill_hotspot_choices.inc()
