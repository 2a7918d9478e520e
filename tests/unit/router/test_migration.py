"""Request migration in the router (``Dispatcher.generate``), against fake decode pods served
over real gRPC sockets: a pod that fails after its first tokens hands the request to another
with the output so far (``Resume``); the limit, the "no pod" path, usage and the metric."""

import asyncio

import grpc
import pytest
from opentelemetry import context as otel_context
from prometheus_client import generate_latest

from services.router.flow import Dispatcher, Route
from services.router.metrics import RouterMetrics
from services.router.pods import Pod
from services.router.settings import RouterSettings
from tandem.api.errors import UpstreamUnavailable
from tandem.api.requests import Job, Usage
from tandem.api.sampling_params import SamplingParams
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc

PROMPT = [5, 6, 7, 8]


class FakeDecode(decode_pb2_grpc.DecodeServiceServicer):
    """Streams ``tokens`` (one chunk each, text "<id> "), then fails with UNAVAILABLE (``die``)
    or finishes with usage."""

    def __init__(self, tokens: list[int], *, die: bool) -> None:
        self.tokens = tokens
        self.die = die
        self.requests: list[decode_pb2.GenerateRequest] = []

    async def Generate(self, request, context):
        self.requests.append(request)
        yield decode_pb2.GenerateResponse(admitted=decode_pb2.Admitted())
        for t in self.tokens:
            yield decode_pb2.GenerateResponse(
                chunk=common_pb2.TokenChunk(token_ids=[t], text=f"{t} ")
            )
        if self.die:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine core process exited")
        resumed = request.resume.num_output_tokens
        yield decode_pb2.GenerateResponse(
            chunk=common_pb2.TokenChunk(finish_reason=common_pb2.FINISH_REASON_LENGTH),
            usage=common_pb2.Usage(
                prompt_tokens=len(request.prompt_token_ids) - resumed,
                completion_tokens=resumed + len(self.tokens),
                cached_tokens=len(request.prompt_token_ids),  # more than the prompt: clamped
            ),
        )


class Registry:
    def __init__(self, pods: list[Pod]) -> None:
        self.pods = pods

    def by_role(self, role: str, healthy: bool = True) -> list[Pod]:
        return [p for p in self.pods if p.role == role and (p.healthy or not healthy)]


class Trace:
    """The parts of ``RequestTrace`` the dispatcher calls; records the migration events."""

    def __init__(self) -> None:
        self.context = otel_context.get_current()
        self.events: list[dict] = []

    def finished(self, event) -> None:
        pass

    def migrated(self, **attributes) -> None:
        self.events.append(attributes)


async def serve_decode_pods(fakes) -> tuple[list, list[Pod]]:
    """Serve each fake DecodeService on a real socket: (servers, healthy pods with free blocks
    decreasing, so the first is chosen first)."""
    servers, pods = [], []
    for i, fake in enumerate(fakes):
        server = grpc.aio.server()
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        pod = Pod(
            f"127.0.0.1:{port}", "decode", channel, decode_pb2_grpc.DecodeServiceStub(channel)
        )
        pod.healthy = True
        pod.stats = common_pb2.PodStats(num_free_blocks=100 - i)
        pods.append(pod)
    return servers, pods


async def run(fakes: list[FakeDecode], max_migrations: int = 3):
    """Serve the fakes (free blocks decreasing: the first is chosen first), run one job; returns
    (events, error, route, the pods)."""
    servers, pods = await serve_decode_pods(fakes)
    settings = RouterSettings(model="m", max_migrations=max_migrations)
    dispatcher = Dispatcher(Registry(pods), settings)
    job = Job("req", PROMPT, SamplingParams(max_tokens=10, temperature=0.0))
    route = Route(trace=Trace())
    events, error = [], None
    try:
        async for event in dispatcher.generate(job, route):
            events.append(event)
    except UpstreamUnavailable as exc:
        error = exc
    finally:
        for pod in pods:
            await pod.channel.close()
        for server in servers:
            await server.stop(None)
    return events, error, route, pods


def counted(route: Route) -> str:
    metrics = RouterMetrics()
    metrics.observe_route(route, len(PROMPT))
    return generate_latest(metrics.registry).decode()


def test_a_failed_pod_hands_the_request_on_with_its_output_so_far():
    a, b = FakeDecode([10, 11, 12], die=True), FakeDecode([13, 14], die=False)
    events, error, route, pods = asyncio.run(run([a, b]))
    assert error is None
    assert [t for e in events for t in e.token_ids] == [10, 11, 12, 13, 14]
    assert "".join(e.text for e in events) == "10 11 12 13 14 "
    (resumed,) = b.requests
    assert list(resumed.prompt_token_ids) == PROMPT + [10, 11, 12]
    assert resumed.resume.num_output_tokens == 3
    assert resumed.resume.num_text_chars == len("10 11 12 ")
    assert not a.requests[0].HasField("resume")
    assert events[-1].finish_reason == "length"
    assert events[-1].usage == Usage(prompt_tokens=4, completion_tokens=5, cached_tokens=4)
    assert not pods[0].healthy  # the failed pod is marked down
    (m,) = route.migrations
    assert (m.from_pod, m.to_pod, m.num_tokens, m.outcome) == (
        pods[0].address,
        pods[1].address,
        3,
        "resumed",
    )
    assert route.trace.events == [
        dict(
            from_pod=pods[0].address,
            to_pod=pods[1].address,
            num_tokens=3,
            reason="UpstreamUnavailable",
            outcome="resumed",
        )
    ]
    assert 'tandem_router_migrations_total{outcome="resumed"} 1.0' in counted(route)


def test_max_migrations_0_reports_the_failure_in_the_stream():
    a, b = FakeDecode([10, 11], die=True), FakeDecode([13], die=False)
    events, error, route, pods = asyncio.run(run([a, b], max_migrations=0))
    assert [t for e in events for t in e.token_ids] == [10, 11]
    assert isinstance(error, UpstreamUnavailable)
    assert f"decode pod {pods[0].address} failed" in str(error)
    assert b.requests == []
    assert [m.outcome for m in route.migrations] == ["limit"]
    assert 'tandem_router_migrations_total{outcome="limit"} 1.0' in counted(route)


def test_migrations_stop_at_the_limit():
    a, b = FakeDecode([10], die=True), FakeDecode([11], die=True)
    events, error, route, pods = asyncio.run(run([a, b], max_migrations=1))
    assert [t for e in events for t in e.token_ids] == [10, 11]
    assert f"decode pod {pods[1].address} failed" in str(error)
    assert [m.outcome for m in route.migrations] == ["resumed", "limit"]


def test_with_no_pod_to_move_to_the_client_gets_the_original_failure():
    a = FakeDecode([10, 11], die=True)
    events, error, route, pods = asyncio.run(run([a]))
    assert [t for e in events for t in e.token_ids] == [10, 11]
    # Not "no decode pod is ready": the failure that started the move.
    assert "the engine core process exited" in str(error)
    assert [m.outcome for m in route.migrations] == ["failed"]
    assert route.trace.events[0]["outcome"] == "failed"
    assert 'tandem_router_migrations_total{outcome="failed"} 1.0' in counted(route)


@pytest.mark.parametrize("resumed", [0, 2])
def test_the_pod_side_counts_are_read_from_the_request(resumed):
    from tandem.api import proto_convert

    request = decode_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3])
    if resumed:
        request.resume.CopyFrom(common_pb2.Resume(num_output_tokens=resumed, num_text_chars=7))
    assert proto_convert.num_output_tokens(request) == resumed
    assert proto_convert.num_text_chars(request) == (7 if resumed else None)
