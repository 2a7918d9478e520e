"""``tandem up --tensor-parallel-size 2`` end to end on CPU: a prefill and a decode pod whose
engine cores each run rank 0 and start rank 1 beside them (gloo), behind the real router.

Greedy output must be Hugging Face's tokens, both disaggregated (the prefill pod gathers each
page's kv heads from its two ranks onto rank 0 and pushes them over gRPC; the decode pod splits
them between its two ranks' pools) and colocated; a memory writer, which would need every rank's
pool, is refused; a rank that dies takes its pod down (to be restarted) instead of leaving it
unable to step; and stopping a pod leaves no rank behind.
"""

import os
import random
import signal
import time
from pathlib import Path

import grpc
import pytest

from tandem.api import cluster_auth
from tandem.api.proto_convert import sampling_params_to_proto
from tandem.api.sampling_params import SamplingParams
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc

from .conftest import greedy_token_ids, start_cluster, wait_idle
from .test_metrics import scrape, value

pytestmark = pytest.mark.integration

MAX_NEW = 12
FOLLOWER = "follower_main"


def _descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        cmdlines[int(entry.name)] = cmd
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = cmdlines[child]
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def tp_cluster(e2e_model):
    c = start_cluster(e2e_model, prefill=1, decode=1, kvstore=False, tensor_parallel_size=2)
    yield c
    c.stop()


def _ranks(pod) -> list[int]:
    return [p for p, cmd in _descendants(pod.proc.pid).items() if FOLLOWER in cmd]


def test_tensor_parallel_pods_serve_transformers_tokens_disaggregated(
    tp_cluster, e2e_model, hf_reference
):
    pods = tp_cluster.pods("prefill") + tp_cluster.pods("decode")
    assert [len(_ranks(p)) for p in pods] == [1, 1], "each engine core starts one more rank"
    hf = hf_reference(e2e_model, MAX_NEW)
    rng = random.Random(19)
    before = {p.name: scrape(p.metrics_url) for p in pods}
    for prompt in [[rng.randrange(3, 1000) for _ in range(n)] for n in (5, 40, 90)]:
        assert greedy_token_ids(tp_cluster.router_url, prompt, MAX_NEW) == hf.generate(prompt)
    after = {p.name: scrape(p.metrics_url) for p in pods}

    def moved(pod):
        name = "tandem_kv_transfer_bytes"
        return value(after[pod.name], name, "_total", transport="grpc") - value(
            before[pod.name], name, "_total", transport="grpc"
        )

    prefill, decode = pods
    assert moved(prefill) > 0 and moved(decode) == moved(prefill)
    wait_idle(tp_cluster)


def test_a_memory_writer_is_refused_by_a_tensor_parallel_decode_pod(tp_cluster):
    """Each rank holds its own kv heads of a page: only gRPC, whose receiver splits pages, may
    write; a claim for a memory transport is refused and the reservation stays the router's."""
    pod = tp_cluster.pods("decode")[0]
    channel = cluster_auth.channel(pod.address, [])
    try:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        assert not stub.DescribeKV(decode_pb2.DescribeKVRequest(), timeout=10).pools
        call = stub.Generate(
            decode_pb2.GenerateRequest(
                request_id="tp-remote",
                prompt_token_ids=list(range(3, 43)),
                sampling_params=sampling_params_to_proto(
                    SamplingParams(temperature=0, max_tokens=4)
                ),
                prefill_mode=decode_pb2.PREFILL_MODE_REMOTE,
            ),
            timeout=30,
        )
        admitted = next(call).admitted
        with pytest.raises(grpc.RpcError) as e:
            stub.ClaimKV(
                decode_pb2.ClaimKVRequest(
                    request_id="tp-remote",
                    transfer_token=admitted.transfer_token,
                    transport="shm",
                ),
                timeout=10,
            )
        call.cancel()
    finally:
        channel.close()
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "does not offer" in e.value.details()
    wait_idle(tp_cluster)  # the cancelled reservation gave its blocks back


def test_a_rank_that_dies_takes_its_pod_down_to_be_restarted(e2e_model):
    """A group cannot step without one of its ranks: the engine core notices the rank's end at
    once (even idle), exits, and the pod exits with status 1 for its orchestrator."""
    c = start_cluster(e2e_model, prefill=0, decode=1, kvstore=False, tensor_parallel_size=2)
    try:
        pod = c.pods("decode")[0]
        (rank,) = [p for p, cmd in _descendants(pod.proc.pid).items() if FOLLOWER in cmd]
        os.kill(rank, signal.SIGKILL)
        assert pod.proc.wait(30) == 1
    finally:
        c.stop()


def test_stopping_the_pod_stops_its_ranks(tp_cluster):
    """Last in this module: it stops the module's cluster."""
    ranks = [
        r for pod in tp_cluster.pods("prefill") + tp_cluster.pods("decode") for r in _ranks(pod)
    ]
    assert len(ranks) == 2
    tp_cluster.stop()
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{p}") for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [p for p in ranks if os.path.exists(f"/proc/{p}")]
    # A zombie (exited, not yet reaped by an orphan's new parent) holds no resources.
    alive = [
        p for p in alive if Path(f"/proc/{p}/stat").read_text().split(")")[1].split()[0] != "Z"
    ]
    assert not alive, f"tensor-parallel ranks outlived their pod: {alive}"
