"""One OpenTelemetry trace per request, across real processes, exported over OTLP/gRPC.

The whole system runs as processes configured only through the standard ``OTEL_*`` variables;
the spans go to a real OTLP endpoint inside the test (``otlp_receiver``).
"""

import json
import time

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider

from tandem.sdk import Client

from .conftest import start_cluster, wait_idle
from .otlp_receiver import OTLPReceiver, ReceivedSpan

pytestmark = pytest.mark.integration
SERVER = Span.SpanKind.SPAN_KIND_SERVER

SECRET = "zebra quartz lantern"
"""Words in every prompt: they must never appear in any span."""
PROMPT = f"{SECRET} " + " ".join(f"w{i}" for i in range(40))  # long enough to need a few KV blocks


@pytest.fixture(scope="module")
def traced(e2e_model):
    with OTLPReceiver() as receiver, pytest.MonkeyPatch.context() as mp:
        # The services inherit the environment: this is all the configuration tracing needs.
        mp.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        mp.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        # A generous kvstore timeout: this test wants the lookup's answer, not the fallback.
        cluster = start_cluster(
            e2e_model, prefill=1, decode=1, router_args=["--kvstore-timeout-s", "2"]
        )
        try:
            wait_for_pods(cluster)
            yield cluster, receiver
        finally:
            cluster.stop()


def wait_for_pods(cluster, timeout: float = 30.0) -> None:
    """Until the router sees the prefill pod too (else the first request would run colocated)."""
    deadline = time.monotonic() + timeout
    while httpx.get(cluster.router_url + "/health", timeout=10).json().get("prefill_pods", 0) < 1:
        assert time.monotonic() < deadline, "the router never saw the prefill pod"
        time.sleep(0.1)


PUSH_KV = "/tandem.decode.v1.DecodeService/PushKV"
COMPLETE_KV = "/tandem.decode.v1.DecodeService/CompleteKV"


def trace_of(spans: list[ReceivedSpan], request_id: str) -> list[ReceivedSpan]:
    """Every span of the trace whose router server span carries ``request_id``."""
    roots = [
        s
        for s in spans
        if s.service == "tandem-router"
        and s.kind == SERVER
        and s.attributes.get("tandem.request_id") == request_id
    ]
    if len(roots) != 1:
        return []
    return [s for s in spans if s.trace_id == roots[0].trace_id]


def complete(spans: list[ReceivedSpan]) -> bool:
    """Every span ``check_request_trace`` looks for has arrived (they come from four processes)."""
    names = {s.name for s in spans}
    return {
        "route",
        "prefill",
        "kv_transfer",
        "decode",
        "/tandem.kvstore.v1.KVStoreService/Lookup",
        "/tandem.prefill.v1.PrefillService/Prefill",
        "/tandem.decode.v1.DecodeService/Generate",
    } <= names and bool(names & {PUSH_KV, COMPLETE_KV})  # the gRPC or a memory transport


def one(spans: list[ReceivedSpan], name: str, service: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and s.service == service]
    assert len(found) == 1, (name, service, [(s.service, s.name) for s in spans])
    return found[0]


def check_request_trace(
    spans: list[ReceivedSpan], root: ReceivedSpan, *, operation: str, usage: dict
) -> None:
    """The span tree of one disaggregated request, its parent links across processes, its
    attributes."""
    by_id = {s.span_id: s for s in spans}
    assert (
        root.parent_id == "" or root.parent_id not in by_id
    )  # the request's root (or the caller's child)

    route = one(spans, "route", "tandem-router")
    assert route.parent_id == root.span_id
    assert route.attributes["tandem.route.mode"] == "disaggregated"
    assert route.attributes["tandem.kvstore.lookup.status"] == "ok"
    assert route.attributes["tandem.kvstore.lookup.seconds"] >= 0
    assert (
        route.attributes["tandem.route.prefill_pod"]
        == route.attributes["tandem.route.candidates.pod"][0]
    )
    assert len(route.attributes["tandem.route.candidates.cost"]) == 1
    lookup = one(spans, "/tandem.kvstore.v1.KVStoreService/Lookup", "tandem-kvstore")
    assert lookup.parent_id == route.span_id  # kvstore continues the trace inside the route span

    prefill_rpc = one(spans, "/tandem.prefill.v1.PrefillService/Prefill", "tandem-prefill")
    decode_rpc = one(spans, "/tandem.decode.v1.DecodeService/Generate", "tandem-decode")
    assert prefill_rpc.parent_id == root.span_id and decode_rpc.parent_id == root.span_id

    prefill = one(spans, "prefill", "tandem-prefill")
    assert prefill.parent_id == prefill_rpc.span_id
    assert prefill.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    for key in ("queue_seconds", "compute_seconds", "transfer_seconds"):
        assert prefill.attributes[f"tandem.prefill.{key}"] >= 0
    assert prefill.attributes["tandem.prefill.cached_tokens"] >= 0

    transfer = one(spans, "kv_transfer", "tandem-prefill")
    assert transfer.parent_id == prefill.span_id
    assert (
        transfer.attributes["tandem.kv.bytes"] > 0 and transfer.attributes["tandem.kv.chunks"] >= 1
    )
    assert (
        transfer.attributes["tandem.kv.gbps"] > 0 and transfer.attributes["tandem.kv.seconds"] > 0
    )
    # On CPU pods the transport is shm: pages are written in place, and the decode pod's one
    # CompleteKV call continues the transfer's span; over gRPC every PushKV stream does.
    transport = transfer.attributes["tandem.kv.transport"]
    assert transport in ("grpc", "shm")
    rpc = PUSH_KV if transport == "grpc" else COMPLETE_KV
    calls = [s for s in spans if s.name == rpc]
    assert calls and all(
        c.parent_id == transfer.span_id and c.service == "tandem-decode" for c in calls
    )

    decode = one(spans, "decode", "tandem-decode")
    assert decode.parent_id == decode_rpc.span_id
    assert decode.attributes["tandem.decode.prefill_mode"] == "remote"
    assert decode.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert decode.attributes["tandem.decode.steps"] >= 1
    assert (
        0
        <= decode.attributes["tandem.decode.admission_seconds"]
        <= decode.attributes["tandem.decode.ttft_seconds"]
    )
    assert decode.attributes["tandem.decode.kv_wait_seconds"] >= 0
    # The pods' work starts inside the request's span (their ends may trail the response by a hair:
    # the router does not wait for the prefill pod's answer once tokens flow).
    for s in (route, prefill, transfer, decode):
        assert root.start_ns <= s.start_ns <= root.end_ns, s.name
    assert route.end_ns <= root.end_ns

    assert root.attributes["gen_ai.operation.name"] == operation
    assert root.attributes["gen_ai.request.model"] == "llama"
    assert root.attributes["gen_ai.request.max_tokens"] == 6
    assert root.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert root.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert root.attributes["gen_ai.response.finish_reasons"] == ["length"]

    # Prompt text is never recorded, anywhere.
    assert SECRET not in json.dumps([s.attributes for s in spans], default=str)


def test_each_request_is_one_trace_across_every_service(traced):
    cluster, receiver = traced
    requests = {
        "trace-chat": (
            "chat",
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": PROMPT}],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ),
        "trace-completion": ("text_completion", "/v1/completions", {"prompt": PROMPT + " again"}),
    }
    usages = {}
    for rid, (_, path, body) in requests.items():
        body = {"model": "llama", "max_tokens": 6, "temperature": 0, "ignore_eos": True, **body}
        r = httpx.post(
            cluster.router_url + path, json=body, headers={"x-request-id": rid}, timeout=60
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == rid
        if body.get("stream"):
            chunks = [
                json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")
            ]
            usages[rid] = chunks[-1]["usage"]
        else:
            usages[rid] = r.json()["usage"]

    spans = receiver.wait_for(lambda s: all(complete(trace_of(s, rid)) for rid in requests))
    for rid, (operation, _, _) in requests.items():
        request_spans = trace_of(spans, rid)
        root = next(
            s
            for s in request_spans
            if s.attributes.get("tandem.request_id") == rid and s.service == "tandem-router"
        )
        check_request_trace(request_spans, root, operation=operation, usage=usages[rid])
    # Distinct requests, distinct traces.
    assert len({trace_of(spans, rid)[0].trace_id for rid in requests}) == len(requests)


def test_the_sdk_continues_the_callers_trace(traced):
    cluster, receiver = traced
    caller = TracerProvider().get_tracer("test-client")  # the application's own tracing
    with (
        caller.start_as_current_span("client-call") as span,
        Client(cluster.router_grpc, timeout=60) as client,
    ):
        result = client.generate(
            PROMPT + " sdk", max_tokens=6, temperature=0, ignore_eos=True, request_id="trace-sdk"
        )
        trace_id, span_id = (
            f"{span.get_span_context().trace_id:032x}",
            f"{span.get_span_context().span_id:016x}",
        )

    root_name = "/tandem.router.v1.RouterService/Generate"

    def arrived(spans) -> bool:  # the root too: the router exports it last, when the call ends
        mine = [x for x in spans if x.trace_id == trace_id]
        return complete(mine) and any(x.name == root_name for x in mine)

    spans = receiver.wait_for(arrived)
    request_spans = [s for s in spans if s.trace_id == trace_id]
    root = one(request_spans, root_name, "tandem-router")
    assert root.parent_id == span_id  # a child of the caller's span
    usage = {
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
    }
    check_request_trace(request_spans, root, operation="text_completion", usage=usage)
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing leaked into the test's context


def test_a_rejected_request_is_traced_with_its_error_and_touches_no_pod(traced):
    cluster, receiver = traced
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 10**6}
    r = httpx.post(
        cluster.router_url + "/v1/completions",
        json=body,
        headers={"x-request-id": "trace-bad"},
        timeout=60,
    )
    assert r.status_code == 400
    spans = receiver.wait_for(lambda s: trace_of(s, "trace-bad"))
    request_spans = trace_of(spans, "trace-bad")
    root = next(s for s in request_spans if s.attributes.get("tandem.request_id") == "trace-bad")
    time.sleep(0.5)  # several export intervals: a pod span, had there been one, would be here now
    request_spans = trace_of(receiver.spans(), "trace-bad")
    assert (
        root.attributes[
            "http.status_code"
            if "http.status_code" in root.attributes
            else "http.response.status_code"
        ]
        == 400
    )
    assert not {s.service for s in request_spans} - {"tandem-router"}
    wait_idle(cluster)


def test_polls_and_heartbeats_start_no_traces(traced):
    """Only API requests start traces: stats polls, heartbeats, KV events and health never do."""
    cluster, receiver = traced
    httpx.get(cluster.router_url + "/health", timeout=10)
    httpx.get(cluster.router_url + "/metrics", timeout=10)
    time.sleep(2.0)  # several stats polls, heartbeats and export intervals
    spans = receiver.spans()
    request_traces = {
        s.trace_id for s in spans if s.service == "tandem-router" and s.kind == SERVER
    }
    stray = [(s.service, s.name) for s in spans if s.trace_id not in request_traces]
    assert not stray, stray
    names = {s.name for s in spans}
    assert not any(
        n.endswith(("/GetStats", "/Heartbeat", "/PublishEvents", "/Stats", "/Check", "/Watch"))
        for n in names
    ), names
    assert not any(
        s.attributes.get("http.target", s.attributes.get("url.path", "")) in ("/health", "/metrics")
        for s in spans
    )


def test_clients_leaving_mid_stream_leave_no_context_errors(traced):
    """A cancelled stream ends its spans cleanly (no 'Failed to detach context' in any log)."""
    cluster, receiver = traced
    body = {
        "model": "llama",
        "prompt": PROMPT,
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        cluster.router_url + "/v1/completions",
        json=body,
        timeout=60,
        headers={"x-request-id": "trace-gone"},
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break  # the client goes away
    with Client(cluster.router_grpc, timeout=60) as client:
        stream = client.stream(PROMPT, max_tokens=200, ignore_eos=True, request_id="trace-gone-sdk")
        next(stream)
        stream.close()
    wait_idle(cluster)
    time.sleep(1.0)
    assert receiver.wait_for(lambda s: trace_of(s, "trace-gone"))
    log = "".join(cluster.log)
    assert "Failed to detach context" not in log, log[-3000:]
