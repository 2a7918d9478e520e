"""Discovery follows pods coming and going; the router sends only to the pods it currently knows."""

import asyncio
import socket

import pytest
from kubernetes import client

from services.router.discovery import DnsDiscovery, KubernetesDiscovery, StaticDiscovery, wait_for

from .k8s_api_stub import FakeKubernetesAPI, endpoint_slice


@pytest.fixture
def api():
    fake = FakeKubernetesAPI()
    yield fake
    fake.close()


def discovery_for(api: FakeKubernetesAPI) -> KubernetesDiscovery:
    config = client.Configuration(host=api.url)
    config.retries = False  # urllib3 would otherwise retry a dropped connection itself
    return KubernetesDiscovery(
        "ns",
        {"prefill": "tandem-prefill", "decode": "tandem-decode"},
        api_client=client.ApiClient(config),
        watch_timeout_s=2,
        request_timeout_s=5,
    )


def eventually(fn, expected, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while (got := fn()) != expected:
        assert time.monotonic() < deadline, f"got {got}, expected {expected}"
        time.sleep(0.05)


def test_endpoint_slices_are_followed_through_additions_readiness_and_removals(api):
    api.put(
        endpoint_slice(
            "decode-a", "tandem-decode", 50052, [("10.0.0.1", True), ("10.0.0.2", False)], 0
        )
    )
    api.put(endpoint_slice("prefill-a", "tandem-prefill", 50051, [("10.0.1.1", True)], 0))
    d = discovery_for(api)
    d.start()
    try:
        assert wait_for(d, "decode", 1, 10) == [
            "10.0.0.1:50052"
        ]  # not-ready endpoints are left out
        assert d.addresses("prefill") == ["10.0.1.1:50051"]
        # A pod becomes ready, another slice appears (more replicas).
        api.put(
            endpoint_slice(
                "decode-a", "tandem-decode", 50052, [("10.0.0.1", True), ("10.0.0.2", True)], 0
            )
        )
        api.put(endpoint_slice("decode-b", "tandem-decode", 50052, [("10.0.0.3", True)], 0))
        eventually(
            lambda: d.addresses("decode"), ["10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"]
        )
        # A pod stops being ready, a slice goes away (scale-down).
        api.put(
            endpoint_slice(
                "decode-a", "tandem-decode", 50052, [("10.0.0.1", False), ("10.0.0.2", True)], 0
            )
        )
        api.delete("decode-b")
        eventually(lambda: d.addresses("decode"), ["10.0.0.2:50052"])
        assert d.addresses("prefill") == ["10.0.1.1:50051"]  # the other role is untouched
    finally:
        d.close()


def test_watch_restarts_keep_following(api):
    """Watches end (timeouts, API restarts); the discovery re-lists and keeps up."""
    d = discovery_for(api)
    d.start()
    try:
        api.put(endpoint_slice("decode-a", "tandem-decode", 50052, [("10.0.0.1", True)], 0))
        eventually(lambda: d.addresses("decode"), ["10.0.0.1:50052"])
        import time

        time.sleep(2.5)  # past the 2 s watch timeout: a new watch is running now
        api.put(endpoint_slice("decode-a", "tandem-decode", 50052, [("10.0.0.9", True)], 0))
        eventually(lambda: d.addresses("decode"), ["10.0.0.9:50052"])
    finally:
        d.close()


@pytest.mark.parametrize("faults", [["drop"], ["500"], ["gone"], ["drop", "500", "drop"]])
def test_api_failures_are_survived(api, faults):
    """A dropped connection, an error status or an expired watch: the discovery re-lists and keeps
    following."""
    api.put(endpoint_slice("decode-a", "tandem-decode", 50052, [("10.0.0.1", True)], 0))
    d = discovery_for(api)
    d.start()
    try:
        assert wait_for(d, "decode", 1, 10) == ["10.0.0.1:50052"]
        api.faults += faults  # hit by the next requests: the watches' and the re-lists'
        api.put(endpoint_slice("decode-a", "tandem-decode", 50052, [("10.0.0.2", True)], 0))
        eventually(lambda: d.addresses("decode"), ["10.0.0.2:50052"], timeout=20)
        eventually(lambda: api.faults, [], timeout=20)  # every fault was served...
        api.put(endpoint_slice("decode-b", "tandem-decode", 50052, [("10.0.0.3", True)], 0))
        eventually(
            lambda: d.addresses("decode"), ["10.0.0.2:50052", "10.0.0.3:50052"], timeout=20
        )  # ...and survived
    finally:
        d.close()


def test_an_unreachable_api_at_start_does_not_block_and_is_retried(api):
    api.put(endpoint_slice("decode-a", "tandem-decode", 50052, [("10.0.0.1", True)], 0))
    api.faults += ["drop", "drop"]
    d = discovery_for(api)
    d.start(wait_s=0.2)  # returns although the first lists failed
    try:
        eventually(lambda: d.addresses("decode"), ["10.0.0.1:50052"], timeout=20)
    finally:
        d.close()


def test_dual_stack_slices_count_each_pod_once_and_ipv6_is_bracketed(api):
    api.put(endpoint_slice("decode-v4", "tandem-decode", 50052, [("10.0.0.1", True)], 0))
    api.put(
        endpoint_slice(
            "decode-v6", "tandem-decode", 50052, [("fd00::1", True)], 0, address_type="IPv6"
        )
    )
    api.put(
        endpoint_slice(
            "prefill-v6", "tandem-prefill", 50051, [("fd00::2", True)], 0, address_type="IPv6"
        )
    )
    d = discovery_for(api)
    d.start()
    try:
        eventually(lambda: d.addresses("decode"), ["10.0.0.1:50052"])
        eventually(lambda: d.addresses("prefill"), ["[fd00::2]:50051"])  # an IPv6-only Service
    finally:
        d.close()


def test_dns_and_static_discovery():
    assert StaticDiscovery(["a:1"], ["b:2"]).addresses("decode") == ["b:2"]
    dns = DnsDiscovery({"decode": "localhost"}, {"prefill": 1, "decode": 50052})
    dns.refresh()
    addresses = dns.addresses("decode")
    assert addresses and all(a.endswith(":50052") for a in addresses)
    assert all(a.startswith("[") for a in addresses if a.count(":") > 1)  # IPv6 in brackets
    assert dns.addresses("prefill") == []
    missing = DnsDiscovery({"decode": "no-such-host.invalid"}, {"decode": 1, "prefill": 1})
    missing.refresh()
    assert missing.addresses("decode") == []


def test_dns_keeps_its_last_answer_when_the_resolver_fails(monkeypatch):

    dns = DnsDiscovery({"decode": "tandem-decode.ns.svc"}, {"prefill": 1, "decode": 50052})
    answers = [[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 50052))]]

    def resolve(host, port, type=0):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    dns.refresh()
    assert dns.addresses("decode") == ["10.0.0.1:50052"]
    answers.append(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    dns.refresh()
    assert dns.addresses("decode") == ["10.0.0.1:50052"]  # a flaky resolver drops no pod
    answers.append(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    dns.refresh()
    assert dns.addresses("decode") == []  # no ready pod behind the Service any more


def test_the_router_follows_discovery_to_new_pods_and_away_from_removed_ones(api, llama_dir):
    from services.decode import server as decode_server
    from services.decode.settings import DecodeSettings
    from services.router.flow import Dispatcher, Route
    from services.router.pods import PodRegistry
    from services.router.settings import RouterSettings
    from tandem.api.requests import Job
    from tandem.api.sampling_params import SamplingParams

    async def main():
        a = await decode_server.start(
            DecodeSettings(model=llama_dir, host="127.0.0.1", port=0, num_kv_blocks=32)
        )
        b = await decode_server.start(
            DecodeSettings(model=llama_dir, host="127.0.0.1", port=0, num_kv_blocks=32)
        )
        api.put(endpoint_slice("decode", "tandem-decode", a.port, [("127.0.0.1", True)], 0))
        registry = PodRegistry(discovery_for(api), interval_s=0.1, timeout_s=5)
        dispatcher = Dispatcher(registry, RouterSettings(model=llama_dir))
        try:
            await registry.start()
            await asyncio.to_thread(wait_for, registry.discovery, "decode", 1, 10)

            async def run(i: int) -> str:
                route = Route()
                job = Job(f"r{i}", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=2))
                events = [e async for e in dispatcher.generate(job, route)]
                assert events[-1].finish_reason is not None
                return route.decode

            await registry.refresh()
            assert await run(0) == f"127.0.0.1:{a.port}"
            # Pod a is replaced by pod b (a rollout) while a request streams from a: the router
            # follows without a restart, and the stream in flight on a finishes.
            route = Route()
            long_job = Job(
                "long", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
            )
            streaming = dispatcher.generate(long_job, route)
            tokens = (await anext(streaming)).token_ids
            api.put(endpoint_slice("decode", "tandem-decode", b.port, [("127.0.0.1", True)], 0))
            for _ in range(100):
                await registry.refresh()
                if [p.address for p in registry.by_role("decode")] == [f"127.0.0.1:{b.port}"]:
                    break
                await asyncio.sleep(0.05)
            assert await run(1) == f"127.0.0.1:{b.port}"
            assert [p.address for p in registry.pods] == [
                f"127.0.0.1:{b.port}"
            ]  # a is no longer routed to
            async for event in streaming:
                tokens += event.token_ids
            assert route.decode == f"127.0.0.1:{a.port}" and len(tokens) == 300
            assert event.finish_reason == "length"
        finally:
            await registry.close()
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_router_settings_reject_inconsistent_discovery_flags(llama_dir):
    from pydantic import ValidationError

    from services.router.settings import RouterSettings

    with pytest.raises(ValidationError, match="needs --decode-service"):
        RouterSettings(model=llama_dir, discovery="kubernetes", namespace="ns")
    with pytest.raises(ValidationError, match="need --discovery dns or kubernetes"):
        RouterSettings(model=llama_dir, decode_service="tandem-decode")
    with pytest.raises(ValidationError, match="name the Services instead"):
        RouterSettings(model=llama_dir, discovery="dns", decode_service="d.ns.svc", decode=["a:1"])
    dns = RouterSettings(
        model=llama_dir, discovery="dns", decode_service="localhost", decode_port=7
    ).make_discovery()
    assert isinstance(dns, DnsDiscovery) and all(a.endswith(":7") for a in dns.addresses("decode"))
    k8s = RouterSettings(
        model=llama_dir,
        discovery="kubernetes",
        namespace="ns",
        prefill_service="p",
        decode_service="d",
    ).make_discovery()
    assert isinstance(k8s, KubernetesDiscovery) and k8s.services == {"prefill": "p", "decode": "d"}


class MutableDiscovery(StaticDiscovery):
    def set(self, role: str, addresses: list[str]) -> None:
        self._addresses[role] = list(addresses)


def test_a_pod_leaving_discovery_keeps_its_channel_while_this_router_has_requests_on_it(llama_dir):
    """A request that already chose a pod (e.g. waiting for decode admission before its prefill
    call) must find the pod's channel open even if the pod left discovery meanwhile."""
    from services.decode import server as decode_server
    from services.decode.settings import DecodeSettings
    from services.router.pods import PodRegistry
    from tandem.proto.decode.v1 import decode_pb2

    async def main():
        pod = await decode_server.start(
            DecodeSettings(model=llama_dir, host="127.0.0.1", port=0, num_kv_blocks=16)
        )
        address = f"127.0.0.1:{pod.port}"
        discovery = MutableDiscovery([], [address])
        registry = PodRegistry(discovery, interval_s=60, timeout_s=5)
        try:
            await registry.start()
            [chosen] = registry.by_role("decode")
            chosen.inflight = 1
            discovery.set("decode", [])
            await registry.refresh()
            assert registry.by_role("decode") == []  # no new request chooses it
            await chosen.stub.GetStats(
                decode_pb2.GetStatsRequest(), timeout=5
            )  # the chosen one still can call
            chosen.inflight = 0
            await registry.refresh()
            await asyncio.sleep(0.1)
            with pytest.raises(Exception, match="[Cc]hannel.*closed"):  # closed once idle
                await chosen.stub.GetStats(decode_pb2.GetStatsRequest(), timeout=5)
        finally:
            await registry.close()
            await pod.stop()

    asyncio.run(main())
