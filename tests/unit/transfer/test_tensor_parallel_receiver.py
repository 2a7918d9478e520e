"""A tensor-parallel decode pod's receiver: a pushed page carries every kv head of the model; each
rank's pool takes the heads it holds (an even share, or one replicated head), and nothing else
changes -- the checks before a write, the completion, the refusal of memory writers (which would
need every rank's pool)."""

import pytest
import torch

from tandem.api.errors import KVTransferError
from tandem.engine.kv_cache import KVCacheSpec
from tandem.proto.common.v1 import common_pb2
from tandem.transfer.receiver import KVReceiver
from tandem.transfer.wire import make_chunk

LAYERS, BLOCK, DIM = 3, 4, 8


def pools(num_kv_heads: int, tp: int, blocks: int = 16) -> list[torch.Tensor]:
    per_rank = max(1, num_kv_heads // tp)
    return [torch.zeros(LAYERS, 2, blocks, BLOCK, per_rank, DIM) for _ in range(tp)]


def receiver(num_kv_heads: int, tp: int) -> tuple[KVReceiver, list[torch.Tensor]]:
    spec = KVCacheSpec(LAYERS, num_kv_heads, DIM, BLOCK, torch.float32)
    p = pools(num_kv_heads, tp)
    return KVReceiver(p[0], spec, "fp", rank_pools=p[1:], max_chunk_bytes=1 << 20), p


def push(r: KVReceiver, rid: str, block_ids: list[int], pages: torch.Tensor) -> None:
    token = r.expect(rid, block_ids, 0).token
    r.claim(rid, token, "grpc")
    n = len(block_ids)
    chunk = make_chunk(rid, "fp", 0, (0, LAYERS), (0, n), pages)
    chunk.transfer_token = token
    r.write(chunk, chunk.data)
    r.complete(
        common_pb2.KVTransferEnd(
            request_id=rid, model_fingerprint="fp", transfer_token=token, total_chunks=1
        )
    )


@pytest.mark.parametrize(
    "heads,tp,expected",
    [
        (4, 2, [[0, 1], [2, 3]]),
        (4, 4, [[0], [1], [2], [3]]),
        (2, 4, [[0], [0], [1], [1]]),  # fewer kv heads than ranks: replicated
    ],
)
def test_each_rank_pool_gets_the_heads_it_holds(heads, tp, expected):
    r, p = receiver(heads, tp)
    block_ids = [5, 2, 9]
    pages = torch.randn(LAYERS, 2, len(block_ids), BLOCK, heads, DIM)
    push(r, "a", block_ids, pages)
    for rank, held in enumerate(expected):
        assert torch.equal(p[rank][:, :, block_ids], pages[..., held, :]), rank
        untouched = [b for b in range(16) if b not in block_ids]
        assert not p[rank][:, :, untouched].any()


def test_a_page_without_every_head_is_refused_before_any_write():
    r, p = receiver(4, 2)
    token = r.expect("a", [1, 2], 0).token
    half = torch.randn(LAYERS, 2, 2, BLOCK, 2, DIM)  # one rank's heads, not the model's
    chunk = make_chunk("a", "fp", 0, (0, LAYERS), (0, 2), half)
    chunk.transfer_token = token
    with pytest.raises(KVTransferError, match="shape"):
        r.write(chunk, chunk.data)
    assert not any(x.any() for x in p)


def test_memory_writers_are_refused_by_a_tensor_parallel_receiver():
    r, _ = receiver(4, 2)
    token = r.expect("a", [1], 0).token
    with pytest.raises(KVTransferError, match="grpc only"):
        r.claim("a", token, "shm")
    r.claim("a", token, "grpc")  # the lease is still there for a gRPC writer


def test_rank_pools_must_match_the_head_split():
    spec = KVCacheSpec(LAYERS, 4, DIM, BLOCK, torch.float32)
    wrong = pools(4, 4)  # one head each, where two ranks hold two
    with pytest.raises(ValueError, match="rank 0's KV pool holds 1 kv heads"):
        KVReceiver(wrong[0], spec, "fp", rank_pools=wrong[1:2])
