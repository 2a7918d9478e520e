"""gRPC server set-up shared by the pods and kvstore: message limits, health, graceful stop."""

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem.serving.channels import SERVER_OPTIONS

logger = logging.getLogger(__name__)


class GrpcServer:
    """A grpc.aio server with the standard health service, serving once ``start`` returns."""

    def __init__(self, host: str, port: int, service_names: list[str]) -> None:
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
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

    async def stop(self, grace: float = 5.0) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)



class RunningService:
    """A started service: its gRPC server plus what must be closed after it stops."""

    def __init__(self, server: GrpcServer, cleanups: list[Callable[[], None]], **parts) -> None:
        self.server = server
        self.port = server.port
        self._cleanups = cleanups
        self.parts = parts
        """Internals by name (engine, worker, ...), for tests and embedding."""

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
        for cleanup in self._cleanups:
            cleanup()

    async def serve_until_signalled(self) -> None:
        """Block until SIGINT/SIGTERM, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("shutting down")
        await self.stop()
