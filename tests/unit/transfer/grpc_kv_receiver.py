"""A decode pod's KV receiving path in one test process: a real gRPC server whose PushKV writes
into a ``KVReceiver`` over a pool of its own (or over the pools it is given: a tensor-parallel
pod's ranks)."""

import threading
import time
from concurrent import futures

import grpc
import torch

from tandem.api.errors import KVTransferError
from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
from tandem.proto.decode.v1 import decode_pb2
from tandem.transfer import codec
from tandem.transfer.receiver import KVReceiver


class GrpcKVReceiver:
    def __init__(
        self,
        spec: KVCacheSpec,
        fingerprint: str = "fp",
        delay_s: float = 0.0,
        max_chunk_bytes: int = 1024,
        num_blocks: int = 32,
        rank_pools: list[torch.Tensor] | None = None,
    ):
        """``spec``: the pages as they arrive (every kv head). ``rank_pools``: every rank's pool
        (rank 0 first) instead of one pool of ``spec``'s shape."""
        if rank_pools:
            self.pools = rank_pools
        else:
            self.pools = [PagedKVCache(spec, num_blocks, torch.device("cpu")).tensor]
        self.receiver = KVReceiver(
            self.pools[0],
            spec,
            fingerprint,
            max_chunk_bytes=max_chunk_bytes,
            rank_pools=self.pools[1:],
        )
        self.delay_s = delay_s
        self.reading = threading.Event()
        handler = grpc.stream_unary_rpc_method_handler(
            self.push_kv,
            request_deserializer=codec.decode,
            response_serializer=decode_pb2.PushKVResponse.SerializeToString,
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "tandem.decode.v1.DecodeService", {"PushKV": handler}
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def pool(self) -> torch.Tensor:
        """Rank 0's pool (the only one without tensor parallelism)."""
        return self.pools[0]

    def push_kv(self, request_iterator, context):
        self.reading.set()
        time.sleep(self.delay_s)
        n = 0
        try:
            for msg in request_iterator:
                if msg.chunk is not None:
                    self.receiver.write(msg.chunk, msg.data)
                    n += 1
                elif msg.end is not None:
                    self.receiver.complete(msg.end)
        except KVTransferError as e:
            context.abort(grpc.StatusCode.DATA_LOSS, str(e))
        return decode_pb2.PushKVResponse(chunks_received=n)

    def stop(self):
        self.server.stop(0)
