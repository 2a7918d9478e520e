"""The engine core process and its client: tokens in per-step columns, text made in the front
process exactly as the offline engine makes it, failures contained, no spinning when idle, a
dead core ends every stream."""

import asyncio
import multiprocessing
import os
import signal
import threading
import time

import pytest
import zmq

from tandem.api.errors import InvalidRequest, UpstreamUnavailable
from tandem.api.outputs import CompletionOutput, RequestOutput
from tandem.engine import LLM, EngineConfig, SamplingParams
from tandem.serving import core_protocol as proto
from tandem.serving.engine_client import (
    EngineCoreClient,
    EngineFailure,
    OutputStream,
    coalesce,
    sampling_fields,
)
from tandem.serving.engine_core import CoreSpec, EngineCore
from tandem.tokenizer import Tokenizer

pytestmark = pytest.mark.integration  # each test starts an engine core process


def spec(model_dir, **engine) -> CoreSpec:
    config = EngineConfig(model=str(model_dir), num_kv_blocks=64, **engine)
    return CoreSpec(role="decode", engine=config)


async def collect(q: asyncio.Queue) -> list:
    items = []
    while True:
        item = await asyncio.wait_for(q.get(), 60)
        items.append(item)
        if isinstance(item, BaseException) or item.finished:
            return items


def joined(items: list[RequestOutput]) -> tuple[str, list[int], str | None, object]:
    comps = [o.outputs[0] for o in items]
    return (
        "".join(c.text for c in comps),
        [t for c in comps for t in c.token_ids],
        comps[-1].finish_reason,
        comps[-1].stop_reason,
    )


def test_text_stop_strings_and_logprobs_match_the_offline_engine(llama_dir):
    """Detokenization and stop strings run in the front process on the core's tokens."""
    offline = LLM(llama_dir, num_kv_blocks=64)
    prompts = [[5, 6, 7, 8], list(range(20, 60)), [9] * 30]
    free = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    # A stop string cut from the middle of the first completion's text, and one with logprobs.
    text = free[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cases = [
        SamplingParams(temperature=0, max_tokens=12, stop=(stop,)),
        SamplingParams(temperature=0.8, seed=3, max_tokens=10, logprobs=2),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=(9,)),
    ]
    want = [o.outputs[0] for o in offline.generate(prompts, cases)]

    async def main():
        client = EngineCoreClient(spec(llama_dir), tokenizer=Tokenizer(llama_dir))
        await client.start()
        try:
            streams = [client.open_stream(f"r{i}") for i in range(len(prompts))]
            with pytest.raises(InvalidRequest, match="already in use"):
                client.open_stream("r0")
            for i, (prompt, params) in enumerate(zip(prompts, cases, strict=True)):
                await client.add(f"r{i}", prompt, params)
            got = [await collect(q) for q in streams]
            for i in range(len(prompts)):
                client.end_stream(f"r{i}", finished=True)
            client.open_stream("r0")  # free again once ended
            client.end_stream("r0", finished=True)
            # The stop string ended request 0 here; the core was told to drop it.
            for _ in range(100):
                if client.stats.num_running == 0:
                    break
                await asyncio.sleep(0.05)
            return got, client.stats
        finally:
            await client.stop()

    got, stats = asyncio.run(main())
    for items, expected in zip(got, want, strict=True):
        assert joined(items) == (
            expected.text,
            expected.token_ids,
            expected.finish_reason,
            expected.stop_reason,
        )
    # Logprobs: the same tokens and ranks; values up to float noise (another batch composition).
    lps = [lp for o in got[1] for lp in o.outputs[0].logprobs]
    assert len(lps) == len(want[1].logprobs)
    for a, b in zip(lps, want[1].logprobs, strict=True):
        assert (a.token_id, a.rank, [t for t, _ in a.top]) == (
            b.token_id,
            b.rank,
            [t for t, _ in b.top],
        )
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_the_core_sleeps_while_idle(llama_dir):
    """No busy loop: an idle core uses next to no CPU."""

    async def main():
        client = EngineCoreClient(spec(llama_dir))
        await client.start()
        try:
            await asyncio.sleep(0.5)
            before = cpu_seconds(client.pid)
            await asyncio.sleep(2.0)
            return cpu_seconds(client.pid) - before
        finally:
            await client.stop()

    assert asyncio.run(main()) < 0.1


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_dead_core_ends_every_stream_and_says_so(llama_dir):
    exits = []

    async def main():
        client = EngineCoreClient(spec(llama_dir), on_core_exit=exits.append)
        await client.start()
        try:
            q = client.open_stream("long")
            await client.add("long", [5] * 10, SamplingParams(max_tokens=1000, ignore_eos=True))
            await asyncio.sleep(0.3)
            os.kill(client.pid, signal.SIGKILL)
            items = await collect(q)
            with pytest.raises(UpstreamUnavailable):
                client.open_stream("next")
            return items
        finally:
            await client.stop()

    items = asyncio.run(main())
    assert isinstance(items[-1], UpstreamUnavailable) and "exited" in str(items[-1])
    assert exits == [-signal.SIGKILL]
    assert not multiprocessing.active_children()  # reaped: no zombie


def test_a_failed_step_fails_only_its_requests(llama_dir, monkeypatch, tmp_path):
    """The core loop in this process (to break its forward), spoken to over its sockets."""
    ctx = zmq.Context()
    commands, updates = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    commands.bind(f"ipc://{tmp_path}/c")
    updates.bind(f"ipc://{tmp_path}/u")
    core = EngineCore(
        CoreSpec(
            role="decode",
            engine=EngineConfig(model=str(llama_dir), num_kv_blocks=64),
            commands_address=f"ipc://{tmp_path}/c",
            updates_address=f"ipc://{tmp_path}/u",
        )
    )
    real_launch = core.engine.runner.launch
    launched = []

    def launch(scheduled, input_ids=None):
        launched.append([s.seq.request_id for s in scheduled])
        if len(launched) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_launch(scheduled, input_ids)

    monkeypatch.setattr(core.engine.runner, "launch", launch)
    front, back = multiprocessing.Pipe()
    loop = threading.Thread(target=core.run, args=(back,), daemon=True)
    loop.start()

    def send(*cmds):
        commands.send(proto.command_encoder.encode(list(cmds)))

    def until(pred, timeout=30.0):
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            if updates.poll(100):
                seen.append(proto.update_decoder.decode(updates.recv()))
                if pred(seen[-1]):
                    return seen
        raise AssertionError("the core never sent the expected update")

    try:
        add = proto.AddRequest(1, "fails", [5] * 20, sampling_fields(SamplingParams(max_tokens=3)))
        send(add)
        failed = until(lambda u: u.failures)
        assert failed[-1].failures[0].request_ids == ["fails"]
        assert "out of memory" in failed[-1].failures[0].message
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        send(proto.AddRequest(2, "works", [7] * 20, sampling_fields(params)))
        done = until(lambda u: u.outputs is not None and "length" in u.outputs.finish_reasons)
        assert launched[0] == ["fails"] and "works" in launched[1]
        stats = done[-1].stats
        assert stats.num_free_blocks == stats.num_total_blocks
        send(proto.Shutdown())
        loop.join(10)
        assert not loop.is_alive()
    finally:
        front.close()
        core.close()
        commands.close(0)
        updates.close(0)
        ctx.term()


def out(text: str, tokens: list[int], finished: bool = False) -> RequestOutput:
    comp = CompletionOutput(0, text, tokens, "length" if finished else None)
    return RequestOutput("r", [1], [comp], finished)


@pytest.mark.parametrize("tail_error", [False, True])
def test_a_stream_that_fell_behind_is_sent_as_one_message(tail_error):
    async def main():
        q = OutputStream()
        for i in range(3):
            q.put_nowait(out(f"t{i}", [i], finished=i == 2 and not tail_error))
        if tail_error:
            q.put_nowait(EngineFailure("boom"))
        merged = coalesce(await q.get(), q)
        rest = [q.get_nowait() for _ in range(q.qsize())]
        return merged, rest

    merged, rest = asyncio.run(main())
    assert merged.outputs[0].text == "t0t1t2" and merged.outputs[0].token_ids == [0, 1, 2]
    assert merged.finished is not tail_error
    assert [type(r) for r in rest] == ([EngineFailure] if tail_error else [])


def test_an_id_stays_taken_until_its_release_reached_the_core(llama_dir):
    """A given-up request's id cannot be reused before its Abort went out: a late Abort would
    otherwise end the newcomer."""

    async def main():
        client = EngineCoreClient(spec(llama_dir), tokenizer=Tokenizer(llama_dir))
        await client.start()
        try:
            q = client.open_stream("x")
            await client.add("x", [5] * 8, SamplingParams(max_tokens=500, ignore_eos=True))
            await q.get()
            client.end_stream("x", finished=False)  # the client went away
            with pytest.raises(InvalidRequest, match="already in use"):
                client.open_stream("x")
            for _ in range(100):
                await asyncio.sleep(0.02)
                try:
                    q = client.open_stream("x")
                    break
                except InvalidRequest:
                    continue
            await client.add("x", [6] * 8, SamplingParams(max_tokens=4, ignore_eos=True))
            return await collect(q)
        finally:
            await client.stop()

    items = asyncio.run(main())
    assert items[-1].finished and items[-1].outputs[0].finish_reason == "length"
    assert sum(len(o.outputs[0].token_ids) for o in items) == 4
