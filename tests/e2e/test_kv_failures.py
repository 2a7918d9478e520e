"""KV transfer and admission failure paths against real pods: clear errors, no leaked blocks."""

import asyncio
import json
import random
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.local_cluster import pod_stats
from tandem.api import cluster_auth
from tandem.api.errors import RequestTooLarge
from tandem.api.proto_convert import sampling_params_to_proto
from tandem.api.sampling_params import SamplingParams
from tandem.model_dir import load_model_config
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc
from tandem.transfer.wire import make_chunk

from .conftest import start_cluster, wait_idle

pytestmark = pytest.mark.integration
BS = 16


class Reservation:
    """A REMOTE-mode Generate call on a decode pod, kept open: it holds its KV blocks."""

    def __init__(self, address: str, request_id: str, prompt: list[int] | None = None):
        # A prompt of its own (40 tokens: 3 blocks), so no earlier test's blocks are cached.
        prompt = prompt or [random.Random(request_id).randrange(3, 1000) for _ in range(40)]
        self.channel = cluster_auth.channel(address, [])
        self.stub = decode_pb2_grpc.DecodeServiceStub(self.channel)
        self.call = self.stub.Generate(
            decode_pb2.GenerateRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                sampling_params=sampling_params_to_proto(
                    # Random pages may make EOS likely: the harness wants all 4 tokens.
                    SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
                ),
                prefill_mode=decode_pb2.PREFILL_MODE_REMOTE,
            ),
            timeout=60,
        )
        self.admitted = next(self.call).admitted
        self.request_id = request_id
        # Claimed at once, as a prefill pod does: an unclaimed reservation is released after the
        # decode pod's kv_claim_timeout_s.
        self.stub.ClaimKV(
            decode_pb2.ClaimKVRequest(
                request_id=request_id,
                transfer_token=self.admitted.transfer_token,
                transport="grpc",
            ),
            timeout=10,
        )

    def push(self, messages):
        return self.stub.PushKV(iter(messages), timeout=30)

    def close(self):
        self.call.cancel()
        self.channel.close()


def pages(model_dir, num_layers: int, num_blocks: int) -> torch.Tensor:
    cfg = load_model_config(model_dir)
    return torch.randn(num_layers, 2, num_blocks, BS, cfg.num_kv_heads, cfg.head_dim)


def chunk_msg(res: Reservation, data: torch.Tensor, *, layers, blocks, seq=0, fingerprint=None):
    c = make_chunk(
        res.request_id, fingerprint or res.admitted.model_fingerprint, seq, layers, blocks, data
    )
    c.transfer_token = res.admitted.transfer_token  # the reservation's lease
    return decode_pb2.PushKVRequest(chunk=c)


def end_msg(res: Reservation, total: int, *, first_token=5):
    return decode_pb2.PushKVRequest(
        end=common_pb2.KVTransferEnd(
            request_id=res.request_id,
            model_fingerprint=res.admitted.model_fingerprint,
            transfer_token=res.admitted.transfer_token,
            total_chunks=total,
            first_token_id=first_token,
        )
    )


@pytest.fixture
def decode_pod(cluster):
    wait_idle(cluster)
    return cluster.pods("decode")[0]


def expect_failure(res: Reservation, messages, push_code, generate_code, match):
    with pytest.raises(grpc.RpcError) as e:
        res.push(messages)
    assert e.value.code() == push_code and match in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(res.call)
    assert e.value.code() == generate_code and match in e.value.details()


def test_a_complete_handmade_transfer_is_accepted(cluster, decode_pod, e2e_model):
    """The harness itself is right: a correct transfer yields tokens (so failures below are
    real)."""
    res = Reservation(decode_pod.address, "ok-1")
    cfg = load_model_config(e2e_model)
    resp = res.push(
        [
            chunk_msg(
                res, pages(e2e_model, cfg.num_layers, 3), layers=(0, cfg.num_layers), blocks=(0, 3)
            ),
            end_msg(res, 1),
        ]
    )
    assert resp.chunks_received == 1
    tokens = [t for r in res.call if r.HasField("chunk") for t in r.chunk.token_ids]
    assert res.admitted.num_cached_tokens == 0 and res.admitted.num_reserved_blocks == 3
    assert len(tokens) == 4 and tokens[0] == 5
    res.close()
    wait_idle(cluster)


@pytest.mark.parametrize(
    "case",
    [
        "fingerprint",
        "short data",
        "wrong shape",
        "out of range",
        "missing chunks",
        "out of order",
        "duplicate",
    ],
)
def test_bad_kv_streams_fail_the_request_and_free_it(cluster, decode_pod, e2e_model, case):
    cfg = load_model_config(e2e_model)
    L = cfg.num_layers
    res = Reservation(decode_pod.address, f"bad-{case.replace(' ', '-')}")
    good = pages(e2e_model, L, 3)
    if case == "fingerprint":
        msgs = [chunk_msg(res, good, layers=(0, L), blocks=(0, 3), fingerprint="0123456789abcdef")]
        expect_failure(
            res,
            msgs,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.FAILED_PRECONDITION,
            "fingerprint",
        )
    elif case == "short data":
        msg = chunk_msg(res, good, layers=(0, L), blocks=(0, 3))
        msg.chunk.data = msg.chunk.data[:-10]
        expect_failure(res, [msg], grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DATA_LOSS, "bytes")
    elif case == "wrong shape":
        msg = chunk_msg(res, pages(e2e_model, L, 2), layers=(0, L), blocks=(0, 3))
        expect_failure(res, [msg], grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DATA_LOSS, "shape")
    elif case == "out of range":
        msg = chunk_msg(res, pages(e2e_model, L, 2), layers=(0, L), blocks=(2, 4))
        expect_failure(
            res, [msg], grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DATA_LOSS, "block range"
        )
    elif case == "missing chunks":
        msgs = [
            chunk_msg(res, pages(e2e_model, L, 2), layers=(0, L), blocks=(0, 2)),
            end_msg(res, 2),
        ]
        expect_failure(
            res, msgs, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DATA_LOSS, "1 of 2 chunks"
        )
    elif case == "out of order":
        msgs = [chunk_msg(res, pages(e2e_model, L, 1), layers=(0, L), blocks=(0, 1), seq=1)]
        expect_failure(
            res, msgs, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DATA_LOSS, "arrived where chunk 0"
        )
    elif case == "duplicate":
        msgs = [
            chunk_msg(res, pages(e2e_model, L, 2), layers=(0, L), blocks=(0, 2)),
            chunk_msg(res, pages(e2e_model, 1, 1), layers=(0, 1), blocks=(1, 2), seq=1),
        ]
        expect_failure(res, msgs, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DATA_LOSS, "overlaps")
    res.close()
    wait_idle(cluster)
    assert_still_serves(decode_pod)


def assert_still_serves(pod):
    """A colocated request straight to this pod completes."""
    with cluster_auth.channel(pod.address, []) as channel:
        call = decode_pb2_grpc.DecodeServiceStub(channel).Generate(
            decode_pb2.GenerateRequest(
                request_id=f"alive-{random.random()}",
                prompt_token_ids=[5, 6, 7],
                sampling_params=sampling_params_to_proto(
                    SamplingParams(temperature=0, max_tokens=3)
                ),
                prefill_mode=decode_pb2.PREFILL_MODE_LOCAL,
            ),
            timeout=30,
        )
        responses = list(call)
    assert responses[-1].usage.completion_tokens == 3


def test_a_duplicate_request_id_is_refused_without_touching_the_first(
    cluster, decode_pod, e2e_model
):
    first = Reservation(decode_pod.address, "dup-1")
    with pytest.raises(grpc.RpcError) as e:
        Reservation(decode_pod.address, "dup-1")
    assert (
        e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already in use" in e.value.details()
    )
    # The first reservation still holds its blocks and completes normally.
    assert pod_stats(decode_pod).num_waiting_for_kv == 1
    cfg = load_model_config(e2e_model)
    first.push(
        [
            chunk_msg(
                first,
                pages(e2e_model, cfg.num_layers, 3),
                layers=(0, cfg.num_layers),
                blocks=(0, 3),
            ),
            end_msg(first, 1),
        ]
    )
    assert len([t for r in first.call if r.HasField("chunk") for t in r.chunk.token_ids]) == 4
    first.close()
    wait_idle(cluster)


def test_kv_for_an_unknown_request_is_refused(decode_pod, e2e_model):
    with cluster_auth.channel(decode_pod.address, []) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        c = make_chunk("never-admitted", "x", 0, (0, 1), (0, 1), pages(e2e_model, 1, 1))
        with pytest.raises(grpc.RpcError) as e:
            stub.PushKV(iter([decode_pb2.PushKVRequest(chunk=c)]), timeout=10)
        assert (
            e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            and "no KV reservation" in e.value.details()
        )


def test_full_decode_pods_refuse_admission_and_the_router_answers_429(cluster):
    wait_idle(cluster)
    holds = []
    try:
        for pod in cluster.pods("decode"):
            # 2000-token prompts take 125 of 256 blocks each: two fill a pod.
            for i in range(2):
                holds.append(Reservation(pod.address, f"hold-{pod.name}-{i}", [7] * 2000))
            with pytest.raises(grpc.RpcError) as e:
                Reservation(pod.address, f"refused-{pod.name}", [7] * 300)
            assert (
                e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                and "no room" in e.value.details()
            )
        time.sleep(1.0)  # let the router's stats catch up; refusals are handled either way
        r = httpx.post(
            f"{cluster.router_url}/v1/completions",
            json={"prompt": [9] * 300, "max_tokens": 4},
            timeout=30,
        )
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "RateLimitError"
    finally:
        for h in holds:
            h.close()
    wait_idle(cluster)
    r = httpx.post(
        f"{cluster.router_url}/v1/completions",
        json={"prompt": [9] * 300, "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 200


def test_admission_refused_on_one_pod_goes_to_the_other(e2e_model):
    """In-process pods: the router's first choice is full, the request runs on the second."""
    from services.decode import server as decode_server
    from services.decode.settings import DecodeSettings
    from services.router.discovery import StaticDiscovery
    from services.router.flow import Dispatcher, Route
    from services.router.pods import PodRegistry
    from services.router.settings import RouterSettings
    from tandem.api.requests import Job

    async def main():
        full = await decode_server.start(
            DecodeSettings(model=e2e_model, host="127.0.0.1", port=0, num_kv_blocks=8)
        )
        free = await decode_server.start(
            DecodeSettings(model=e2e_model, host="127.0.0.1", port=0, num_kv_blocks=64)
        )
        a, b = f"127.0.0.1:{full.port}", f"127.0.0.1:{free.port}"
        registry = PodRegistry(StaticDiscovery([], [a, b]), interval_s=60, timeout_s=5)
        try:
            await registry.start()
            # Fill pod a: a 64-token reservation holds 4 of its 8 blocks, and the job needs 7.
            hold = full.parts["core"]
            hold.open_stream("hold")
            await hold.reserve("hold", [5] * 64, SamplingParams(max_tokens=4))
            for pod in registry.pods:  # make the full pod look best, as stale stats would
                if pod.address == a:
                    pod.inflight_blocks = -1000
            route = Route()
            job = Job("r1", list(range(10, 110)), SamplingParams(temperature=0, max_tokens=4))
            dispatcher = Dispatcher(registry, RouterSettings(model=e2e_model, decode=[a, b]))
            events = [e async for e in dispatcher.generate(job, route)]
            assert hold.stats.num_waiting_for_kv == 1
            # A job that no pod could ever hold is a 400-class error, not a 429.
            with pytest.raises(RequestTooLarge):
                big = Job(
                    "r2",
                    [10 + i % 900 for i in range(1090)],
                    SamplingParams(temperature=0, max_tokens=4),
                )
                [e async for e in dispatcher.generate(big, Route())]
            return events, route, a, b
        finally:
            await registry.close()
            await full.stop()
            await free.stop()

    events, route, a, b = asyncio.run(main())
    assert events[-1].finish_reason == "length" and sum(len(e.token_ids) for e in events) == 4
    assert route.tried_decode == {a} and route.decode == b and route.mode == "colocated"


# The patch runs in the pod's engine core process too: spawn imports this script there (as
# __mp_main__), and the core is where the KV transfer runs.
CRASHING_PREFILL = """
import os, sys
from tandem.transfer import push_streams
original = push_streams.KVTransfer.submit
def submit(self, *args):
    original(self, *args)
    if self.chunks == 2:
        os._exit(17)   # die with a KV transfer half done
push_streams.KVTransfer.submit = submit
if __name__ == "__main__":
    from services.cli import main
    main(sys.argv[1:])
"""


def test_prefill_pod_dying_mid_transfer_is_retried_colocated(e2e_model, tmp_path):
    script = tmp_path / "crashing_prefill.py"
    script.write_text(CRASHING_PREFILL)
    # gRPC: the crash is planted in its PushKV path (a memory transport's writer that dies is
    # the conformance suite's lease test).
    cluster = start_cluster(
        e2e_model,
        prefill=1,
        decode=1,
        kv_transport="grpc",
        worker_args=["--max-num-seqs", "16"],
    )
    try:
        prefill = cluster.pods("prefill")[0]
        # Replace the healthy prefill pod by one that crashes during its first transfer.
        prefill.proc.terminate()
        prefill.proc.wait()
        args = [a for a in prefill.args] + [
            "--kv-layers-per-group",
            "1",
            "--kv-chunk-bytes",
            "65536",
        ]
        log = open(tmp_path / "crashing_prefill.log", "w")
        prefill.proc = subprocess.Popen(
            [sys.executable, str(script), *args], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while (
            httpx.get(f"{cluster.router_url}/health").json()["prefill_pods"] != 1
        ):  # the router sees it
            assert time.monotonic() < deadline and prefill.proc.poll() is None
            time.sleep(0.2)
        prompt = list(range(5, 205))
        r = httpx.post(
            f"{cluster.router_url}/v1/completions",
            json={"prompt": prompt, "max_tokens": 6, "temperature": 0},
            timeout=60,
        )
        try:
            code = prefill.proc.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        # Its engine core died mid-transfer (17); the pod then exits too (1), to be restarted.
        log = (tmp_path / "crashing_prefill.log").read_text()
        assert code == 1 and "engine core process exited (code 17)" in log, (
            "the prefill pod did not crash mid-transfer:\n"
            + log[-3000:]
            + "".join(list(cluster.log)[-30:])
        )
        assert r.status_code == 200, r.text
        metrics = httpx.get(f"{cluster.router_url}/metrics").text
        assert (
            'tandem_router_routing_decisions_total{mode="colocated"} 1.0' in metrics
        )  # retried colocated
        assert "tandem_router_attempts_total 2.0" in metrics
        from tandem.engine import LLM

        want = LLM(e2e_model, num_kv_blocks=64).generate(
            [prompt], SamplingParams(temperature=0, max_tokens=6)
        )
        assert r.json()["choices"][0]["text"] == want[0].outputs[0].text
        decode = cluster.pods("decode")[0]
        deadline = time.monotonic() + 15
        while True:
            st = pod_stats(decode)
            if st.num_free_blocks == st.num_total_blocks and not st.num_waiting_for_kv:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
    finally:
        cluster.stop()


def interrupt_a_stream(cluster, body: dict, act) -> tuple:
    """Stream a completion, apply ``act`` to the decode pod's process once its first lines
    arrived and the pod reports the stream running; return (that pod, the stream's remaining
    ``data:`` lines). ``body`` must ask for a long generation (ignore_eos, 1,000+ tokens): at
    ~1 ms a token on an idle machine, 400 tokens ended before a CI run saw them running."""
    # Idle first. This also pays the first GetStats' costs (a new channel, up to ~2 s on a
    # loaded machine) before the stream starts, not while it runs.
    busy = [p.name for p in cluster.pods("decode") if pod_stats(p).num_running]
    assert not busy, f"decode pods busy before the stream: {busy}"
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{cluster.router_url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            # Pods' stats are snapshots their engine core publishes every 100 ms: poll.
            deadline = time.monotonic() + 10
            while True:
                serving = next(
                    (p for p in cluster.pods("decode") if pod_stats(p).num_running), None
                )
                if serving is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            assert serving is not None, "no decode pod reported the stream as running"
            act(serving.proc)
            return serving, [line for line in lines if line.startswith("data: ")]


def assert_router_serves_with_one_decode_pod(cluster) -> None:
    """The gone pod is out of routing, the live one stays (a poll may lag on a loaded machine)."""
    deadline = time.monotonic() + 5
    while httpx.get(f"{cluster.router_url}/health").json().get("decode_pods") != 1:
        assert time.monotonic() < deadline, "the router never settled on the one live decode pod"
        time.sleep(0.1)
    ok = httpx.post(
        f"{cluster.router_url}/v1/completions",
        json={"prompt": "still up", "max_tokens": 3},
        timeout=30,
    )
    assert ok.status_code == 200


def test_a_decode_pod_dying_mid_stream_is_reported_and_marked_down(e2e_model):
    # Migration off: the stream ends with the failure (with it on, the stream moves to the
    # other pod: tests/chaos/test_decode_migration.py).
    cluster = start_cluster(
        e2e_model, prefill=0, decode=2, kvstore=False, router_args=["--max-migrations", "0"]
    )
    try:
        body = {
            "prompt": "a stream whose pod dies",
            "max_tokens": 2000,
            "stream": True,
            "ignore_eos": True,
        }
        serving, rest = interrupt_a_stream(cluster, body, lambda proc: proc.kill())
        error = json.loads(rest[-2][len("data: ") :])["error"]
        assert rest[-1] == "data: [DONE]"
        assert error["code"] == 503 and error["message"].startswith(
            f"decode pod {serving.address} failed: "
        )
        assert_router_serves_with_one_decode_pod(cluster)
    finally:
        cluster.stop()


def test_a_decode_pod_stopped_by_sigterm_finishes_its_streams_and_takes_no_new_ones(
    e2e_model, monkeypatch
):
    """A rollout's SIGTERM: health turns NOT_SERVING, new work goes elsewhere, streams in flight
    finish."""
    # The pods' drain outlasts the stream on a loaded 2-core machine (the default is 30 s).
    monkeypatch.setenv("TANDEM_DECODE_SHUTDOWN_GRACE_S", "120")
    cluster = start_cluster(e2e_model, prefill=0, decode=2, kvstore=False)
    try:
        max_tokens = 1000  # ~1 s on an idle machine, up to ~20 s on a loaded one
        body = {
            "prompt": "a stream during a rollout",
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        drained_live: list[bool] = []

        def sigterm(proc) -> None:
            """SIGTERM, then see the pod draining (health NOT_SERVING) with the stream still
            running: the drain must have a live stream to finish, or the test proves nothing."""
            proc.send_signal(signal.SIGTERM)
            pod = next(p for p in cluster.pods("decode") if p.proc is proc)
            deadline = time.monotonic() + 10
            with grpc.insecure_channel(pod.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while time.monotonic() < deadline:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        drained_live.append(pod_stats(pod).num_running >= 1)
                        return
                    time.sleep(0.01)

        serving, lines = interrupt_a_stream(cluster, body, sigterm)
        assert drained_live == [True], (
            "the pod never reported NOT_SERVING"
            if not drained_live
            else "the stream ended before the pod began draining"
        )
        assert lines[-1] == "data: [DONE]"
        rest = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
        assert not any("error" in event for event in rest), "".join(list(cluster.log)[-40:])
        assert rest[-1]["usage"]["completion_tokens"] == max_tokens
        assert serving.proc.wait(timeout=30) == 0  # it exits by itself once drained
        assert_router_serves_with_one_decode_pod(cluster)
    finally:
        cluster.stop()


def test_a_draining_decode_pod_still_takes_the_kv_of_requests_it_admitted(e2e_model):
    """SIGTERM between admission and KV arrival: the pages are still accepted and the request
    finishes; a new request is refused UNAVAILABLE (the router retries it elsewhere)."""
    cluster = start_cluster(e2e_model, prefill=0, decode=1, kvstore=False)
    try:
        pod = cluster.pods("decode")[0]
        res = Reservation(pod.address, "drain-1")
        pod.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as e:
            Reservation(pod.address, "drain-2")
        assert (
            e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
        )
        cfg = load_model_config(e2e_model)
        res.push(
            [
                chunk_msg(
                    res,
                    pages(e2e_model, cfg.num_layers, 3),
                    layers=(0, cfg.num_layers),
                    blocks=(0, 3),
                ),
                end_msg(res, 1),
            ]
        )
        tokens = [t for r in res.call if r.HasField("chunk") for t in r.chunk.token_ids]
        assert len(tokens) == 4 and tokens[0] == 5
        res.close()
        assert pod.proc.wait(timeout=30) == 0
    finally:
        cluster.stop()


def test_requests_without_max_tokens_fit_a_pool_smaller_than_the_model_context(e2e_model):
    """Pods cap the context to their KV pool and report it; the router defaults max_tokens to it."""
    cluster = start_cluster(e2e_model, prefill=1, decode=1, num_kv_blocks=16)  # 256 tokens of KV
    try:
        time.sleep(1.0)  # one stats poll
        models = httpx.get(f"{cluster.router_url}/v1/models").json()
        assert models["data"][0]["max_model_len"] == 257
        r = httpx.post(
            f"{cluster.router_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "no max_tokens"}], "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 257
    finally:
        cluster.stop()
