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
