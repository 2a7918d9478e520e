"""The router's view of the GPU pods: channels, stubs, health and load, refreshed by polling.

Each pod is polled with ``GetStats`` every ``stats_interval_s``; a pod that fails or misses the
deadline is unhealthy until it answers again. Between polls the router counts its own requests
in flight on each pod, so a burst does not pile onto the pod that looked idle at the last poll.
"""

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc
from tandem.proto.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from tandem.serving.channels import CLIENT_OPTIONS

logger = logging.getLogger(__name__)


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
    channel = grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
    stub = (prefill_pb2_grpc.PrefillServiceStub if role == "prefill" else decode_pb2_grpc.DecodeServiceStub)(channel)
    return Pod(address, role, channel, stub)


class PodRegistry:
    """The pods this router sends to, their health and load (polled; see the module docstring)."""

    def __init__(
        self, prefill: list[str], decode: list[str], *, interval_s: float, timeout_s: float, stall_timeout_s: float = 60.0
    ) -> None:
        self._addresses = [(a, "prefill") for a in prefill] + [(a, "decode") for a in decode]
        self.pods: list[Pod] = []
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._task: asyncio.Task | None = None

    def by_role(self, role: str, *, healthy: bool = True) -> list[Pod]:
        return [p for p in self.pods if p.role == role and (p.healthy or not healthy)]

    async def start(self) -> None:
        """Open channels (on the running loop: aio channels are bound to it) and poll once."""
        self.pods = [_make_pod(address, role) for address, role in self._addresses]
        await self.refresh()
        self._task = asyncio.create_task(self._poll(), name="pod-stats")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for pod in self.pods:
            await pod.channel.close()

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh(p) for p in self.pods))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def _refresh(self, pod: Pod) -> None:
        request = prefill_pb2.GetStatsRequest() if pod.role == "prefill" else decode_pb2.GetStatsRequest()
        try:
            response = await pod.stub.GetStats(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
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
