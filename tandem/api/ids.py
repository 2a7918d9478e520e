"""Distinct id types that must never be mixed up."""

from typing import NewType

RequestId = NewType("RequestId", str)
"""A request's id, unique within one engine (the router's request id in the services)."""

BlockId = NewType("BlockId", int)
"""Index of a physical KV block in one engine's pool."""

PodId = NewType("PodId", str)
"""A serving pod's stable name (Kubernetes pod name, or host:port locally)."""

BlockHash = NewType("BlockHash", bytes)
"""A 16-byte chained hash of a full block and every block before it (``tandem.api.hashing``)."""
