"""The router's kvstore client: a slow or absent kvstore costs one timeout, never a failed
request."""

import asyncio
import time

import grpc
import pytest

from services.local_cluster import free_port
from services.router.prefix_index import PrefixIndexClient
from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc


class SlowKVStore(kvstore_pb2_grpc.KVStoreServiceServicer):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.lookups = 0

    async def Lookup(self, request, context):
        self.lookups += 1
        await asyncio.sleep(self.delay_s)
        return kvstore_pb2.LookupResponse(
            matches=[kvstore_pb2.PodMatch(pod_id="p", num_blocks=len(request.block_hashes))]
        )


async def lookup_with(delay_s: float | None, timeout_s: float = 0.05):
    """(answer, seconds, lookups served) of one lookup against kvstore answering after ``delay_s``
    (None: nothing listens)."""
    server, servicer, address = None, None, f"127.0.0.1:{free_port()}"
    if delay_s is not None:
        servicer = SlowKVStore(delay_s)
        server = grpc.aio.server()
        kvstore_pb2_grpc.add_KVStoreServiceServicer_to_server(servicer, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
    client = PrefixIndexClient(address, timeout_s)
    await client.start()
    try:
        start = time.perf_counter()
        answer = await client.cached_tokens(list(range(64)), None, "fp", 16)
        return (
            answer,
            time.perf_counter() - start,
            client.failures,
            servicer.lookups if servicer else 0,
        )
    finally:
        await client.close()
        if server is not None:
            await server.stop(0)


def test_a_prompt_answer_counts_cached_tokens():
    answer, _, failures, lookups = asyncio.run(lookup_with(0.0, timeout_s=5.0))
    assert answer == {"p": 64} and failures == 0 and lookups == 1


@pytest.mark.parametrize("delay_s", [10.0, None], ids=["slow", "down"])
def test_a_slow_or_absent_kvstore_means_route_by_load_within_the_timeout(delay_s):
    answer, seconds, failures, _ = asyncio.run(lookup_with(delay_s, timeout_s=0.05))
    assert answer is None and failures == 1
    assert seconds < 5.0  # one 50 ms deadline (plus a loaded machine's slack), not the 10 s reply
