"""Run the router under uvicorn (HTTP) with its gRPC server on the same event loop."""

import logging
import sys

import uvicorn

from services.router.app import create_app
from services.router.drain import DrainGate, DrainingServer
from services.router.http_connections import ConnectionLimits, bounded_http_protocol
from services.router.settings import RouterSettings
from tandem import telemetry


def serve(settings: RouterSettings) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    telemetry.setup_tracing("router", starts_traces=True)
    app = create_app(settings)
    # On SIGTERM the router drains (services/router/drain.py): it keeps listening and answers new
    # HTTP requests 503 while those in flight finish (up to the grace), then the lifespan stops
    # the gRPC server with the same grace.
    # uvloop's event loop and httptools' HTTP parser: the router's per-request work is mostly
    # this I/O (the gRPC server runs on the same loop). The parser's protocol adds a header read
    # timeout and a cap on connections (services/router/http_connections.py).
    gate: DrainGate = app.state.drain_gate  # a middleware inside the app (create_app)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=bounded_http_protocol(
            ConnectionLimits(
                header_read_timeout_s=settings.header_read_timeout_s,
                max_connections=settings.max_connections,
                retry_after_s=settings.retry_after_s,
            )
        ),
        log_level="warning",
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        ssl_certfile=settings.tls_certfile,  # HTTPS when given (the gRPC server uses them too)
        ssl_keyfile=settings.tls_keyfile,
    )

    async def drain_grpc() -> None:  # the RouterService stops taking calls with the HTTP side
        grpc_server = getattr(app.state, "grpc_server", None)
        if grpc_server is not None:
            grpc_server.begin_stop(settings.shutdown_grace_s)

    server = DrainingServer(config, gate, settings.shutdown_grace_s, on_drain=drain_grpc)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the app failed to start
