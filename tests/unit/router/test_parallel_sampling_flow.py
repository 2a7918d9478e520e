"""Parallel sampling in the router's flow (``Dispatcher.generate``), against fake decode pods on
real gRPC sockets: a request ends when all n completions finished, and a request with n > 1 is
not migrated when its decode pod fails mid-stream (it fails, saying so)."""

import asyncio

import grpc
from opentelemetry import context as otel_context

from services.router.flow import Dispatcher, Route
from services.router.pods import Pod
from services.router.settings import RouterSettings
from tandem.api.errors import UpstreamUnavailable
from tandem.api.requests import Job, Usage
from tandem.api.sampling_params import SamplingParams
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc

from .test_migration import serve_decode_pods

LENGTH = common_pb2.FINISH_REASON_LENGTH


def chunk(index: int, token: int | None = None, finish: bool = False, usage=None):
    resp = decode_pb2.GenerateResponse(
        chunk=common_pb2.TokenChunk(
            token_ids=[] if token is None else [token],
            text="" if token is None else f"{token} ",
            index=index,
            finish_reason=LENGTH if finish else common_pb2.FINISH_REASON_UNSPECIFIED,
        )
    )
    if usage is not None:
        resp.usage.CopyFrom(usage)
    return resp


class FakeDecode(decode_pb2_grpc.DecodeServiceServicer):
    """Streams ``responses`` after admission, then fails with UNAVAILABLE if ``die``."""

    def __init__(self, responses, *, die: bool) -> None:
        self.responses = responses
        self.die = die
        self.requests: list[decode_pb2.GenerateRequest] = []

    async def Generate(self, request, context):
        self.requests.append(request)
        yield decode_pb2.GenerateResponse(admitted=decode_pb2.Admitted())
        for resp in self.responses:
            yield resp
        if self.die:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine core process exited")
        await asyncio.sleep(30)  # a stream the router must stop reading on its own


class Registry:
    def __init__(self, pods: list[Pod]) -> None:
        self.pods = pods

    def by_role(self, role: str, healthy: bool = True) -> list[Pod]:
        return [p for p in self.pods if p.role == role and (p.healthy or not healthy)]


class Trace:
    def __init__(self) -> None:
        self.context = otel_context.get_current()
        self.finished_events = []
        self.migrations: list[dict] = []

    def finished(self, event) -> None:
        self.finished_events.append(event)

    def migrated(self, **attributes) -> None:
        self.migrations.append(attributes)


async def run(fakes: list[FakeDecode], params: SamplingParams):
    servers, pods = await serve_decode_pods(fakes)
    dispatcher = Dispatcher(Registry(pods), RouterSettings(model="m"))
    route = Route(trace=Trace())
    events, error = [], None
    try:
        async with asyncio.timeout(10):
            async for event in dispatcher.generate(Job("req", [5, 6, 7], params), route):
                events.append(event)
    except UpstreamUnavailable as exc:
        error = exc
    finally:
        for pod in pods:
            await pod.channel.close()
        for server in servers:
            await server.stop(None)
    return events, error, route


def test_the_request_ends_when_every_completion_finished():
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=3, cached_tokens=0)
    fake = FakeDecode(
        [chunk(0, 10), chunk(1, 20), chunk(0, finish=True), chunk(1, 21, True, usage)], die=False
    )
    events, error, route = asyncio.run(run([fake], SamplingParams(n=2, max_tokens=2)))
    assert error is None
    assert [(e.index, e.token_ids, e.finish_reason) for e in events] == [
        (0, [10], None),
        (1, [20], None),
        (0, [], "length"),
        (1, [21], "length"),
    ]
    assert events[-1].usage == Usage(3, 3, 0)
    assert route.trace.finished_events == [events[-1]]  # once, at the request's end


def test_a_parallel_request_is_not_migrated():
    a = FakeDecode([chunk(0, 10), chunk(1, 20)], die=True)
    b = FakeDecode([chunk(0, 11, True), chunk(1, 21, True)], die=False)
    events, error, route = asyncio.run(run([a, b], SamplingParams(n=2, max_tokens=4)))
    assert [e.token_ids for e in events] == [[10], [20]]
    assert isinstance(error, UpstreamUnavailable)
    assert "n or best_of above 1 is not moved" in str(error)
    assert "the engine core process exited" in str(error)
    assert b.requests == []
    assert [m.outcome for m in route.migrations] == ["unsupported"]
    assert route.trace.migrations[0]["outcome"] == "unsupported"
