"""KV page transfer throughput: Tandem's gRPC path against a raw TCP socket, same processes, \
same run.

The sender (this process) holds a paged KV cache shaped like a real model's and pushes one
prompt's pages with the production ``KVSender`` (layer-group gathers, host staging, chunking,
parallel PushKV streams, end message); a receiver process validates and writes them with the
production ``KVReceiver``. Then the same bytes go over one raw TCP socket between the same two
processes. Throughput counts KV bytes moved per second of wall time (first gather to the
receiver's acknowledgement); the receiver checks every transferred page against the source.

    python bench/kv_transfer.py                      # CPU: small shapes
    python bench/kv_transfer.py --device cuda --shapes llama-3.2-1b llama-3.1-8b --tokens 1024 8192
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

SHAPES = {
    # name: (layers, kv_heads, head_dim)
    "llama-3.2-1b": (16, 8, 64),
    "llama-3.1-8b": (32, 8, 128),
    "tiny": (4, 2, 32),
}
BLOCK = 16


@dataclass(frozen=True)
class Case:
    shape: str
    tokens: int
    dtype: str

    @property
    def num_blocks(self) -> int:
        return -(-self.tokens // BLOCK)


def kv_source(case: Case, device: str, seed: int = 0):
    """The sender's KV pool (request blocks are 0..n-1 in a shuffled order), reproducible."""
    import torch

    layers, heads, dim = SHAPES[case.shape]
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(seed)
    kv = (
        torch.randn((layers, 2, case.num_blocks, BLOCK, heads, dim), generator=g)
        .to(dtype)
        .to(device)
    )
    block_ids = torch.randperm(case.num_blocks, generator=g).tolist()
    return kv, block_ids


# ---- receiver process ---------------------------------------------------------------------------


def receiver_main(case: Case) -> None:
    """Serve PushKV (production KVReceiver) and a raw socket; print their ports; run forever."""
    import asyncio
    import threading

    import grpc
    import torch

    from tandem.api.channel_options import SERVER_OPTIONS
    from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
    from tandem.proto.decode.v1 import decode_pb2
    from tandem.transfer import codec
    from tandem.transfer.receiver import KVReceiver

    layers, heads, dim = SHAPES[case.shape]
    spec = KVCacheSpec(layers, heads, dim, BLOCK, getattr(torch, case.dtype))
    cache = PagedKVCache(spec, case.num_blocks, torch.device("cpu"))
    receiver = KVReceiver(cache.tensor, cache.spec, "bench")
    source, sender_blocks = kv_source(case, "cpu")
    # The receiver's block i gets the sender's i-th request block.
    expected = source[:, :, sender_blocks]
    completed = [0]

    async def push_kv(request_iterator, context):
        loop = asyncio.get_running_loop()
        n = 0
        async for msg in request_iterator:
            if msg.chunk is not None:
                if not receiver.expects(msg.chunk.request_id):
                    receiver.expect(msg.chunk.request_id, list(range(case.num_blocks)), 0)
                await loop.run_in_executor(None, receiver.write, msg.chunk, msg.data)
                n += 1
            else:
                await loop.run_in_executor(None, receiver.complete, msg.end)
                completed[0] += 1
                # Check every page of the first (warm-up) transfer; timed ones stay untouched.
                if completed[0] == 1 and not torch.equal(
                    cache.tensor[:, :, : case.num_blocks], expected
                ):
                    await context.abort(grpc.StatusCode.DATA_LOSS, "pages differ from the source")
        return decode_pb2.PushKVResponse(chunks_received=n)

    def raw_server(sock: socket.socket) -> None:
        buf = bytearray(64 << 20)
        while True:
            conn, _ = sock.accept()
            with conn:
                total = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "little")
                view, got = memoryview(buf), 0
                while got < total:
                    got += conn.recv_into(view, min(len(buf), total - got))
                conn.sendall(b"k")

    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen()
    threading.Thread(target=raw_server, args=(raw,), daemon=True).start()

    async def serve():
        server = grpc.aio.server(options=SERVER_OPTIONS)
        handler = grpc.stream_unary_rpc_method_handler(
            push_kv,
            request_deserializer=codec.decode,
            response_serializer=decode_pb2.PushKVResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "tandem.decode.v1.DecodeService", {"PushKV": handler}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(json.dumps({"grpc": port, "raw": raw.getsockname()[1]}), flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


# ---- sender side ---------------------------------------------------------------------------------


def make_sender(case: Case, kv, streams: int, group: int, chunk: int, device: str):
    """One long-lived sender per configuration, as a prefill pod has (warm channels and pinned
    buffers)."""
    import torch

    from tandem.engine.kv_cache import KVCacheSpec
    from tandem.transfer.sender import KVSender

    layers, heads, dim = SHAPES[case.shape]
    spec = KVCacheSpec(layers, heads, dim, BLOCK, kv.dtype)
    return KVSender(
        spec,
        "bench",
        layers_per_group=group,
        max_chunk_bytes=chunk,
        num_streams=streams,
        device=torch.device(device),
    )


def grpc_transfer(sender, case: Case, address: str, kv, block_ids, device) -> float:
    import torch

    from tandem.api.sampling_params import SamplingParams
    from tandem.engine.scheduler import ScheduledSequence
    from tandem.engine.sequence import Sequence
    from tandem.proto.common.v1 import common_pb2
    from tandem.transfer.push_streams import KVTarget

    layers = SHAPES[case.shape][0]
    seq = Sequence(
        "r", [0] * case.tokens, SamplingParams(max_tokens=1), arrival_time=0.0, arrival_index=0
    )
    scheduled = [ScheduledSequence(seq, 0, case.tokens, block_ids, True)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    sender.start("r", KVTarget(address, "r", 0, "bench"), case.tokens)
    for n in range(1, layers + 1):
        sender.on_layers_computed(scheduled, n, kv)
    future = sender.finish(
        "r", common_pb2.KVTransferEnd(request_id="r", model_fingerprint="bench", first_token_id=1)
    )
    result = future.result()  # raises if the receiver refused anything (or found pages differ)
    elapsed = time.perf_counter() - start
    assert result.bytes == kv.numel() * kv.element_size()
    return elapsed


def raw_transfer(address: str, payload: bytes) -> float:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        s.sendall(len(payload).to_bytes(8, "little"))
        s.sendall(payload)
        assert s.recv(1) == b"k"
        return time.perf_counter() - start


def run_case(case: Case, args) -> list[dict]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--receiver", json.dumps(case.__dict__)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ports = json.loads(proc.stdout.readline())
        kv, block_ids = kv_source(case, args.device)
        host_bytes = kv.cpu().contiguous().view(__import__("torch").uint8).numpy().tobytes()
        gb = len(host_bytes) / 1e9
        rows = []
        raw_times = [
            raw_transfer(f"127.0.0.1:{ports['raw']}", host_bytes) for _ in range(args.repeats + 1)
        ][1:]
        raw_gbs = gb / statistics.median(raw_times)
        for streams in args.streams:
            sender = make_sender(
                case, kv, streams, args.layers_per_group, args.chunk_bytes, args.device
            )
            times = []
            for _ in range(args.repeats + 1):  # the first is a warm-up (and checked page by page)
                times.append(
                    grpc_transfer(
                        sender, case, f"127.0.0.1:{ports['grpc']}", kv, block_ids, args.device
                    )
                )
            sender.close()
            grpc_gbs = gb / statistics.median(times[1:])
            rows.append(
                {
                    "shape": case.shape,
                    "tokens": case.tokens,
                    "dtype": case.dtype,
                    "bytes": len(host_bytes),
                    "streams": streams,
                    "grpc_gb_s": grpc_gbs,
                    "raw_tcp_gb_s": raw_gbs,
                    "ratio": grpc_gbs / raw_gbs,
                    "grpc_seconds": statistics.median(times[1:]),
                    "raw_seconds": statistics.median(raw_times),
                }
            )
        return rows
    finally:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--receiver", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--layers-per-group", type=int, default=4)
    ap.add_argument("--chunk-bytes", type=int, default=4 << 20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.receiver:
        receiver_main(Case(**json.loads(args.receiver)))
        return
    gpu = args.device.startswith("cuda")
    shapes = args.shapes or ["llama-3.2-1b", "llama-3.1-8b"]
    tokens = args.tokens or ([1024, 8192] if gpu else [1024])
    rows = []
    for shape in shapes:
        for n in tokens:
            rows += run_case(Case(shape, n, args.dtype), args)
    payload = {
        "workload": "W0 KV transfer",
        "device": args.device,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    path = write_result("kv_transfer", args.device, payload, args.out_dir)
    print_table(
        ["shape", "tokens", "MiB", "streams", "gRPC GB/s", "raw TCP GB/s", "gRPC/raw"],
        [
            [
                r["shape"],
                r["tokens"],
                r["bytes"] / 2**20,
                r["streams"],
                r["grpc_gb_s"],
                r["raw_tcp_gb_s"],
                r["ratio"],
            ]
            for r in rows
        ],
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
