"""OpenAI serving logic without pods: a multi-prompt request stops every prompt when one fails."""

import asyncio

import pytest

from services.router.flow import Route
from services.router.jobs import JobBuilder
from services.router.openai_api import OpenAIServing
from services.router.openai_protocol import CompletionRequest
from tandem.api.errors import UpstreamUnavailable
from tandem.api.requests import Job, TokenEvent
from tandem.api.sampling_params import SamplingParams


class FakeDispatcher:
    """Prompt 0 generates slowly forever; prompt 1 fails after a moment."""

    def __init__(self):
        self.cancelled = asyncio.Event()

    async def generate(self, job, route):
        if job.request_id.endswith("-0"):
            try:
                while True:
                    await asyncio.sleep(0.01)
                    yield TokenEvent([1], "x", [])
            finally:
                self.cancelled.set()
        await asyncio.sleep(0.05)
        raise UpstreamUnavailable("prompt 1 failed")
        yield  # pragma: no cover - makes this an async generator


def test_one_failed_prompt_cancels_the_others():
    async def main():
        dispatcher = FakeDispatcher()
        jobs = JobBuilder(None, model_name="m", vocab_size=10, max_model_len=lambda: 100)
        serving = OpenAIServing(jobs, dispatcher)
        req = CompletionRequest(prompt=[[1, 2], [3, 4]], max_tokens=5)
        two = [Job(f"r-{i}", [1, 2], SamplingParams(max_tokens=5)) for i in range(2)]
        with pytest.raises(UpstreamUnavailable):
            await serving.completion(req, two, "r", [Route(), Route()])
        await asyncio.wait_for(dispatcher.cancelled.wait(), 2)

    asyncio.run(main())


def test_events_a_slow_client_left_queued_are_sent_as_one():
    """Pods' streams are read ahead; a client that fell behind gets one merged event per choice,
    in order, and an error after them still arrives."""
    from services.router.openai_api import coalesced
    from tandem.api.requests import Usage

    async def events():
        for i in range(4):
            yield 0, TokenEvent([i], f"t{i}", [])
        yield 1, TokenEvent([9], "other", [])
        yield 0, TokenEvent([4], "t4", [], "length", None, Usage(3, 5, 0))
        raise UpstreamUnavailable("gone")

    async def main():
        got = []
        stream = coalesced(events())
        with pytest.raises(UpstreamUnavailable):
            async for item in stream:
                got.append(item)
                await asyncio.sleep(0.05)  # a slow client: everything else queues meanwhile
        return got

    got = asyncio.run(main())
    assert [(i, e.text) for i, e in got] == [(0, "t0t1t2t3"), (1, "other"), (0, "t4")]
    assert got[0][1].token_ids == [0, 1, 2, 3] and got[-1][1].finish_reason == "length"
    assert got[-1][1].usage == Usage(3, 5, 0)


def test_a_stream_closed_mid_way_closes_its_pod_stream_cleanly():
    """A client that leaves: the relay closes the read-ahead first, then the pod's stream."""
    closed = []

    async def events():
        try:
            for i in range(100):
                yield 0, TokenEvent([i], f"t{i}", [])
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)

    async def main():
        jobs = JobBuilder(None, model_name="m", vocab_size=10, max_model_len=lambda: 100)
        serving = OpenAIServing(jobs, dispatcher=None)
        relay = await serving.open_stream(events())
        first = await relay.__anext__()
        await relay.__anext__()
        await relay.aclose()  # no "asynchronous generator is already running"
        return first

    first = asyncio.run(main())
    assert first[1].text == "t0" and closed == [True]
