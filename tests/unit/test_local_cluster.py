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


def test_the_summary_names_each_service_and_never_a_redis_password(tiny_model):
    """One line per service (address, metrics); a --redis-url's password is never printed."""
    model = tiny_model("llama")
    cluster = LocalCluster(
        UpOptions(
            model=model,
            port=0,
            redis_url="redis://:s3cret-pw@10.0.0.7:6380/0",
            router_args=["--served-model-name", "my-model"],
        ),
        model,
        relay=False,
    )
    cluster.plan()
    lines = cluster.summary()
    assert not any("s3cret-pw" in line for line in lines)
    assert lines[0].startswith("tandem: model     my-model (LlamaForCausalLM, cpu) from /")
    by_name = {line.split()[1]: line for line in lines[1:-1]}
    assert set(by_name) == {"kvstore", "prefill-0", "decode-0", "router"}
    for service in cluster.services:
        assert service.metrics_url and f"metrics {service.metrics_url}" in by_name[service.name]
    assert by_name["kvstore"].endswith("redis 10.0.0.7:6380 (--redis-url)")
    assert f"grpc {cluster.router_grpc} (SDK)" in by_name["router"]
    assert lines[-1] == (
        f"tandem: load test: make loadtest URL={cluster.router_url} GRPC={cluster.router_grpc}"
    )


class _Running:
    returncode = None

    def poll(self):
        return None


def test_wait_ready_reports_progress_not_polls():
    """Each service's ready line once, and while some start, which ones (every few seconds)."""
    import itertools

    from services.local_cluster import Service

    cluster = LocalCluster(UpOptions(model=Path("m"), port=0), Path("m"), relay=False)
    polls = itertools.count()
    slow = lambda: next(polls) >= 3  # noqa: E731 - ready at its fourth poll (~0.6 s)
    cluster.services = [
        Service("fast", [], "a:1", lambda: True, proc=_Running()),
        Service("slow", [], "a:2", slow, proc=_Running()),
    ]
    assert cluster.wait_ready(10, progress_every_s=0.3) is None
    log = "".join(cluster.log)
    assert log.count("tandem: fast ready (") == 1 and log.count("tandem: slow ready (") == 1
    assert "waiting for slow\n" in log and "waiting for fast" not in log


def test_each_role_gets_its_tensor_parallel_size():
    planned = worker_args(prefill=1, decode=2, tensor_parallel_size=2)
    assert [flag(planned[n], "--tensor-parallel-size") for n in planned] == ["2", "2", "2"]
    planned = worker_args(prefill=1, decode=1, prefill_tensor_parallel_size=2)
    assert flag(planned["prefill-0"], "--tensor-parallel-size") == "2"
    assert "--tensor-parallel-size" not in planned["decode-0"]
    planned = worker_args(
        prefill=1, decode=1, tensor_parallel_size=4, decode_tensor_parallel_size=2
    )
    assert flag(planned["prefill-0"], "--tensor-parallel-size") == "4"
    assert flag(planned["decode-0"], "--tensor-parallel-size") == "2"
    assert "--tensor-parallel-size" not in worker_args(prefill=1, decode=1)["decode-0"]
    with pytest.raises(ValidationError):
        UpOptions(model=Path("m"), decode_tensor_parallel_size=0)


def test_a_tensor_parallel_prefill_pod_is_accepted():
    from services.prefill.settings import PrefillSettings

    assert PrefillSettings(model="m", tensor_parallel_size=2).tensor_parallel_size == 2


def test_gpu_per_worker_gives_each_worker_gpus_of_its_own():
    planned = worker_args(prefill=1, decode=2, device="cuda", gpu_per_worker=True)
    assert [flag(planned[n], "--device") for n in ("prefill-0", "decode-0", "decode-1")] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
    ]
    # Not sharing a GPU: no memory split between workers.
    assert all("--gpu-memory-utilization" not in a for a in planned.values())
    # Tensor-parallel workers take as many GPUs as ranks, from --device's index.
    planned = worker_args(
        prefill=1, decode=1, device="cuda:2", gpu_per_worker=True, decode_tensor_parallel_size=2
    )
    assert flag(planned["prefill-0"], "--device") == "cuda:2"
    assert flag(planned["decode-0"], "--device") == "cuda:3"
    # Sharing (the default): every worker on --device, its memory split.
    shared = worker_args(prefill=1, decode=1, device="cuda")
    assert {flag(a, "--device") for a in shared.values()} == {"cuda"}
    assert all(flag(a, "--gpu-memory-utilization") for a in shared.values())
    # On CPU the flag changes nothing.
    cpu = worker_args(prefill=1, decode=1, gpu_per_worker=True)
    assert {flag(a, "--device") for a in cpu.values()} == {"cpu"}
