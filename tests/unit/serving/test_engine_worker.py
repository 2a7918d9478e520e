"""EngineWorker: commands on the engine thread, outputs to asyncio, failures contained."""

import asyncio

import pytest

from tandem.api.errors import InvalidRequest
from tandem.engine import EngineConfig, LLMEngine, SamplingParams
from tandem.serving.engine_worker import EngineFailure, EngineWorker


@pytest.fixture(scope="module", params=["sync", "async"])
def engine(llama_dir, request):
    """Synchronous steps, and async output processing + scheduling (a GPU engine's default)."""
    mode = "off" if request.param == "sync" else "on"
    return LLMEngine(
        EngineConfig(
            model=str(llama_dir),
            num_kv_blocks=64,
            async_output_processing=mode,
            async_scheduling=mode,
        )
    )


async def collect(q: asyncio.Queue):
    items = []
    while True:
        item = await asyncio.wait_for(q.get(), 30)
        items.append(item)
        if isinstance(item, BaseException) or item.finished:
            return items


def test_outputs_stream_and_duplicate_ids_are_refused(engine):
    async def main():
        worker = EngineWorker(engine, asyncio.get_running_loop())
        worker.start()
        try:
            q = worker.open_stream("a")
            with pytest.raises(InvalidRequest, match="already in use"):
                worker.open_stream("a")
            await worker.call(
                lambda e: e.add_request(
                    "a", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True)
                )
            )
            items = await collect(q)
            assert sum(len(o.outputs[0].token_ids) for o in items) == 4
            worker.close_stream("a")
            worker.open_stream("a")  # free again once closed
        finally:
            worker.stop()

    asyncio.run(main())


def test_a_failed_step_fails_only_its_requests(engine, monkeypatch):
    async def main():
        worker = EngineWorker(engine, asyncio.get_running_loop())
        worker.start()
        try:
            qa, qb = worker.open_stream("fails"), worker.open_stream("waits")
            real_launch = engine.runner.launch
            calls = []

            def launch(scheduled, input_ids=None):
                calls.append([s.seq.request_id for s in scheduled])
                if len(calls) == 1:
                    raise RuntimeError("CUDA out of memory (simulated)")
                return real_launch(scheduled, input_ids)

            monkeypatch.setattr(engine.runner, "launch", launch)
            await worker.call(
                lambda e: e.add_request("fails", [5] * 20, SamplingParams(max_tokens=3))
            )
            failed = await collect(qa)
            assert isinstance(failed[-1], EngineFailure) and "out of memory" in str(failed[-1])
            # The engine goes on: a later request runs to the end.
            await worker.call(
                lambda e: e.add_request(
                    "waits", [7] * 20, SamplingParams(max_tokens=3, ignore_eos=True)
                )
            )
            done = await collect(qb)
            assert done[-1].finished and calls[0] == ["fails"]
            assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks
        finally:
            worker.stop()

    asyncio.run(main())
