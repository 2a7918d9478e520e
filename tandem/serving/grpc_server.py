"""gRPC server set-up shared by the pods and kvstore: message limits, health, graceful stop."""

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem import telemetry
from tandem.api.channel_options import SERVER_OPTIONS

logger = logging.getLogger(__name__)


class GrpcServer:
    """A grpc.aio server with the standard health service, serving once ``start`` returns."""

    def __init__(self, host: str, port: int, service_names: list[str]) -> None:
        # A traced RPC runs inside a SERVER span continuing the caller's trace (when tracing is on).
        self.server = grpc.aio.server(
            options=SERVER_OPTIONS, interceptors=telemetry.server_interceptors()
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        address = f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")

    async def start(self) -> None:
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def set_not_serving(self) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        await self.set_not_serving()
        await self.server.stop(grace)


class RunningService:
    """A started service: its gRPC server plus what must be closed after it stops."""

    def __init__(
        self,
        server: GrpcServer,
        cleanups: list[Callable[[], None]],
        *,
        async_cleanups: list[Callable[[], Awaitable[None]]] = (),
        **parts,
    ) -> None:
        self.server = server
        self.port = server.port
        self._cleanups = list(cleanups)
        self._async_cleanups = list(async_cleanups)
        self.parts = parts
        """Internals by name (core, index, ...), for tests and embedding."""

    def on_stop(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` after the server stopped (after the ones given earlier)."""
        self._cleanups.append(cleanup)

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
        for cleanup in self._cleanups:
            cleanup()
        for cleanup in self._async_cleanups:
            await cleanup()

    async def drain(self, grace: float) -> None:
        """Shut down without cutting requests short (SIGTERM in a rollout).

        Health turns NOT_SERVING (readiness fails, the router stops choosing this pod) and new
        requests are refused with UNAVAILABLE (the router retries them elsewhere), but the server
        keeps serving: generations stream on and, on a decode pod, prefill pods can still push
        the KV pages of requests it already admitted. Once no request is in flight, or after
        ``grace`` seconds, the server stops.
        """
        core = self.parts.get("core")
        await self.server.set_not_serving()
        if core is not None:
            core.start_draining()
            deadline = asyncio.get_running_loop().time() + grace
            while core.open_streams and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            if core.open_streams:
                logger.warning(
                    "%d requests still in flight after %.0f s; stopping anyway",
                    core.open_streams,
                    grace,
                )
        await self.stop(1.0 if core is not None else grace)

    async def serve_until_signalled(
        self, grace: float = 5.0, *, also_stop_on: asyncio.Event | None = None
    ) -> bool:
        """Block until SIGINT/SIGTERM, then ``drain`` for up to ``grace`` seconds and stop.

        Args:
            also_stop_on: stop at once (no drain) when this is set (a pod's engine core died).

        Returns:
            Whether ``also_stop_on`` ended it.
        """
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signalled.set)
        waits = [asyncio.ensure_future(signalled.wait())]
        if also_stop_on is not None:
            waits.append(asyncio.ensure_future(also_stop_on.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if also_stop_on is not None and also_stop_on.is_set():
            logger.error("stopping: the engine core process is gone")
            await self.stop(1.0)
            return True
        logger.info("shutting down (up to %.0f s for requests in flight)", grace)
        await self.drain(grace)
        return False
