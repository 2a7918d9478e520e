"""The router's view of kvstore: which prefill pods cache how much of a prompt.

Hashes the prompt with the pods' own chained block hashes (``tandem.api.hashing``, seeded with
the model fingerprint the pods report) and asks kvstore in one call. kvstore is an optimisation,
never a dependency: any failure or a reply slower than ``timeout_s`` returns None and the
request is routed by load alone.
"""

import logging

import grpc

from tandem.api import cluster_auth
from tandem.api.channel_options import CLIENT_OPTIONS
from tandem.api.hashing import BlockHasher
from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc

logger = logging.getLogger(__name__)


class PrefixIndexClient:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub = None
        self._hashers: dict[tuple[str, int], BlockHasher] = {}
        self.failures = 0

    async def start(self) -> None:
        self._channel = cluster_auth.aio_channel(self.address, CLIENT_OPTIONS)
        self._stub = kvstore_pb2_grpc.KVStoreServiceStub(self._channel)
        # Connect now, not on the first lookup: a connection set up inside a request's lookup
        # would eat its small timeout, and that request would be routed by load alone.
        self._channel.get_state(try_to_connect=True)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def hasher(self, fingerprint: str, block_size: int) -> BlockHasher:
        key = (fingerprint, block_size)
        if key not in self._hashers:
            self._hashers[key] = BlockHasher(fingerprint, block_size)
        return self._hashers[key]

    async def cached_tokens(
        self,
        prompt: list[int],
        cache_salt: str | None,
        fingerprint: str,
        block_size: int,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> dict[str, int] | None:
        """pod_id -> prompt tokens cached there; None if kvstore did not answer in time."""
        hashes = self.hasher(fingerprint, block_size).hash_prompt(prompt, cache_salt)
        if not hashes:
            return {}
        try:
            resp = await self._stub.Lookup(
                kvstore_pb2.LookupRequest(model_fingerprint=fingerprint, block_hashes=hashes),
                timeout=self.timeout_s,
                metadata=metadata,
            )
        except grpc.RpcError as e:
            self.failures += 1
            logger.debug("kvstore lookup failed (%s): routing by load", e.code().name)
            return None
        return {m.pod_id: m.num_blocks * block_size for m in resp.matches}
