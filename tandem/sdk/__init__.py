"""Tandem's gRPC client SDK (sync and asyncio), against the router's RouterService.

    from tandem.sdk import Client

    with Client("localhost:50050") as client:
        result = client.generate("The capital of France is", max_tokens=16, temperature=0)
        for chunk in client.stream("Tell me a story", max_tokens=64):
            print(chunk.text, end="")
        reply = client.chat([{"role": "user", "content": "Hello!"}], max_tokens=32)
        for chunk in client.chat_stream([{"role": "user", "content": "Hi"}], max_tokens=32):
            print(chunk.text, end="")
        texts = [c.text for c in client.generate("Once", n=3, max_tokens=8).choices]
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]
        reply = client.chat(messages, tools=tools, tool_choice="required", max_tokens=64)
        for call in reply.tool_calls:  # reply.finish_reason == "tool_calls"
            print(call.id, call.name, json.loads(call.arguments))

Errors are Tandem's exception classes (``tandem.api.errors``): ``InvalidRequest``,
``ModelNotFound``, ``CapacityExceeded``, ``UpstreamUnavailable``, ``DeadlineExceeded``, ... Calls
that fail with UNAVAILABLE before the first token are retried (``max_retries``, exponential
backoff).
"""

from tandem.sdk.client import AsyncClient, Client
from tandem.sdk.results import (
    Choice,
    GenerateChunk,
    GenerateResult,
    ModelInfo,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = [
    "AsyncClient",
    "Choice",
    "Client",
    "GenerateChunk",
    "GenerateResult",
    "ModelInfo",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
]
