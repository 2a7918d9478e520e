"""Tandem's gRPC client SDK (sync and asyncio), against the router's RouterService.

    from tandem.sdk import Client

    with Client("localhost:50050") as client:
        result = client.generate("The capital of France is", max_tokens=16, temperature=0)
        for chunk in client.stream("Tell me a story", max_tokens=64):
            print(chunk.text, end="")

Errors are Tandem's exception classes (``tandem.api.errors``): ``InvalidRequest``,
``ModelNotFound``, ``CapacityExceeded``, ``UpstreamUnavailable``, ``DeadlineExceeded``, ... Calls
that fail with UNAVAILABLE before the first token are retried (``max_retries``, exponential
backoff).
"""

from tandem.sdk.client import AsyncClient, Client
from tandem.sdk.results import GenerateChunk, GenerateResult, ModelInfo, Usage

__all__ = ["AsyncClient", "Client", "GenerateChunk", "GenerateResult", "ModelInfo", "Usage"]
