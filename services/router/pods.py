"""The router's view of the GPU pods: channels, stubs, health and load, refreshed by polling.

Each pod is polled with ``GetStats`` every ``stats_interval_s``; a pod that fails or misses the
deadline is unhealthy until it answers again. Between polls the router counts its own requests
in flight on each pod, so a burst does not pile onto the pod that looked idle at the last poll.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from services.router.discovery import Discovery
from tandem.api import cluster_auth
from tandem.api.channel_options import CLIENT_OPTIONS
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc
from tandem.proto.prefill.v1 import prefill_pb2, prefill_pb2_grpc

logger = logging.getLogger(__name__)

_BUSY_CODES = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""Stats-call failures that mean "overloaded", not "down" (see ``PodRegistry._refresh``)."""


@dataclass(eq=False)
class Pod:
    address: str
    role: str
    """"prefill" or "decode"."""
    channel: grpc.aio.Channel
    stub: object
    stats: common_pb2.PodStats | None = None
    healthy: bool = False
    inflight: int = 0
    """This router's requests currently on the pod."""
    started_tokens: int = 0
    """Prompt tokens of prefills this router started on the pod since its last stats."""
    finished_tokens: int = 0
    """Prompt tokens of prefills that finished on the pod since its last stats."""
    inflight_blocks: int = 0
    """KV blocks this router's admissions took since the last stats (decode pods)."""
    errors: int = field(default=0)

    @property
    def free_blocks(self) -> int:
        return (self.stats.num_free_blocks if self.stats else 0) - self.inflight_blocks

    @property
    def queued_tokens(self) -> int:
        """Prefill load: the last reported queue, corrected by this router's own prefills since.

        A prefill started after the poll is not in the report yet (add it); one that finished
        after the poll still is (take it off). Either way each is counted once.
        """
        polled = self.stats.num_queued_prefill_tokens if self.stats else 0
        return max(0, polled + self.started_tokens - self.finished_tokens)

    def prefill_started(self, tokens: int) -> None:
        self.started_tokens += tokens

    def prefill_finished(self, tokens: int) -> None:
        self.finished_tokens += tokens

    def mark_down(self, why: str) -> None:
        if self.healthy:
            logger.warning("%s pod %s marked down: %s", self.role, self.address, why)
        self.healthy = False
        self.errors += 1


def _make_pod(address: str, role: str) -> Pod:
    channel = cluster_auth.aio_channel(address, CLIENT_OPTIONS)
    stub = (
        prefill_pb2_grpc.PrefillServiceStub
        if role == "prefill"
        else decode_pb2_grpc.DecodeServiceStub
    )(channel)
    return Pod(address, role, channel, stub)


class PodRegistry:
    """The pods this router sends to, their health and load (polled; see the module docstring).

    The set of pods follows ``discovery`` at every poll: new pods get a channel; a vanished
    pod (scaled down, rolled, not ready) is retired: no new request chooses it, and its channel
    closes once this router has no request on it (or after ``drain_s``), so a rollout cuts no
    stream short and no request that already picked the pod finds its channel closed.
    """

    def __init__(
        self,
        discovery: Discovery,
        *,
        interval_s: float,
        timeout_s: float,
        stall_timeout_s: float = 60.0,
        drain_s: float = 600.0,
    ) -> None:
        self.discovery = discovery
        self.drain_s = drain_s
        self.pods: list[Pod] = []
        self._retired: dict[Pod, float] = {}
        """Pods that left discovery -> when they left; closed when idle or after drain_s."""
        self._closing: set[asyncio.Task] = set()
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._task: asyncio.Task | None = None

    def by_role(self, role: str, healthy: bool = True) -> list[Pod]:
        return [p for p in self.pods if p.role == role and (p.healthy or not healthy)]

    async def start(self) -> None:
        """Start discovery and poll once (channels open on the running loop: aio binds them)."""
        await asyncio.to_thread(self.discovery.start)
        await self.refresh()
        self._task = asyncio.create_task(self._poll(), name="pod-stats")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.discovery.close()
        for task in list(self._closing):
            task.cancel()
        for pod in [*self.pods, *self._retired]:
            await pod.channel.close()

    async def refresh(self) -> None:
        await self._reconcile()
        await asyncio.gather(*(self._refresh(p) for p in self.pods))

    async def _reconcile(self) -> None:
        wanted = {
            (a, role) for role in ("prefill", "decode") for a in self.discovery.addresses(role)
        }
        current = {(p.address, p.role): p for p in self.pods}
        now = time.monotonic()
        for key, pod in current.items():
            if key not in wanted:
                logger.info(
                    "%s pod %s left; finishing this router's %d requests on it",
                    pod.role,
                    pod.address,
                    pod.inflight,
                )
                self._retired[pod] = now
        kept = [p for key, p in current.items() if key in wanted]
        added = [_make_pod(address, role) for address, role in sorted(wanted - set(current))]
        for pod in added:
            logger.info("%s pod %s discovered", pod.role, pod.address)
        self.pods = kept + added
        for pod, since in list(self._retired.items()):
            if pod.inflight == 0 or now - since > self.drain_s:
                del self._retired[pod]
                # RPCs still running (a prefill finishing after its first token) get the grace.
                task = asyncio.create_task(
                    pod.channel.close(grace=self.drain_s), name=f"close-{pod.address}"
                )
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception:  # a discovery or stats bug must not end polling for good
                logger.exception("pod refresh failed; retrying in %.1f s", self.interval_s)

    async def _refresh(self, pod: Pod) -> None:
        request = (
            prefill_pb2.GetStatsRequest() if pod.role == "prefill" else decode_pb2.GetStatsRequest()
        )
        try:
            response = await pod.stub.GetStats(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() in _BUSY_CODES:
                # It answered, busy: a burst fills its gRPC queue and the server cancels (or
                # refuses) calls it cannot take in time. Not down: keep its health and last stats.
                logger.info(
                    "%s pod %s is busy: stats call %s", pod.role, pod.address, e.code().name
                )
                return
            pod.mark_down(f"{e.code().name}")
            return
        if response.stats.seconds_since_progress > self.stall_timeout_s:
            # It answers, but its engine has had work and made no progress: treat it as down.
            pod.stats = response.stats
            pod.mark_down(f"no engine progress for {response.stats.seconds_since_progress:.0f} s")
            return
        if not pod.healthy:
            logger.info("%s pod %s is up (%s)", pod.role, pod.address, response.stats.pod_id)
        pod.stats = response.stats
        pod.healthy = True
        pod.inflight_blocks = 0
        pod.started_tokens = pod.finished_tokens = 0
