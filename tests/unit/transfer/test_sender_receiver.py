"""KVSender -> gRPC -> KVReceiver in one process: pages arrive intact, and every staged buffer is
released on every exit path (success, refusal, cancellation, an exhausted pool)."""

import time

import pytest
import torch

from tandem.api.errors import InvalidRequest, KVTransferError
from tandem.api.sampling_params import SamplingParams
from tandem.engine.kv_cache import KVCacheSpec
from tandem.engine.scheduler import ScheduledSequence
from tandem.engine.sequence import Sequence
from tandem.proto.common.v1 import common_pb2
from tandem.transfer import codec
from tandem.transfer.push_streams import KVTarget
from tandem.transfer.sender import KVSender
from tests.unit.transfer.grpc_kv_receiver import GrpcKVReceiver

SPEC = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
PROMPT = 37  # 10 blocks, the last one partial


def Receiver(**kw) -> GrpcKVReceiver:  # noqa: N802 - reads as the class it makes
    return GrpcKVReceiver(SPEC, **kw)


def wait_buffers_back(s: KVSender, timeout_s: float = 5.0) -> None:
    """Every staging buffer released (a gRPC thread may still be finishing a chunk it dequeued
    when the call ended: it releases the buffer a moment later, or never if one leaked)."""
    deadline = time.monotonic() + timeout_s
    while s.staging.in_use:
        assert time.monotonic() < deadline, f"{s.staging.in_use} staging buffers never came back"
        time.sleep(0.01)


def sender(**kw) -> KVSender:
    defaults = dict(
        layers_per_group=2, max_chunk_bytes=1024, num_streams=2, device=torch.device("cpu")
    )
    return KVSender(SPEC, "fp", **{**defaults, **kw})


def source():
    g = torch.Generator().manual_seed(0)
    kv = torch.randn((4, 2, 64, 4, 2, 8), generator=g)
    blocks = torch.randperm(64, generator=g)[:10].tolist()
    return kv, blocks


def run_prefill(s: KVSender, rid: str, kv, blocks, layers=4):
    seq = Sequence(
        rid, [1] * PROMPT, SamplingParams(max_tokens=1), arrival_time=0.0, arrival_index=0
    )
    scheduled = [ScheduledSequence(seq, 0, PROMPT, blocks, True)]
    for n in range(1, layers + 1):
        s.on_layers_computed(scheduled, n, kv)


def end(rid: str, fingerprint="fp") -> common_pb2.KVTransferEnd:
    return common_pb2.KVTransferEnd(request_id=rid, model_fingerprint=fingerprint, first_token_id=1)


def test_pages_arrive_intact_and_buffers_come_back():
    r = Receiver()
    s = sender()
    try:
        kv, blocks = source()
        token = r.receiver.expect("r1", list(range(10)), 0).token
        s.start("r1", KVTarget(f"127.0.0.1:{r.port}", "r1", 0, "fp", token), PROMPT)
        run_prefill(s, "r1", kv, blocks)
        result = s.finish("r1", end("r1")).result(10)
        assert (
            result.bytes == kv[:, :, blocks].numel() * 4 and result.chunks > 2
        )  # several chunks, 2 streams
        assert torch.equal(r.pool[:, :, :10], kv[:, :, blocks])
        wait_buffers_back(s)
    finally:
        s.close()
        r.stop()


def test_chunks_over_the_receivers_size_limit_are_refused_before_any_write():
    r = Receiver(max_chunk_bytes=1024)
    s = sender(max_chunk_bytes=4096)  # a sender configured above what the decode pod accepts
    try:
        kv, blocks = source()
        token = r.receiver.expect("big", list(range(10)), 0).token
        s.start("big", KVTarget(f"127.0.0.1:{r.port}", "big", 0, "fp", token), PROMPT)
        run_prefill(s, "big", kv, blocks)
        with pytest.raises(KVTransferError, match="exceeds the 1024-byte limit"):
            s.finish("big", end("big")).result(10)
        assert not r.pool.any()  # nothing was written
        wait_buffers_back(s)
    finally:
        s.close()
        r.stop()


def test_skip_blocks_are_not_sent():
    r = Receiver()
    s = sender()
    try:
        kv, blocks = source()
        token = r.receiver.expect(
            "r1", list(range(10)), 4
        ).token  # the decode pod caches the first 4 blocks
        s.start("r1", KVTarget(f"127.0.0.1:{r.port}", "r1", 4, "fp", token), PROMPT)
        run_prefill(s, "r1", kv, blocks)
        s.finish("r1", end("r1")).result(10)
        assert torch.equal(r.pool[:, :, 4:10], kv[:, :, blocks[4:]])
        assert r.pool[:, :, :4].abs().sum() == 0
    finally:
        s.close()
        r.stop()


def test_a_refused_transfer_releases_everything_and_stops_gathering():
    r = Receiver(fingerprint="other-model")
    s = sender()
    try:
        kv, blocks = source()
        token = r.receiver.expect("r1", list(range(10)), 0).token
        s.start("r1", KVTarget(f"127.0.0.1:{r.port}", "r1", 0, "fp", token), PROMPT)
        run_prefill(s, "r1", kv, blocks, layers=2)
        deadline = time.monotonic() + 10
        while not s._transfers["r1"].failed:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        queued = s._transfers["r1"].chunks
        run_prefill(s, "r1", kv, blocks)  # later layer groups: nothing more is gathered
        assert s._transfers["r1"].chunks == queued
        with pytest.raises(KVTransferError, match="DATA_LOSS"):
            s.finish("r1", end("r1")).result(10)
        wait_buffers_back(s)
    finally:
        s.close()
        r.stop()


def test_cancel_mid_transfer_releases_queued_buffers():
    r = Receiver(delay_s=0.5)  # the decode pod is slow to read: chunks pile up
    s = sender(staging_buffers=1000)
    try:
        kv, blocks = source()
        token = r.receiver.expect("r1", list(range(10)), 0).token
        s.start("r1", KVTarget(f"127.0.0.1:{r.port}", "r1", 0, "fp", token), PROMPT)
        run_prefill(s, "r1", kv, blocks)
        # Usually chunks are still queued here (gRPC may also have taken them all already: the
        # receiver's flow-control window holds this small prompt; either way nothing may leak).
        s.abort("r1")
        wait_buffers_back(s, timeout_s=10)
    finally:
        s.close()
        r.stop()


def test_an_exhausted_pool_never_blocks_the_engine_thread():
    r = Receiver(delay_s=3.0)
    s = sender(staging_buffers=1)
    try:
        kv, blocks = source()
        token = r.receiver.expect("r1", list(range(10)), 0).token
        s.start("r1", KVTarget(f"127.0.0.1:{r.port}", "r1", 0, "fp", token), PROMPT)
        start = time.monotonic()
        run_prefill(s, "r1", kv, blocks)
        assert time.monotonic() - start < 2.0  # queued without waiting for the slow receiver (3 s)
        s.finish("r1", end("r1")).result(10)
        assert torch.equal(r.pool[:, :, :10], kv[:, :, blocks])
        wait_buffers_back(s)
    finally:
        s.close()
        r.stop()


def test_duplicate_transfers_and_impossible_chunk_sizes_are_refused():
    s = sender()
    try:
        s.start("r1", KVTarget("127.0.0.1:1", "r1", 0, "fp"), PROMPT)
        with pytest.raises(InvalidRequest, match="already in use"):
            s.start("r1", KVTarget("127.0.0.1:1", "r1", 0, "fp"), PROMPT)
    finally:
        s.close()
    per_block_layer = 2 * 4 * 2 * 8 * 4
    with pytest.raises(ValueError, match="chunk limit"):
        sender(max_chunk_bytes=per_block_layer - 1)
    assert sender(max_chunk_bytes=per_block_layer, layers_per_group=4).layers_per_group == 1


def test_malformed_frames_are_reported_not_raised():
    bad = codec.decode(b"\x0a\xff\xff\xff\xff\x0f")  # a length far past the end
    assert bad.error is not None and "malformed" in str(bad.error)
    assert codec.decode(b"\x0b").error is not None  # a group wire type


def test_a_transfer_of_no_pages_sends_only_the_end():
    """The decode pod caches the whole prompt: streams open lazily, only the end message goes."""
    r = Receiver()
    s = sender()
    try:
        kv, blocks = source()
        token = r.receiver.expect("r1", list(range(10)), 10).token
        s.start("r1", KVTarget(f"127.0.0.1:{r.port}", "r1", 10, "fp", token), PROMPT)
        run_prefill(s, "r1", kv, blocks)
        assert not r.reading.is_set()  # nothing to send yet: no stream was opened
        result = s.finish("r1", end("r1")).result(10)
        assert (result.chunks, result.bytes) == (0, 0)
        assert r.reading.is_set()
    finally:
        s.close()
        r.stop()


def test_abort_before_the_first_chunk_opens_nothing():
    r = Receiver()
    s = sender()
    try:
        s.start("r1", KVTarget(f"127.0.0.1:{r.port}", "r1", 0, "fp"), PROMPT)
        s.abort("r1")
        time.sleep(0.2)
        assert not r.reading.is_set() and not s._transfers
    finally:
        s.close()
        r.stop()


def test_a_cancelled_transfer_never_sends_its_end():
    """cancel() racing ahead of finish() (say, finish still queued for a thread): finish fails."""
    r = Receiver()
    s = sender()
    try:
        kv, blocks = source()
        transfer = s.start("r1", KVTarget(f"127.0.0.1:{r.port}", "r1", 10, "fp"), PROMPT)
        transfer.cancel()
        with pytest.raises(KVTransferError, match="cancelled"):
            transfer.finish(end("r1"))
        # And a chunk submitted after the cancel goes nowhere, its buffer back in the pool.
        released = []
        transfer.submit(lambda seq_no: b"", lambda: released.append(True), 8)
        assert released == [True] and transfer.chunks == 0
        time.sleep(0.2)
        assert not r.reading.is_set()
    finally:
        s.close()
        r.stop()


def test_a_block_that_was_not_gathered_is_refused_not_read_from_a_neighbour():
    """A tensor-parallel engine hands the sender gathered pages and block tables renumbered to
    them, -1 for blocks it did not gather: sending one is a refusal, never another block's KV."""
    r = Receiver()
    s = sender()
    try:
        kv, blocks = source()
        token = r.receiver.expect("r1", list(range(10)), 0).token
        s.start("r1", KVTarget(f"127.0.0.1:{r.port}", "r1", 0, "fp", token), PROMPT)
        with pytest.raises(KVTransferError, match="were not gathered"):
            run_prefill(s, "r1", kv, blocks[:9] + [-1])
        s.abort("r1")
        wait_buffers_back(s)
    finally:
        s.close()
        r.stop()
