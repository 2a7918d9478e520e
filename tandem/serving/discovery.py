"""Discovery: where the prefill and decode pods are, as they come and go.

Three implementations of one small interface:

- ``StaticDiscovery``: fixed addresses (``tandem up``, simple set-ups);
- ``DnsDiscovery``: the A records of headless Services, resolved on every refresh;
- ``KubernetesDiscovery``: EndpointSlices of the role's Service, listed then watched through
  the Kubernetes API (a thread per role), keeping only ready endpoints. Only ``get``, ``list``
  and ``watch`` on ``endpointslices`` are needed (the chart's Role grants exactly that).

The router asks ``addresses()`` on every poll and opens or closes channels to match, so it
follows scaling, rollouts and failures without a restart. Prefill pods discover the decode pods
the same way, for one purpose only: ``KnownTargets`` refuses to push KV to an address that is
not one of them (least authority: a Prefill request cannot point a prefill pod at an arbitrary
``host:port``). Both sides must configure discovery alike, since addresses are compared as
strings: the router names decode pods by the address its discovery gave.
"""

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Literal, Protocol

logger = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


class Discovery(Protocol):
    def start(self) -> None: ...

    def addresses(self, role: str) -> list[str]:
        """host:port of every pod of ``role`` ("prefill" or "decode") believed ready now."""
        ...

    def lookup(self, role: str) -> list[str]:
        """Like ``addresses``, but asked of the source now rather than from what was last
        seen (blocking: a DNS query, an API call). For a miss that may be a pod just started."""
        ...

    def close(self) -> None: ...


class StaticDiscovery:
    def __init__(self, prefill: list[str], decode: list[str]) -> None:
        self._addresses = {"prefill": list(prefill), "decode": list(decode)}

    def start(self) -> None:
        pass

    def addresses(self, role: str) -> list[str]:
        return list(self._addresses[role])

    def lookup(self, role: str) -> list[str]:
        return self.addresses(role)

    def close(self) -> None:
        pass


class DnsDiscovery:
    """Pods of a headless Service: its DNS name resolves to one A/AAAA record per ready pod.

    Resolved on a background thread every ``interval_s`` (a slow resolver never stalls the
    router's event loop). A name that does not exist means no ready pod; any other resolver
    failure keeps the last answer rather than dropping every pod.
    """

    def __init__(
        self, services: dict[str, str], port: dict[str, int], interval_s: float = 1.0
    ) -> None:
        self.services = services
        self.port = port
        self.interval_s = interval_s
        self._found: dict[str, list[str]] = {role: [] for role in ROLES}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="discovery-dns", daemon=True)
        self._thread.start()

    def addresses(self, role: str) -> list[str]:
        return list(self._found[role])

    def lookup(self, role: str) -> list[str]:
        self.refresh(roles=(role,))
        return self.addresses(role)

    def close(self) -> None:
        self._stop.set()

    def refresh(self, roles: tuple[str, ...] = ROLES) -> None:
        for role, host in self.services.items():
            if role not in roles:
                continue
            try:
                infos = socket.getaddrinfo(host, self.port[role], type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                if e.errno in _NO_SUCH_NAME:
                    self._found[role] = []  # the Service has no ready pod (or does not exist)
                else:
                    logger.warning(
                        "resolving %s (%s pods): %s; keeping the last answer", host, role, e
                    )
                continue
            self._found[role] = sorted({join_host_port(info[4][0], info[4][1]) for info in infos})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()


_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class KubernetesDiscovery:
    """Ready endpoints of each role's Service, from EndpointSlices (list, then watch).

    Any API failure (an error status, a dropped connection, an expired resourceVersion) ends the
    watch; the thread re-lists after a backoff (capped at 30 s) and keeps following. In a
    dual-stack cluster a Service has an IPv4 and an IPv6 slice per set of pods; IPv4 addresses
    are used when there are any, so each pod is counted once.
    """

    def __init__(
        self,
        namespace: str,
        services: dict[str, str],
        port_name: str = "grpc",
        api_client=None,
        watch_timeout_s: int = 300,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.services = services
        self.port_name = port_name
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self._api_client = api_client
        self._slices: dict[str, dict[str, tuple[str, list[str]]]] = {role: {} for role in services}
        """role -> EndpointSlice name -> (addressType, ready host:port addresses)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listed = {role: threading.Event() for role in services}
        self._threads: list[threading.Thread] = []

    def start(self, wait_s: float = 5.0) -> None:
        """Start following; wait up to ``wait_s`` for the first list of every role (so the
        router's first poll already knows the pods), then carry on in the background."""
        from kubernetes import client, config

        if self._api_client is None:
            try:
                config.load_incluster_config()  # the pod's ServiceAccount
            except config.ConfigException:
                config.load_kube_config()  # a router run outside the cluster (development)
            self._api_client = client.ApiClient()
        self._api = client.DiscoveryV1Api(self._api_client)
        for role, service in self.services.items():
            t = threading.Thread(
                target=self._follow, args=(role, service), name=f"discovery-{role}", daemon=True
            )
            t.start()
            self._threads.append(t)
        deadline = time.monotonic() + wait_s
        for role, listed in self._listed.items():
            if not listed.wait(max(0.0, deadline - time.monotonic())):
                logger.warning("no EndpointSlice list of the %s Service yet; carrying on", role)

    def addresses(self, role: str) -> list[str]:
        with self._lock:
            slices = list(self._slices.get(role, {}).values())
        return self._pick(slices)

    def lookup(self, role: str) -> list[str]:
        """One list of the role's EndpointSlices now. Not stored: the watch stays the one
        writer of what ``addresses`` returns (a list could overwrite a newer watch event)."""
        service = self.services.get(role)
        if service is None or not hasattr(self, "_api"):
            return self.addresses(role)
        listed = self._api.list_namespaced_endpoint_slice(
            self.namespace,
            label_selector=f"kubernetes.io/service-name={service}",
            _request_timeout=self.request_timeout_s,
        )
        return self._pick([self._ready(s) for s in listed.items])

    @staticmethod
    def _pick(slices: list[tuple[str, list[str]]]) -> list[str]:
        for family in ("IPv4", "IPv6"):
            found = {a for kind, addrs in slices if kind == family for a in addrs}
            if found:
                return sorted(found)
        return []

    def close(self) -> None:
        self._stop.set()

    def _follow(self, role: str, service: str) -> None:
        from kubernetes import watch

        selector = f"kubernetes.io/service-name={service}"
        backoff = 1.0
        while not self._stop.is_set():
            try:
                listed = self._api.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=selector, _request_timeout=self.request_timeout_s
                )
                with self._lock:
                    self._slices[role] = {s.metadata.name: self._ready(s) for s in listed.items}
                self._listed[role].set()
                backoff = 1.0
                stream = watch.Watch().stream(
                    self._api.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=self.watch_timeout_s,
                    # The server ends the watch after timeout_seconds; a silent half-open
                    # connection is cut a little later by the client.
                    _request_timeout=(self.request_timeout_s, self.watch_timeout_s + 30),
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    self._apply(role, event["type"], event["object"])
            except (
                Exception
            ) as e:  # any failure (410 Gone, 5xx, dropped or timed-out connection): re-list
                logger.warning(
                    "discovery of %s pods (Service %s): %s; re-listing in %.0f s",
                    role,
                    service,
                    _short(e),
                    backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _apply(self, role: str, kind: str, obj) -> None:
        with self._lock:
            if kind == "DELETED":
                self._slices[role].pop(obj.metadata.name, None)
            elif kind in ("ADDED", "MODIFIED"):
                self._slices[role][obj.metadata.name] = self._ready(obj)

    def _ready(self, endpoint_slice) -> tuple[str, list[str]]:
        kind = endpoint_slice.address_type
        ports = [p.port for p in endpoint_slice.ports or () if p.name == self.port_name and p.port]
        if not ports or kind not in ("IPv4", "IPv6"):
            return kind, []
        out = []
        for ep in endpoint_slice.endpoints or ():
            conditions = ep.conditions
            ready = conditions is None or conditions.ready is None or conditions.ready
            terminating = conditions is not None and conditions.terminating
            if ready and not terminating:
                out += [join_host_port(address, ports[0]) for address in ep.addresses or ()]
        return kind, out


def join_host_port(host: str, port: int) -> str:
    """host:port, with IPv6 addresses in brackets (the form gRPC targets take)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}"


def wait_for(discovery: Discovery, role: str, count: int, timeout_s: float) -> list[str]:
    """Poll until ``count`` addresses of ``role`` are known (for start-up and tests)."""
    deadline = time.monotonic() + timeout_s
    while len(found := discovery.addresses(role)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{role} pods: found {found}, wanted {count}")
        time.sleep(0.05)
    return found


DiscoveryKind = Literal["static", "dns", "kubernetes"]


def make_discovery(
    kind: DiscoveryKind,
    *,
    static: dict[str, list[str]],
    services: dict[str, str],
    ports: dict[str, int],
    namespace: str | None = None,
    interval_s: float = 1.0,
) -> Discovery:
    """The discovery a service's settings describe (``services``: role -> Service name)."""
    if kind == "dns":
        return DnsDiscovery(services, ports, interval_s=interval_s)
    if kind == "kubernetes":
        return KubernetesDiscovery(namespace or own_namespace(), services)
    return StaticDiscovery(static.get("prefill", []), static.get("decode", []))


def own_namespace() -> str:
    """The namespace of the pod this process runs in (its ServiceAccount's)."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text().strip()
    except OSError:
        raise ValueError(
            f"--discovery kubernetes outside a pod needs --namespace ({path} is unreadable)"
        ) from None


class KnownTargets:
    """Is an address one of ``role``'s pods? (A prefill pod asks before pushing KV anywhere.)

    An address discovery does not list yet may be a pod that just started (the router's
    discovery saw it a moment earlier): a miss asks the source afresh (``Discovery.lookup``),
    at most once per ``min_lookup_interval_s``; misses meanwhile wait for that one lookup and
    share it, so a flood of forged targets costs one lookup a second, and a new pod is accepted
    within about that long. What a lookup found is trusted for ``lookup_ttl_s`` (until the
    discovery's own view catches up).
    """

    def __init__(
        self,
        discovery: Discovery,
        role: str = "decode",
        *,
        min_lookup_interval_s: float = 1.0,
        lookup_ttl_s: float = 30.0,
    ) -> None:
        self.discovery = discovery
        self.role = role
        self.min_lookup_interval_s = min_lookup_interval_s
        self.lookup_ttl_s = lookup_ttl_s
        self.lookups = 0
        """Lookups made so far (misses that asked the source)."""
        self._looked_up: frozenset[str] = frozenset()
        self._looked_up_at = float("-inf")
        self._last_lookup = float("-inf")
        """When the latest lookup started (the rate limit counts from there)."""
        self._pending: asyncio.Future | None = None

    def knows(self, address: str) -> bool:
        """Without asking anyone: listed now, or found by a recent lookup."""
        if address in self.discovery.addresses(self.role):
            return True
        fresh = time.monotonic() - self._looked_up_at < self.lookup_ttl_s
        return fresh and address in self._looked_up

    async def allows(self, address: str) -> bool:
        """``knows``, or found by the next lookup (which this call may wait for)."""
        if self.knows(address):
            return True
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._lookup())
        await asyncio.shield(self._pending)
        return self.knows(address)

    async def _lookup(self) -> None:
        wait = self._last_lookup + self.min_lookup_interval_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        # Misses from now on wait for the next lookup: this one may already be too old for them.
        self._pending = None
        self._last_lookup = time.monotonic()
        self.lookups += 1
        try:
            found = await asyncio.to_thread(self.discovery.lookup, self.role)
        except Exception as e:  # noqa: BLE001 - a failed lookup refuses, it does not crash
            logger.warning("looking up %s pods failed: %s", self.role, _short(e))
            return
        self._looked_up = frozenset(found)
        self._looked_up_at = time.monotonic()
