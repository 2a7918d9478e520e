"""KnownTargets: a prefill pod pushes KV only to decode pods discovery knows; a pod discovered a
moment later is accepted after one rate-limited lookup."""

import asyncio
import socket
import threading
import time

from tandem.serving.discovery import DnsDiscovery, KnownTargets, StaticDiscovery


class ChangingDiscovery:
    """What discovery saw (``seen``) lags what a fresh lookup finds (``source``)."""

    def __init__(self, seen=(), source=()):
        self.seen = list(seen)
        self.source = list(source)
        self.lookups: list[float] = []
        self.lock = threading.Lock()

    def addresses(self, role):
        assert role == "decode"
        return list(self.seen)

    def lookup(self, role):
        with self.lock:
            self.lookups.append(time.monotonic())
        time.sleep(0.02)  # a DNS query or an API call takes a moment
        return list(self.source)


def test_listed_targets_pass_without_a_lookup_and_others_are_refused():
    d = ChangingDiscovery(seen=["10.0.0.1:50052"], source=["10.0.0.1:50052"])
    targets = KnownTargets(d, min_lookup_interval_s=0.2)

    async def main():
        assert await targets.allows("10.0.0.1:50052")
        assert d.lookups == []
        assert not await targets.allows("evil.example:50052")
        assert not await targets.allows("10.0.0.1:50053")  # the port counts too
        assert not await targets.allows("10.0.0.1")

    asyncio.run(main())


def test_a_pod_discovered_a_moment_later_is_accepted_after_a_lookup():
    d = ChangingDiscovery(seen=[], source=["10.0.0.2:50052"])
    targets = KnownTargets(d, min_lookup_interval_s=0.2, lookup_ttl_s=0.5)

    async def main():
        assert await targets.allows("10.0.0.2:50052")
        assert len(d.lookups) == 1
        assert await targets.allows("10.0.0.2:50052")  # the lookup's answer is trusted a while
        assert len(d.lookups) == 1
        await asyncio.sleep(0.6)
        d.source = []  # the pod went away before discovery ever listed it
        assert not await targets.allows("10.0.0.2:50052")

    asyncio.run(main())


def test_a_flood_of_misses_costs_one_lookup_per_interval():
    d = ChangingDiscovery(seen=[], source=[])
    targets = KnownTargets(d, min_lookup_interval_s=0.3)

    async def main():
        started = time.monotonic()
        results = await asyncio.gather(*(targets.allows(f"10.9.9.{i}:1") for i in range(200)))
        first_wave = time.monotonic() - started
        assert not any(results) and len(d.lookups) == 1 and first_wave < 0.25
        # Misses arriving later wait for the next lookup, no sooner than the interval allows.
        d.source = ["10.0.0.3:50052"]
        assert await targets.allows("10.0.0.3:50052")
        results = await asyncio.gather(*(targets.allows(f"10.9.8.{i}:1") for i in range(50)))
        assert not any(results)
        gaps = [b - a for a, b in zip(d.lookups, d.lookups[1:], strict=False)]
        assert len(d.lookups) == 3 and all(g >= 0.29 for g in gaps), gaps

    asyncio.run(main())


def test_a_failing_lookup_refuses_and_recovers():
    class Failing(ChangingDiscovery):
        fail = True

        def lookup(self, role):
            if self.fail:
                raise OSError("API server unreachable")
            return super().lookup(role)

    d = Failing(seen=[], source=["10.0.0.4:50052"])
    targets = KnownTargets(d, min_lookup_interval_s=0.05)

    async def main():
        assert not await targets.allows("10.0.0.4:50052")
        d.fail = False
        assert await targets.allows("10.0.0.4:50052")

    asyncio.run(main())


def test_static_and_dns_discovery_look_up_afresh(monkeypatch):
    static = StaticDiscovery([], ["127.0.0.1:50052"])
    assert static.lookup("decode") == ["127.0.0.1:50052"]
    answers = [[], [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 50052))]]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers.pop(0))
    dns = DnsDiscovery({"decode": "tandem-decode"}, {"decode": 50052}, interval_s=3600)
    dns.refresh()
    assert dns.addresses("decode") == []
    assert asyncio.run(KnownTargets(dns).allows("10.0.0.5:50052"))  # a pod that just started
    assert dns.addresses("decode") == ["10.0.0.5:50052"]
