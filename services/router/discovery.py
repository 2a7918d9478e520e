"""Discovery: where the prefill and decode pods are, as they come and go.

Three implementations of one small interface:

- ``StaticDiscovery``: fixed addresses (``tandem up``, simple set-ups);
- ``DnsDiscovery``: the A records of headless Services, resolved on every refresh;
- ``KubernetesDiscovery``: EndpointSlices of the role's Service, listed then watched through
  the Kubernetes API (a thread per role), keeping only ready endpoints. Only ``get``, ``list``
  and ``watch`` on ``endpointslices`` are needed (the chart's Role grants exactly that).

The registry asks ``addresses()`` on every poll and opens or closes channels to match, so the
router follows scaling, rollouts and failures without a restart. Prefill pods never discover
decode pods themselves: the router names the decode target in each request.
"""

import logging
import socket
import threading
import time
from typing import Protocol

logger = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


class Discovery(Protocol):
    def start(self) -> None: ...

    def addresses(self, role: str) -> list[str]:
        """host:port of every pod of ``role`` ("prefill" or "decode") believed ready now."""
        ...

    def close(self) -> None: ...


class StaticDiscovery:
    def __init__(self, prefill: list[str], decode: list[str]) -> None:
        self._addresses = {"prefill": list(prefill), "decode": list(decode)}

    def start(self) -> None:
        pass

    def addresses(self, role: str) -> list[str]:
        return list(self._addresses[role])

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

    def close(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        for role, host in self.services.items():
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
