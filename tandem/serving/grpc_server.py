"""gRPC server set-up shared by the pods and kvstore: message limits, health, graceful stop,
and the check of every call's credentials (``MetadataCheck``)."""

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem import telemetry
from tandem.api.channel_options import GRPC_MAX_MESSAGE_BYTES, server_options

logger = logging.getLogger(__name__)


HEALTH_PREFIX = "/grpc.health.v1.Health/"
"""The standard health service: open to all (Kubernetes probes call it without credentials)."""

MetadataPredicate = Callable[[Sequence[tuple[str, str | bytes]]], bool]


class MetadataCheck(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED and before any handler runs, every call whose invocation
    metadata ``accepts`` says no to, on every method except the health service's.

    The call is answered by a handler of the same kind (unary or streaming on either side) that
    aborts at once: a refused client-streaming call (PushKV) is refused before any of its
    messages is read.
    """

    def __init__(self, accepts: MetadataPredicate, message: str) -> None:
        self._accepts = accepts
        self._message = message

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX) or self._accepts(
            handler_call_details.invocation_metadata or ()
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusing_handler(handler, self._message)


def _refusing_handler(handler, message: str) -> grpc.RpcMethodHandler:
    code = grpc.StatusCode.UNAUTHENTICATED

    async def refuse(request, context):
        await context.abort(code, message)

    async def refuse_streaming(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover (an async generator: a streaming response's handler)

    if handler is not None and handler.response_streaming:
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse_streaming)
        return grpc.unary_stream_rpc_method_handler(refuse_streaming)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class GrpcServer:
    """A grpc.aio server with the standard health service, serving once ``start`` returns.

    Args:
        auth: every call (but health checks) must satisfy it, else UNAUTHENTICATED; None: no
            check (the explicit ``--allow-unauthenticated``, or a router without API keys).
        tls: (certificate chain, private key), PEM: serve TLS instead of plain TCP.
        max_receive_message_length: largest request message accepted; a larger one gets
            RESOURCE_EXHAUSTED before it is read. Each server sets what its calls need (the
            router its HTTP body limit, a decode pod a KV chunk, the others a few MiB).
    """

    def __init__(
        self,
        host: str,
        port: int,
        service_names: list[str],
        *,
        auth: MetadataPredicate | None = None,
        auth_message: str = "missing or wrong cluster secret",
        tls: tuple[bytes, bytes] | None = None,
        max_receive_message_length: int = GRPC_MAX_MESSAGE_BYTES,
    ) -> None:
        # The credentials are checked first; a traced RPC then runs inside a SERVER span
        # continuing the caller's trace (when tracing is on).
        interceptors = [MetadataCheck(auth, auth_message)] if auth is not None else []
        self.server = grpc.aio.server(
            options=server_options(max_receive_message_length),
            interceptors=[*interceptors, *telemetry.server_interceptors()],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        self._stopping: asyncio.Future | None = None
        address = f"{host}:{port}"
        if tls is not None:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.server.add_secure_port(address, credentials)
        else:
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

    def begin_stop(self, grace: float = 5.0) -> asyncio.Future:
        """Start stopping (once; later calls return the same future): health turns NOT_SERVING,
        new calls get UNAVAILABLE (which clients retry elsewhere), calls in flight get up to
        ``grace`` seconds to finish."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        return self._stopping

    async def _stop(self, grace: float) -> None:
        await self.set_not_serving()
        await self.server.stop(grace)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop, or wait for the stop ``begin_stop`` started."""
        await self.begin_stop(grace)


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
