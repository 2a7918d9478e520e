"""What the prefill and decode pods share around their servicers: the engine core process and
its client, the gRPC server with health, the pod's identity and metrics, its GetStats answer
and its main.

A pod's server module describes its core (``CoreSpec``) and KV parts, then
``PodRuntime.create`` starts the core and binds the server, and ``PodRuntime.start`` serves; its
servicer answers ``GetStats`` with ``pod_stats`` and ends a request's stream with
``EngineCoreClient.end_stream``, which releases whatever the request still holds. If the core
process dies, the pod turns NOT_SERVING and its main exits non-zero (the orchestrator restarts
it).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tandem import telemetry
from tandem.api import cluster_auth, proto_convert
from tandem.api.channel_options import KV_MESSAGE_SLACK_BYTES, SMALL_MESSAGE_BYTES
from tandem.api.kv_events import KVEvent
from tandem.proto.common.v1 import common_pb2
from tandem.serving.engine_client import EngineCoreClient
from tandem.serving.engine_core import CoreSpec, EngineInfo
from tandem.serving.grpc_server import GrpcServer, RunningService
from tandem.serving.pod_metrics import PodMetrics
from tandem.serving.settings import PodSettings
from tandem.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_ROLES = {"prefill": common_pb2.POD_ROLE_PREFILL, "decode": common_pb2.POD_ROLE_DECODE}


class CoreExited(SystemExit):
    """The engine core process died: the pod's main ends with this (exit status 1)."""


@dataclass(slots=True)
class PodRuntime:
    """One pod's engine core (through its client), gRPC server, identity and metrics."""

    role: str
    core: EngineCoreClient
    server: GrpcServer
    identity: dict
    metrics: PodMetrics
    core_exited: asyncio.Event

    @classmethod
    async def create(
        cls,
        settings: PodSettings,
        spec: CoreSpec,
        *,
        detokenize: bool,
        before_release: Callable[[str], Awaitable[None]] | None = None,
        on_kv_events: Callable[[list[KVEvent]], None] | None = None,
    ) -> "PodRuntime":
        """Start the engine core (loads the model), bind the gRPC port and serve metrics;
        nothing is served until ``start``.

        Args:
            detokenize: turn the core's tokens into text here (decode pods).
            before_release, on_kv_events: the client's (see ``EngineCoreClient``).
        """
        role = spec.role
        # Before the model loads: a pod without its secret fails at once. Installed, the secret
        # reaches the engine core's KV sender too (through its environment).
        auth = settings.cluster_auth()
        cluster_auth.install(auth)
        core_exited = asyncio.Event()
        server: GrpcServer | None = None

        def on_core_exit(code: int | None) -> None:
            core_exited.set()
            if server is not None:  # readiness fails at once; the main then exits
                asyncio.ensure_future(server.set_not_serving())

        core = EngineCoreClient(
            spec,
            tokenizer=Tokenizer(settings.model) if detokenize else None,
            before_release=before_release,
            on_kv_events=on_kv_events,
            on_core_exit=on_core_exit,
        )
        info = await core.start()
        service = f"tandem.{role}.v1.{role.capitalize()}Service"
        try:
            server = GrpcServer(
                settings.host,
                settings.port,
                [service],
                auth=auth.check if auth.enabled else None,
                max_receive_message_length=max_receive_bytes(settings),
            )
        except BaseException:
            await core.stop()
            raise
        identity = settings.identity(info, _ROLES[role], settings.address(server.port))
        metrics = PodMetrics(
            core,
            model_name=settings.model_name(),
            role=role,
            cache_config=settings.cache_config_info(info),
        )
        if settings.metrics_port is not None:
            metrics.serve(settings.metrics_port)
        return cls(role, core, server, identity, metrics, core_exited)

    @property
    def info(self) -> EngineInfo:
        return self.core.info

    async def start(self, cleanups: list[Callable[[], None]], **parts) -> RunningService:
        """Serve (with the servicer already added to the server)."""
        await self.server.start()
        logger.info(
            "%s pod %s serving on port %d (engine core process %s)",
            self.role,
            self.identity["pod_id"],
            self.server.port,
            self.core.pid,
        )
        return RunningService(
            self.server,
            [*cleanups],
            async_cleanups=[self.core.stop],
            core=self.core,
            core_exited=self.core_exited,
            metrics=self.metrics,
            **parts,
        )


def max_receive_bytes(settings: PodSettings) -> int:
    """Largest gRPC message a pod accepts: a decode pod's KV chunk (``kv_max_chunk_bytes``)
    plus its header; a few MiB (prompts, stats) on a prefill pod."""
    chunk = getattr(settings, "kv_max_chunk_bytes", None)  # DecodeSettings only
    if chunk is None:
        return SMALL_MESSAGE_BYTES
    return max(chunk + KV_MESSAGE_SLACK_BYTES, SMALL_MESSAGE_BYTES)


def pod_stats(core: EngineCoreClient, identity: dict) -> common_pb2.PodStats:
    """The pod's load, cache and liveness now (GetStats of either pod)."""
    stats = proto_convert.pod_stats(core.stats, **identity)
    stats.engine_steps = core.steps
    stats.seconds_since_progress = core.seconds_since_progress
    return stats


async def serve_pod(
    role: str, settings: PodSettings, start: Callable[[PodSettings], Awaitable[RunningService]]
) -> None:
    """A pod's main: logging and tracing, start, serve until SIGTERM/SIGINT (then drain) or
    until the engine core dies (then exit 1)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    telemetry.setup_tracing(role, instance=settings.pod_id)
    service = await start(settings)
    died = await service.serve_until_signalled(
        settings.shutdown_grace_s, also_stop_on=service.parts["core_exited"]
    )
    if died:
        raise CoreExited(1)
