"""End-to-end fixtures: the whole system as real processes on localhost (CPU, tiny model)."""

import time

import pytest

from services.local_cluster import (
    LocalCluster,
    Service,
    UpOptions,
    free_port,
    pod_stats,
    router_sees_every_pod,
)

NUM_KV_BLOCKS = 256


THRESHOLD_TOKENS = 24
"""The "router-threshold" router runs prompts shorter than this colocated, longer ones
disaggregated."""


def start_cluster(model, *, prefill=1, decode=2, colocated_router=False, **opts) -> LocalCluster:
    cluster = LocalCluster(
        UpOptions(
            model=model,
            port=0,
            prefill=prefill,
            decode=decode,
            num_kv_blocks=opts.pop("num_kv_blocks", NUM_KV_BLOCKS),
            **opts,
        ),
        model,
        relay=False,
    )
    cluster.start_redis()
    cluster.plan()
    if colocated_router:
        # More routers over the same pods: one runs every prompt colocated, one only short ones.
        for name, threshold in (
            ("router-colocated", 1_000_000),
            ("router-threshold", THRESHOLD_TOKENS),
        ):
            port = free_port()
            args = list(cluster.by_name("router").args)
            args[args.index("--port") + 1] = str(port)
            args[args.index("--grpc-port") + 1] = str(free_port())
            args[args.index("--colocate-below-tokens") + 1] = str(threshold)
            url = f"http://127.0.0.1:{port}/health"
            ready = lambda u=url: router_sees_every_pod(u, prefill, decode)  # noqa: E731
            cluster.services.append(
                Service(name, args, f"127.0.0.1:{port}", ready, f"http://127.0.0.1:{port}/metrics")
            )
    cluster.start()
    problem = cluster.wait_ready(300)
    if problem is not None:
        cluster.stop()
        raise RuntimeError(f"{problem}\n{''.join(list(cluster.log)[-60:])}")
    return cluster


def start_tool_cluster(model) -> LocalCluster:
    """The usual e2e cluster (1 prefill + 2 decode pods, a disaggregating, a colocated and a
    threshold router), its routers parsing Hermes tool calls for tool_choice "auto" (the tool
    calling modules' cluster)."""
    return start_cluster(
        model,
        prefill=1,
        decode=2,
        colocated_router=True,
        tool_call_parser="hermes",
        enable_auto_tool_choice=True,
    )


def wait_idle(cluster: LocalCluster, timeout: float = 20.0) -> None:
    """Until every pod holds no request and all its KV blocks are free again (else fail)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = {
            s.name: pod_stats(s)
            for s in cluster.services
            if s.name.split("-")[0] in ("prefill", "decode")
        }
        busy = {
            name: (
                st.num_running,
                st.num_waiting,
                st.num_waiting_for_kv,
                st.num_free_blocks,
                st.num_total_blocks,
            )
            for name, st in stats.items()
            if st.num_running
            or st.num_waiting
            or st.num_waiting_for_kv
            or st.num_free_blocks != st.num_total_blocks
        }
        if not busy:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"pods did not return to idle: {busy}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def e2e_model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(e2e_model):
    """1 prefill + 2 decode pods, a disaggregating router, a colocated one and one that colocates
    prompts shorter than THRESHOLD_TOKENS."""
    c = start_cluster(e2e_model, prefill=1, decode=2, colocated_router=True)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference(e2e_model):
    """The offline engine on the same weights."""
    from tandem.engine import LLM

    return LLM(e2e_model, num_kv_blocks=NUM_KV_BLOCKS)


def greedy_token_ids(router_url: str, prompt: list[int], max_tokens: int) -> list[int]:
    """A greedy /v1/completions of ``prompt`` through the router: its tokens' ids."""
    import httpx

    r = httpx.post(
        f"{router_url}/v1/completions",
        json={
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    return [int(t.removeprefix("token_id:")) for t in tokens]
