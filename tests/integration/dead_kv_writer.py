"""A prefill pod's KV writer in a process of its own, for a test to kill mid-transfer.

``python dead_kv_writer.py ADDRESS REQUEST_ID TRANSFER_TOKEN TRANSPORT`` does what a prefill
pod's engine core does for a memory transport: maps the decode pod's pool (``DescribeKV``),
claims the reservation (``ClaimKV``), registers the transfer with a real ``KVSender`` (whose
``LeaseRenewer`` renews the write lease) and writes the first half of the blocks. Then it prints
``WRITING`` and waits, renewing, for the SIGKILL that never lets it send a notice.
"""

import sys
import time

import grpc
import torch

from tandem.api import cluster_auth
from tandem.api.channel_options import CLIENT_OPTIONS
from tandem.engine.kv_cache import KVCacheSpec
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc
from tandem.transfer.push_streams import KVTarget
from tandem.transfer.sender import KVSender
from tandem.transfer.transport import descriptor_decoder


def main(address: str, rid: str, token: str, transport: str) -> None:
    channel = cluster_auth.channel(address, CLIENT_OPTIONS)
    stub = decode_pb2_grpc.DecodeServiceStub(channel)
    offer = stub.DescribeKV(decode_pb2.DescribeKVRequest(), timeout=10)
    (descriptor,) = [
        descriptor_decoder.decode(p.descriptor) for p in offer.pools if p.transport == transport
    ]
    claim = stub.ClaimKV(
        decode_pb2.ClaimKVRequest(
            request_id=rid, transfer_token=token, transport=transport, renews=True
        ),
        timeout=10,
    )
    layers, _, blocks, block_size, heads, head_dim = descriptor.shape
    dtype = getattr(torch, descriptor.dtype)
    spec = KVCacheSpec(
        num_layers=layers, num_kv_heads=heads, head_dim=head_dim, block_size=block_size,
        dtype=dtype,
    )  # fmt: skip
    # cuda-ipc copies from a GPU pool; the others from host memory.
    device = torch.device("cuda" if transport == "cuda-ipc" else "cpu")
    pool = torch.randn(descriptor.shape).to(dtype).to(device)  # garbage: never read as KV
    sender = KVSender(spec, "fp", device=device)
    sender.attach_pool(pool)
    target = KVTarget(
        address, rid, claim.first_block, "fp", transfer_token=token, transport=transport,
        descriptor=descriptor, block_ids=tuple(claim.block_ids),
        lease_expires_unix_ms=claim.lease_expires_unix_ms, incarnation=offer.incarnation,
    )  # fmt: skip
    n = len(claim.block_ids)
    transfer = sender.start(rid, target, n * block_size)
    half = max(claim.first_block + 1, n // 2)
    src_ids = list(range(1, n + 1))
    transfer.write(pool, src_ids, (0, layers), claim.first_block, half)
    transfer.writer.flush()
    assert transfer.error is None, transfer.error
    print("WRITING", flush=True)
    while not transfer.failed:
        time.sleep(0.05)
    print(f"stopped: {transfer.error}", flush=True)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:5])
    except grpc.RpcError as e:
        print(f"failed: {e.code().name}: {e.details()}", flush=True)
        sys.exit(1)
