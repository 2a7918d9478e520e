"""`tandem up` planning: the flags each worker gets, and option validation (no process started)."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.local_cluster import LocalCluster, UpOptions


def worker_args(**opts) -> dict[str, list[str]]:
    cluster = LocalCluster(
        UpOptions(model=Path("m"), port=0, kvstore=False, **opts), Path("m"), relay=False
    )
    cluster.plan()
    return {s.name: s.args for s in cluster.services if s.name != "router"}


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_workers_sharing_a_gpu_split_its_memory():
    planned = worker_args(device="cuda", prefill=1, decode=2)
    assert set(planned) == {"prefill-0", "decode-0", "decode-1"}
    shares = [float(flag(args, "--gpu-memory-utilization")) for args in planned.values()]
    assert shares == [pytest.approx(0.3, abs=1e-4)] * 3


@pytest.mark.parametrize(
    "opts",
    [
        dict(device="cpu", prefill=1, decode=2),  # no GPU
        dict(device="cuda", prefill=0, decode=1),  # alone on it
        dict(device="cuda:1", prefill=1, decode=1, num_kv_blocks=100),  # the pool size is given
        dict(
            device="cuda", prefill=1, decode=1, worker_args=["--gpu-memory-utilization", "0.4"]
        ),  # chosen
        dict(device="cuda", prefill=1, decode=1, worker_args=["--num-kv-blocks=50"]),
    ],
)
def test_no_split_when_not_shared_or_already_chosen(opts):
    for args in worker_args(**opts).values():
        assert args.count("--gpu-memory-utilization") == (
            1 if "0.4" in opts.get("worker_args", []) else 0
        )


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ValidationError, match="device"):
        UpOptions(model=Path("m"), device=device)


@pytest.mark.parametrize(
    "args", [["--gpu-memory-utilization", "0.9"], ["--gpu-memory-utilization=0.6"]]
)
def test_shares_that_add_up_to_more_than_the_gpu_are_refused(args):
    with pytest.raises(ValueError, match="give each at most 0.50"):
        worker_args(device="cuda", prefill=1, decode=1, worker_args=args)


def test_prefill_workers_know_the_decode_workers_as_the_router_names_them():
    """A prefill pod pushes KV only to decode pods it knows: the same addresses the router
    names as decode targets."""
    import json

    cluster = LocalCluster(
        UpOptions(model=Path("m"), port=0, kvstore=False, prefill=2, decode=3),
        Path("m"),
        relay=False,
    )
    cluster.plan()
    router = json.loads(flag(cluster.by_name("router").args, "--decode"))
    assert router == [s.address for s in cluster.pods("decode")] and len(router) == 3
    for pod in cluster.pods("prefill"):
        assert json.loads(flag(pod.args, "--decode")) == router
    for pod in cluster.pods("decode"):
        assert "--decode" not in pod.args


def test_an_api_key_with_a_comma_is_refused_up_front():
    """The router reads ``tandem up``'s keys from one comma-separated variable."""
    with pytest.raises(ValueError, match="comma"):
        UpOptions(model=Path("m"), api_key=["key-one-0123,key-two-0123"])
    assert UpOptions(model=Path("m"), api_key=["key-one-0123"]).api_key == ["key-one-0123"]
