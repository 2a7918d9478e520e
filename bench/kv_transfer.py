"""KV page transfer throughput: each KV transport against its physical baseline, same run.

The sender (this process) holds a paged KV cache shaped like a real model's and moves one
prompt's pages to a receiver process with each transport in ``--transports``; every transport is
measured against the fastest plain way of moving the same bytes, in the same run, and reported
as a ratio:

- ``grpc``: the production ``KVSender`` (layer-group gathers, host staging, chunking, parallel
  PushKV streams, end message) to a receiver process running the production ``KVReceiver``.
  Time: first gather to the receiver's acknowledgement, median of ``--repeats`` after a warm-up
  (the warm-up is checked page by page at the receiver). Baseline: the same bytes over one raw
  TCP socket between the same two processes.
- memory transports (``shm``, ``cuda-ipc``, ``nixl``; tandem/transfer/transport.py): a receiver
  process allocates a decode pool ``[layers, 2, blocks + 1, block_size, kv_heads, head_dim]``
  (``shm``: in a file under ``shm_dir()``; ``cuda-ipc``: on the GPU, exported by the process
  that allocated it), exports it and sends the ``PoolDescriptor`` over its stdout. This process
  maps it (``open_writer``) and, per transfer, writes the request's pages layer group by layer
  group (``--layers-per-group``, as production does) into freshly shuffled destination blocks,
  then flushes. Time: first write to ``flush`` (and, on a GPU, a device synchronize), median
  of ``--repeats`` after a warm-up. After every transfer (warm-up included) the receiver, which
  regenerates the source from the seed, checks every page and that the unowned scratch block is
  untouched; mismatches are counted, not raised. The shm writer maps every page of the pool on
  a background thread when it opens it (``ShmPoolWriter.populated``): timing starts once that
  is done, as in a pod that has served a while. For ``shm`` the receiver also serves the
  decode pod's control RPCs (``ClaimKV``, ``CompleteKV``; ``serve_control``): each transfer
  claims its lease, writes, and sends its completion notice; the row reports the writes (the
  data plane, the headline GB/s) and the whole (end to end) apart. Baselines, in this process:
  ``shm``: one ``copy_`` of a contiguous buffer of the same bytes, timed right before each
  transfer, warm (from the caches where it fits) and cold (caches emptied first), reported as
  medians like the transfers (``Memcpy``); ``cuda-ipc``: one
  device-to-device ``copy_`` of the same bytes on the same GPU (CUDA events); ``nixl``: raw TCP
  to its receiver process, as for grpc. The ``gather+scatter`` column is a tighter reference for
  the memory transports: the same per-layer-group ``index_select`` + ``index_copy_`` into a
  local pool in one process. Other baselines are the best of ``--repeats`` after a warm-up.

Transports not available here (``local_transports``) are listed as unavailable. The run exits
with status 1 if any transfer failed or any page differed (after printing and writing results).

    python bench/kv_transfer.py                      # CPU: small shapes, grpc + shm (+ nixl)
    python bench/kv_transfer.py --device cuda --shapes llama-3.2-1b llama-3.1-8b --tokens 1024 8192
    python bench/kv_transfer.py --device cuda --transports cuda-ipc grpc --streams 2
"""

import argparse
import fcntl
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
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
SEED = 0
ALL_TRANSPORTS = ("grpc", "shm", "cuda-ipc", "nixl")
MEMORY_TRANSPORTS = ("shm", "cuda-ipc", "nixl")
DEVICE_TRANSPORTS = {"cpu": ("grpc", "shm", "nixl"), "cuda": ("grpc", "cuda-ipc", "nixl")}
"""The transports measured by default on each device type (those available here)."""
BASELINE = {"grpc": "raw TCP", "nixl": "raw TCP", "shm": "memcpy", "cuda-ipc": "D2D copy"}


@dataclass(frozen=True)
class Case:
    shape: str
    tokens: int
    dtype: str

    @property
    def num_blocks(self) -> int:
        return -(-self.tokens // BLOCK)


def kv_source(case: Case, device: str, seed: int = SEED):
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


def destination_blocks(case: Case, transfer: int) -> list[int]:
    """Shuffled decode-pool blocks for one memory-transport transfer (a new order each time; the
    pool's last block, the scratch block no request owns, is never a destination)."""
    import torch

    g = torch.Generator().manual_seed(1_000 + transfer)
    return torch.randperm(case.num_blocks, generator=g).tolist()


def raw_server(sock: socket.socket) -> None:
    """Accept raw TCP transfers (8-byte length, payload) and acknowledge each with one byte."""
    buf = bytearray(64 << 20)
    while True:
        conn, _ = sock.accept()
        with conn:
            total = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "little")
            view, got = memoryview(buf), 0
            while got < total:
                got += conn.recv_into(view, min(len(buf), total - got))
            conn.sendall(b"k")


def start_raw_server() -> int:
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen()
    threading.Thread(target=raw_server, args=(raw,), daemon=True).start()
    return raw.getsockname()[1]


# ---- gRPC receiver process -----------------------------------------------------------------------


def receiver_main(case: Case) -> None:
    """Serve PushKV (production KVReceiver) and a raw socket; print their ports; then lease the
    blocks to one transfer per ``expect`` line on stdin (printing the lease's transfer token, as
    a decode pod's reservation returns it); exit when stdin closes."""
    import asyncio

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

    raw_port = start_raw_server()

    def leases() -> None:
        for line in sys.stdin:
            try:
                if json.loads(line).get("op") != "expect":
                    raise ValueError(f"unknown command {line.strip()!r}")
                if receiver.expects("r"):  # a failed transfer's reservation: drop it first
                    receiver.discard("r")
                lease = receiver.expect("r", list(range(case.num_blocks)), 0)
            except Exception as exc:
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
                continue
            print(json.dumps({"token": getattr(lease, "token", "")}), flush=True)
        os._exit(0)  # the sender is done (or gone)

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
        print(json.dumps({"grpc": port, "raw": raw_port}), flush=True)
        threading.Thread(target=leases, daemon=True).start()
        await server.wait_for_termination()

    asyncio.run(serve())


# ---- memory-transport receiver process -----------------------------------------------------------


def memory_receiver_main(spec: dict) -> None:
    """Allocate and export a decode pool for one memory transport, print its descriptor (and a
    raw TCP port), then answer commands from stdin (one JSON object a line) until it closes:
    ``clear`` zeroes the pool; ``verify`` checks a transfer's pages against the source."""
    import torch

    from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
    from tandem.transfer import transport as tr

    case, name, device = Case(**spec["case"]), spec["transport"], torch.device(spec["device"])
    layers, heads, dim = SHAPES[case.shape]
    dtype = getattr(torch, case.dtype)
    cuda = device.type == "cuda"

    def reply(**msg) -> None:
        print(json.dumps(msg), flush=True)

    path = None
    export = None
    try:
        try:
            if name == "shm":
                # As a decode pod's engine core does: the pool lives in a file others can map.
                path = os.path.join(tr.shm_dir(), f"tandem-kv-bench-{os.getpid()}")
                # Held while this process lives: decode pods starting meanwhile remove only pool
                # files nobody holds (services/decode/server.py: new_pool_path).
                lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                fcntl.flock(lock_fd, fcntl.LOCK_SH)
                cache = PagedKVCache(
                    KVCacheSpec(layers, heads, dim, BLOCK, dtype),
                    case.num_blocks,
                    torch.device("cpu"),
                    path=path,
                )
                pool = cache.tensor
                export = tr.export_pool(name, pool, path=path)
            else:
                shape = (layers, 2, case.num_blocks + 1, BLOCK, heads, dim)
                pool = torch.zeros(shape, dtype=dtype, device=device)
                if cuda:
                    torch.cuda.synchronize(device)
                export = tr.export_pool(name, pool)
            descriptor = tr.descriptor_encoder.encode(export.descriptor())
        except Exception as exc:  # reported by the sender as this transport's failure
            reply(error=f"{type(exc).__name__}: {exc}")
            return
        # The source to check against, made before answering: the sender's baselines then run
        # while this process is idle.
        source, src_ids = kv_source(case, spec["device"], spec["seed"])
        src = torch.tensor(src_ids, device=device)
        if cuda:
            torch.cuda.synchronize(device)
        control = {}
        if name == "shm":  # the decode pod's side of a transfer's control: leases, claim, notice
            from tandem.transfer.receiver import KVReceiver

            leases = KVReceiver(pool, KVCacheSpec(layers, heads, dim, BLOCK, dtype), "bench")
            control["control"] = serve_control(leases)
        reply(descriptor=descriptor.hex(), raw=start_raw_server(), **control)
        scratch = case.num_blocks
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "expect" and control:
                # The reservation (made before the prefill in a pod, so not timed): a failed
                # transfer's lease is dropped first.
                if leases.expects("r"):
                    leases.discard("r")
                    leases.end_drain("r")
                reply(token=leases.expect("r", cmd["dst_ids"], 0).token)
            elif cmd["op"] == "clear":
                pool.zero_()
                if cuda:
                    torch.cuda.synchronize(device)
                reply(ok=True)
            elif cmd["op"] == "verify":
                # The sender's flush returned before it asked, so every copy has landed.
                dst = torch.tensor(cmd["dst_ids"], device=device)
                bad = 0
                for layer in range(layers):  # a layer at a time: no pool-sized temporaries
                    got = pool[layer].index_select(1, dst)
                    want = source[layer].index_select(1, src)
                    bad += int((got != want).flatten(2).any(-1).sum())
                stray = int(pool[:, :, scratch].flatten(2).ne(0).any(-1).sum())
                reply(pages=layers * 2 * len(src_ids), mismatched=bad, stray=stray)
            else:
                reply(error=f"unknown op {cmd['op']!r}")
    finally:
        if export is not None:
            export.close()
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass


def serve_control(leases) -> int:
    """Serve ``DecodeService.ClaimKV`` and ``CompleteKV`` over ``leases`` (a ``KVReceiver``) as
    a decode pod does (services/decode/server.py: each on an executor thread), on a thread of
    its own; returns the port."""
    import asyncio
    import functools

    import grpc

    from tandem.api.channel_options import SERVER_OPTIONS
    from tandem.proto.decode.v1 import decode_pb2

    async def claim_kv(request, context):
        try:
            claim = await asyncio.get_running_loop().run_in_executor(
                None,
                functools.partial(leases.claim, renews=request.renews),
                request.request_id,
                request.transfer_token,
                request.transport,
            )
        except Exception as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return decode_pb2.ClaimKVResponse(
            lease_expires_unix_ms=claim.lease.expires_unix_ms,
            block_ids=claim.block_ids,
            first_block=claim.first_block,
        )

    async def complete_kv(request, context):
        try:
            summary = await asyncio.get_running_loop().run_in_executor(
                None, leases.complete_memory, request.end
            )
        except Exception as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return decode_pb2.CompleteKVResponse(bytes_received=summary.bytes)

    ready: queue.Queue = queue.Queue()

    async def serve():
        server = grpc.aio.server(options=SERVER_OPTIONS)
        methods = {
            "ClaimKV": (claim_kv, decode_pb2.ClaimKVRequest, decode_pb2.ClaimKVResponse),
            "CompleteKV": (
                complete_kv,
                decode_pb2.CompleteKVRequest,
                decode_pb2.CompleteKVResponse,
            ),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString,
            )
            for name, (fn, req, resp) in methods.items()
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("tandem.decode.v1.DecodeService", handlers),)
        )
        ready.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    return ready.get(timeout=60)


class ReceiverError(RuntimeError):
    pass


class Receiver:
    """A receiver process (this script with ``args``) and its JSON-lines pipe: commands on its
    stdin, answers on its stdout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                msg = None
            if isinstance(msg, dict):
                self._lines.put(msg)
            else:  # a library writing to stdout: not ours, pass it on
                sys.stderr.write(line)
        self._lines.put(None)

    def get(self, timeout: float) -> dict:
        try:
            msg = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ReceiverError(f"the receiver did not answer in {timeout:.0f} s") from None
        if msg is None:
            self._lines.put(None)
            raise ReceiverError(f"the receiver exited (status {self.proc.wait()})")
        if "error" in msg:
            raise ReceiverError(msg["error"])
        return msg

    def ask(self, timeout: float = 120, **cmd) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise ReceiverError(f"the receiver is gone: {exc}") from None
        return self.get(timeout)

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the receiver cleans up (unlinks its shm file) and exits
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


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


def grpc_transfer(sender, case: Case, address: str, token: str, kv, block_ids, device) -> float:
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
    lease = {"transfer_token": token} if token else {}  # (older receivers issue no tokens)
    target = KVTarget(address, "r", 0, "bench", **lease)
    end = common_pb2.KVTransferEnd(
        request_id="r", model_fingerprint="bench", first_token_id=1, **lease
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    sender.start("r", target, case.tokens)
    for n in range(1, layers + 1):
        sender.on_layers_computed(scheduled, n, kv)
    future = sender.finish("r", end)
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


def raw_tcp_gbs(port: int, payload: bytes, repeats: int) -> tuple[float, float]:
    """(GB/s, seconds) of the median raw TCP transfer of ``payload`` after one warm-up."""
    times = [raw_transfer(f"127.0.0.1:{port}", payload) for _ in range(repeats + 1)][1:]
    seconds = statistics.median(times)
    return len(payload) / 1e9 / seconds, seconds


def best_seconds(fn, repeats: int, device) -> float:
    """Best time of ``fn()`` over ``repeats`` runs after a warm-up: CUDA events on a GPU (then a
    synchronize), the wall clock on CPU."""
    import torch

    cuda = device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(max(repeats, 1)):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


def copy_seconds(kv, repeats: int) -> float:
    """One contiguous copy of ``kv``'s bytes within this process (on its device)."""
    import torch

    src = kv.reshape(-1)
    dst = torch.empty_like(src)
    return best_seconds(lambda: dst.copy_(src), repeats, kv.device)


def evict_bytes() -> int:
    """A scratch buffer's size that empties the caches when written: twice the largest cache
    level sysfs reports, between 256 MiB and 1 GiB."""
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
            largest = max(largest, int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}[size[-1]])
        except (OSError, ValueError, KeyError):
            continue
    return min(1 << 30, max(256 << 20, 2 * largest))


class Memcpy:
    """shm's baseline: one copy of the transfer's bytes in this process, timed right before
    each transfer (the same conditions on a busy host, the same statistic): ``warm`` after a
    copy of the same buffers, ``cold`` after writing a scratch buffer of ``evict_bytes`` (the
    caches emptied, as for a pool larger than the cache)."""

    def __init__(self, kv) -> None:
        import torch

        self.src = kv.reshape(-1)
        self.dst = torch.empty_like(self.src)
        self.evict_bytes = evict_bytes()
        self.scratch = torch.empty(self.evict_bytes, dtype=torch.uint8)
        self.warm: list[float] = []
        self.cold: list[float] = []

    def _copy(self) -> float:
        t0 = time.perf_counter()
        self.dst.copy_(self.src)
        return time.perf_counter() - t0

    def measure(self) -> None:
        self._copy()
        self.warm.append(self._copy())
        self.scratch.fill_(1)
        self.cold.append(self._copy())

    def close(self) -> None:
        self.src = self.dst = self.scratch = None


class Control:
    """The prefill pod's side of a memory transfer's control plane: ``ClaimKV`` before the
    first write, the one ``CompleteKV`` notice after the last (a decode pod's RPCs, served by
    the receiver process: ``serve_control``)."""

    def __init__(self, port: int) -> None:
        import grpc

        from tandem.proto.decode.v1 import decode_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = decode_pb2_grpc.DecodeServiceStub(self.channel)

    def claim(self, token: str) -> list[int]:
        from tandem.proto.decode.v1 import decode_pb2

        claim = self.stub.ClaimKV(
            decode_pb2.ClaimKVRequest(
                request_id="r", transfer_token=token, transport="shm", renews=True
            ),
            timeout=30,
        )
        return list(claim.block_ids[claim.first_block :])

    def complete(self, token: str, writes: int) -> None:
        from tandem.proto.common.v1 import common_pb2
        from tandem.proto.decode.v1 import decode_pb2

        end = common_pb2.KVTransferEnd(
            request_id="r",
            model_fingerprint="bench",
            first_token_id=1,
            transfer_token=token,
            transport="shm",
            total_chunks=writes,
        )
        self.stub.CompleteKV(decode_pb2.CompleteKVRequest(end=end), timeout=30)

    def close(self) -> None:
        self.channel.close()


def gather_scatter_seconds(kv, src_ids: list[int], dst_ids: list[int], group: int, repeats: int):
    """The memory transports' access pattern within this process: per layer group, gather the
    request's pages and scatter them into a local pool shaped like the receiver's."""
    import torch

    shape = list(kv.shape)
    shape[2] += 1
    pool = torch.zeros(shape, dtype=kv.dtype, device=kv.device)
    s = torch.tensor(src_ids, device=kv.device)
    d = torch.tensor(dst_ids, device=kv.device)
    layers = kv.shape[0]

    def once():
        for l0 in range(0, layers, group):
            l1 = min(l0 + group, layers)
            pool[l0:l1].index_copy_(2, d, kv[l0:l1].index_select(2, s))

    return best_seconds(once, repeats, kv.device)


def unavailable_reason(name: str, device_type: str) -> str | None:
    """None if ``name`` can run here, else why not."""
    from tandem.transfer import transport as tr

    if name in tr.local_transports(device_type):
        return None
    if name == "grpc":
        return "not listed by local_transports"
    try:
        reason = tr._module(name).unavailable(device_type)
    except Exception as exc:  # TransportUnavailable: not installed / not importable
        return str(exc)
    return reason or "not listed by local_transports"


def memory_transfer(writer, kv, src_ids: list[int], dst_ids: list[int], group: int) -> int:
    """Queue one request's pages layer group by layer group and wait for them (``flush``).
    Returns the bytes queued."""
    import torch

    s = torch.tensor(src_ids)
    d = torch.tensor(dst_ids)
    layers = kv.shape[0]
    queued = 0
    for l0 in range(0, layers, group):
        queued += writer.write(kv, s, (l0, min(l0 + group, layers)), d)
    writer.flush()
    return queued


def memory_row(case: Case, name: str, args, kv, src_ids: list[int], host_bytes) -> dict:
    """Measure one memory transport for one case (a fresh receiver process)."""
    import torch

    from tandem.transfer import transport as tr

    nbytes = kv.numel() * kv.element_size()
    cuda = kv.device.type == "cuda"
    row = {
        "transport": name,
        "shape": case.shape,
        "tokens": case.tokens,
        "dtype": case.dtype,
        "bytes": nbytes,
        "layers_per_group": args.layers_per_group,
        "baseline": BASELINE[name],
        "transfers": 0,
        "failed_transfers": 0,
        "mismatched_pages": 0,
        "stray_pages": 0,
        "errors": [],
    }
    spec = {"case": case.__dict__, "transport": name, "device": args.device, "seed": SEED}
    receiver = Receiver("--memory-receiver", json.dumps(spec))
    writer = None
    try:
        hello = receiver.get(timeout=180)
        descriptor = tr.descriptor_decoder.decode(bytes.fromhex(hello["descriptor"]))
        writer = tr.open_writer(descriptor, kv)
        populated = getattr(writer, "populated", None)
        if populated is not None:  # shm: the steady state of a pod, every page mapped once
            populated.wait(120)
        if name == "nixl":
            row["baseline_gb_s"], row["baseline_seconds"] = raw_tcp_gbs(
                hello["raw"], host_bytes(), args.repeats
            )
        elif name != "shm":
            row["baseline_seconds"] = copy_seconds(kv, args.repeats)
            row["baseline_gb_s"] = nbytes / 1e9 / row["baseline_seconds"]
        memcpy = None
        if name == "shm":  # the baseline is timed before each transfer instead (``Memcpy``)
            from tandem.transfer.shm_transport import copy_threads

            row["copy_threads"] = copy_threads()
            memcpy = Memcpy(kv)
            row["evict_bytes"] = memcpy.evict_bytes
        row["gather_scatter_seconds"] = gather_scatter_seconds(
            kv, src_ids, destination_blocks(case, 0), args.layers_per_group, args.repeats
        )
        row["gather_scatter_gb_s"] = nbytes / 1e9 / row["gather_scatter_seconds"]

        control = Control(hello["control"]) if "control" in hello else None
        times, ends = [], []
        for transfer in range(args.repeats + 1):  # the first is a warm-up (checked like the rest)
            dst_ids = destination_blocks(case, transfer)
            receiver.ask(op="clear")
            token = receiver.ask(op="expect", dst_ids=dst_ids)["token"] if control else None
            if memcpy is not None and transfer > 0:
                memcpy.measure()
            if cuda:
                torch.cuda.synchronize(kv.device)
            row["transfers"] += 1
            t0 = time.perf_counter()
            try:
                if control:  # the claim names the blocks to write, as in a pod
                    dst_ids = control.claim(token)
                start = time.perf_counter()
                queued = memory_transfer(writer, kv, src_ids, dst_ids, args.layers_per_group)
                if cuda:  # flush has waited for the copies; make sure nothing is left queued
                    torch.cuda.synchronize(kv.device)
                elapsed = time.perf_counter() - start
                if control:
                    control.complete(token, writes=-(-kv.shape[0] // args.layers_per_group))
                    if transfer > 0:
                        ends.append((start - t0, elapsed, time.perf_counter() - start - elapsed))
            except Exception as exc:  # KVTransferError or a transport bug: count it, go on
                row["failed_transfers"] += 1
                row["errors"].append(f"transfer {transfer}: {type(exc).__name__}: {exc}")
                continue
            check = receiver.ask(op="verify", dst_ids=dst_ids, timeout=600)
            failed = check["mismatched"] or check["stray"] or queued != nbytes
            row["mismatched_pages"] += check["mismatched"]
            row["stray_pages"] += check["stray"]
            if queued != nbytes:
                row["errors"].append(f"transfer {transfer}: {queued} bytes queued, not {nbytes}")
            if failed:
                row["failed_transfers"] += 1
            elif transfer > 0:
                times.append(elapsed)
        if (
            memcpy is not None and memcpy.warm
        ):  # medians, as the transfers', and the best, of the same runs
            row["baseline_seconds"] = statistics.median(memcpy.warm)
            row["baseline_gb_s"] = nbytes / 1e9 / row["baseline_seconds"]
            row["baseline_best_seconds"] = min(memcpy.warm)
            row["cold_memcpy_seconds"] = statistics.median(memcpy.cold)
            row["cold_memcpy_gb_s"] = nbytes / 1e9 / row["cold_memcpy_seconds"]
            row["cold_memcpy_best_seconds"] = min(memcpy.cold)
            memcpy.close()
        if times:
            row["seconds"] = statistics.median(times)
            row["best_seconds"] = min(times)
            row["gb_s"] = nbytes / 1e9 / row["seconds"]
            row["ratio"] = row["gb_s"] / row["baseline_gb_s"]
            if "cold_memcpy_gb_s" in row:
                row["ratio_cold"] = row["gb_s"] / row["cold_memcpy_gb_s"]
                row["ratio_best"] = row["baseline_best_seconds"] / row["best_seconds"]
        if ends and len(ends) == len(times):  # end to end: claim + writes + completion notice
            row["claim_ms"] = statistics.median(e[0] for e in ends) * 1e3
            row["complete_ms"] = statistics.median(e[2] for e in ends) * 1e3
            row["e2e_seconds"] = statistics.median(sum(e) for e in ends)
            row["e2e_gb_s"] = nbytes / 1e9 / row["e2e_seconds"]
            row["e2e_ratio"] = row["e2e_gb_s"] / row["baseline_gb_s"]
        if control:
            control.close()
    except Exception as exc:  # the receiver or the mapping failed: report it as this row's error
        row["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:
                row["errors"].append(f"close: {type(exc).__name__}: {exc}")
        receiver.close()
    row["verified"] = verdict(row)
    return row


def verdict(row: dict) -> str:
    """``OK n/n`` (every transfer landed and every page matched), else what went wrong."""
    n, failed = row["transfers"], row["failed_transfers"]
    if n and not failed and not row["errors"]:
        return f"OK {n}/{n}"
    parts = [f"{failed}/{n} failed"] if n else []
    if row.get("mismatched_pages"):
        parts.append(f"{row['mismatched_pages']} pages differ")
    if row.get("stray_pages"):
        parts.append(f"{row['stray_pages']} stray pages")
    if row["errors"]:
        parts.append(row["errors"][0][:80])
    return "FAILED: " + "; ".join(parts)


def grpc_rows(case: Case, args, kv, block_ids, host_bytes) -> list[dict]:
    receiver = Receiver("--receiver", json.dumps(case.__dict__))
    try:
        ports = receiver.get(timeout=180)
        nbytes = kv.numel() * kv.element_size()
        gb = nbytes / 1e9
        raw_gbs, raw_seconds = raw_tcp_gbs(ports["raw"], host_bytes(), args.repeats)
        rows = []
        for streams in args.streams:
            sender = make_sender(
                case, kv, streams, args.layers_per_group, args.chunk_bytes, args.device
            )
            row = {
                "transport": "grpc",
                "shape": case.shape,
                "tokens": case.tokens,
                "dtype": case.dtype,
                "bytes": nbytes,
                "streams": streams,
                "baseline": BASELINE["grpc"],
                "raw_tcp_gb_s": raw_gbs,
                "baseline_gb_s": raw_gbs,
                "raw_seconds": raw_seconds,
                "baseline_seconds": raw_seconds,
                "transfers": 0,
                "failed_transfers": 0,
                "errors": [],
            }
            times = []
            address = f"127.0.0.1:{ports['grpc']}"
            for transfer in range(args.repeats + 1):  # the first is a warm-up, checked page by page
                row["transfers"] += 1
                try:
                    token = receiver.ask(op="expect")["token"]  # the decode pod's reservation
                    t = grpc_transfer(sender, case, address, token, kv, block_ids, args.device)
                except Exception as exc:  # DATA_LOSS from the page check, or a broken stream
                    row["failed_transfers"] += 1
                    row["errors"].append(f"transfer {transfer}: {type(exc).__name__}: {exc}")
                    continue
                if transfer > 0:
                    times.append(t)
            sender.close()
            if times:
                row["grpc_seconds"] = row["seconds"] = statistics.median(times)
                row["grpc_gb_s"] = row["gb_s"] = gb / row["seconds"]
                row["ratio"] = row["gb_s"] / raw_gbs
            row["verified"] = (
                "OK (warm-up)" if not row["errors"] else "FAILED: " + row["errors"][0][:80]
            )
            rows.append(row)
        return rows
    finally:
        receiver.close()


def run_case(case: Case, args, transports: list[str]) -> list[dict]:
    import torch

    kv, block_ids = kv_source(case, args.device)
    cache: list[bytes] = []

    def host_bytes() -> bytes:
        if not cache:
            cache.append(kv.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return cache[0]

    rows = []
    for name in transports:
        if name == "grpc":
            rows += grpc_rows(case, args, kv, block_ids, host_bytes)
        else:
            rows.append(memory_row(case, name, args, kv, block_ids, host_bytes))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--receiver", help=argparse.SUPPRESS)
    ap.add_argument("--memory-receiver", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--transports",
        nargs="+",
        default=None,
        choices=ALL_TRANSPORTS,
        help="default: grpc and the memory transports for the device (CPU: shm, nixl; "
        "cuda: cuda-ipc, nixl); those not available here are listed as unavailable",
    )
    ap.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 2, 4], help="grpc only")
    ap.add_argument("--layers-per-group", type=int, default=4)
    ap.add_argument("--chunk-bytes", type=int, default=4 << 20, help="grpc only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.receiver:
        receiver_main(Case(**json.loads(args.receiver)))
        return
    if args.memory_receiver:
        memory_receiver_main(json.loads(args.memory_receiver))
        return
    import torch

    device_type = torch.device(args.device).type
    gpu = device_type == "cuda"
    wanted = list(dict.fromkeys(args.transports or DEVICE_TRANSPORTS.get(device_type, ("grpc",))))
    unavailable = {}
    for name in wanted:
        reason = unavailable_reason(name, device_type)
        if reason is not None:
            unavailable[name] = reason
    transports = [t for t in wanted if t not in unavailable]
    shapes = args.shapes or ["llama-3.2-1b", "llama-3.1-8b"]
    tokens = args.tokens or ([1024, 8192] if gpu else [1024])
    rows = []
    for shape in shapes if transports else []:
        for n in tokens:
            rows += run_case(Case(shape, n, args.dtype), args, transports)
    payload = {
        "workload": "W0 KV transfer",
        "device": args.device,
        "command": " ".join(sys.argv),
        "transports": transports,
        "unavailable": unavailable,
        "rows": rows,
    }
    path = write_result("kv_transfer", args.device, payload, args.out_dir)

    def label(r: dict) -> str:
        if r["transport"] == "grpc":
            return f"grpc x{r['streams']}"
        return r["transport"]

    def num(r: dict, key: str):
        return r[key] if key in r else "-"

    table = [
        [
            label(r),
            r["shape"],
            r["tokens"],
            r["bytes"] / 2**20,
            num(r, "gb_s"),
            r["baseline"],
            num(r, "baseline_gb_s"),
            num(r, "ratio"),
            num(r, "gather_scatter_gb_s"),
            r["verified"],
        ]
        for r in rows
    ]
    table += [
        [name, "-", "-", "-", "-", BASELINE[name], "-", "-", "-", f"unavailable: {reason}"]
        for name, reason in unavailable.items()
    ]
    print_table(
        [
            "transport",
            "shape",
            "tokens",
            "MiB",
            "GB/s",
            "baseline",
            "baseline GB/s",
            "ratio",
            "gather+scatter GB/s",
            "verified",
        ],
        table,
    )
    print(
        "grpc xN: N parallel PushKV streams; GB/s: median transfer; baselines: best copy "
        "(shm: the median memcpy timed before each transfer, details below)"
    )
    shm = [r for r in rows if r["transport"] == "shm" and "gb_s" in r]
    if shm:
        print()
        print_table(
            [
                "shm",
                "tokens",
                "MiB",
                "writes GB/s",
                "end-to-end GB/s",
                "claim ms",
                "complete ms",
                "memcpy GB/s (warm)",
                "memcpy GB/s (cold)",
                "writes/warm",
                "writes/cold",
                "e2e/warm",
                "best writes/best warm",
                "threads",
            ],
            [
                [
                    r["shape"],
                    r["tokens"],
                    r["bytes"] / 2**20,
                    r["gb_s"],
                    num(r, "e2e_gb_s"),
                    num(r, "claim_ms"),
                    num(r, "complete_ms"),
                    r["baseline_gb_s"],
                    num(r, "cold_memcpy_gb_s"),
                    r["ratio"],
                    num(r, "ratio_cold"),
                    num(r, "e2e_ratio"),
                    num(r, "ratio_best"),
                    num(r, "copy_threads"),
                ]
                for r in shm
            ],
        )
        print(
            "shm: writes = the data plane (the layer groups' page copies into the decode pool); "
            "end-to-end adds the ClaimKV round trip before them and the CompleteKV notice after "
            "(loopback gRPC to the receiver process). memcpy: one copy of the same bytes in "
            "this process, timed right before each transfer; warm: after a copy of the same "
            "buffers, so a buffer (MiB) smaller than the last-level cache copies from the cache, "
            "as a transfer of few MiB may; cold: after writing "
            f"{num(shm[0], 'evict_bytes')} bytes of scratch (caches emptied, as for a pool larger "
            "than the cache). Medians of the timed transfers, except the best/best column."
        )
    print(f"wrote {path}")
    if any(r["failed_transfers"] or r["errors"] or "gb_s" not in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
