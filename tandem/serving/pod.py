"""What the prefill and decode pods share around their servicers: the engine on its worker, the
gRPC server with health, the pod's identity and metrics, its GetStats answer and its main.

A pod's own server module builds its engine and KV parts, then ``PodRuntime.start`` does the
rest; its servicer answers ``GetStats`` with ``pod_stats`` and ends a request's stream with
``EngineWorker.end_stream``, which releases whatever the request still holds.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tandem import telemetry
from tandem.api import proto_convert
from tandem.engine.llm_engine import LLMEngine
from tandem.proto.common.v1 import common_pb2
from tandem.serving.engine_worker import EngineWorker
from tandem.serving.grpc_server import GrpcServer, RunningService
from tandem.serving.pod_metrics import PodMetrics
from tandem.serving.settings import PodSettings

logger = logging.getLogger(__name__)

_ROLES = {"prefill": common_pb2.POD_ROLE_PREFILL, "decode": common_pb2.POD_ROLE_DECODE}


@dataclass(slots=True)
class PodRuntime:
    """One pod's engine worker, gRPC server, identity (PodStats fields) and metrics."""

    role: str
    worker: EngineWorker
    server: GrpcServer
    identity: dict
    metrics: PodMetrics

    @classmethod
    def create(
        cls,
        role: str,
        settings: PodSettings,
        engine: LLMEngine,
        *,
        after_step: Callable[[LLMEngine], None] | None = None,
        release: Callable[[LLMEngine, str], None] | None = None,
    ) -> "PodRuntime":
        """Bind the gRPC port and serve metrics; nothing runs until ``start``.

        Args:
            after_step, release: the worker's (see ``EngineWorker``).
        """
        worker = EngineWorker(
            engine, asyncio.get_running_loop(), after_step=after_step, release=release
        )
        service = f"tandem.{role}.v1.{role.capitalize()}Service"
        server = GrpcServer(settings.host, settings.port, [service])
        identity = settings.identity(engine, _ROLES[role], settings.address(server.port))
        metrics = PodMetrics(
            worker,
            model_name=settings.model_name(),
            role=role,
            cache_config=settings.cache_config_info(engine),
        )
        if settings.metrics_port is not None:
            metrics.serve(settings.metrics_port)
        return cls(role, worker, server, identity, metrics)

    @property
    def engine(self) -> LLMEngine:
        return self.worker.engine

    async def start(self, cleanups: list[Callable[[], None]], **parts) -> RunningService:
        """Start the engine thread and the server (with the servicer already added to it)."""
        self.worker.start()
        await self.server.start()
        logger.info(
            "%s pod %s serving on port %d", self.role, self.identity["pod_id"], self.server.port
        )
        return RunningService(
            self.server,
            [self.worker.stop, *cleanups],
            engine=self.engine,
            worker=self.worker,
            metrics=self.metrics,
            **parts,
        )


def pod_stats(worker: EngineWorker, identity: dict) -> common_pb2.PodStats:
    """The pod's load, cache and liveness now (GetStats of either pod)."""
    stats = proto_convert.pod_stats(worker.stats, **identity)
    stats.engine_steps = worker.steps
    stats.seconds_since_progress = worker.seconds_since_progress
    return stats


async def serve_pod(
    role: str, settings: PodSettings, start: Callable[[PodSettings], Awaitable[RunningService]]
) -> None:
    """A pod's main: logging and tracing, start, serve until SIGTERM/SIGINT, then drain."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    telemetry.setup_tracing(role, instance=settings.pod_id)
    service = await start(settings)
    await service.serve_until_signalled(settings.shutdown_grace_s)
