"""Run the router under uvicorn (HTTP) with its gRPC server on the same event loop."""

import logging

import uvicorn

from services.router.app import create_app
from services.router.settings import RouterSettings
from tandem import telemetry


def serve(settings: RouterSettings) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    telemetry.setup_tracing("router", starts_traces=True)
    app = create_app(settings)
    # On SIGTERM uvicorn stops accepting and lets HTTP streams in flight finish (up to the grace),
    # then the lifespan stops the gRPC server with the same grace.
    # uvloop's event loop and httptools' HTTP parser: the router's per-request work is mostly
    # this I/O (the gRPC server runs on the same loop).
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
