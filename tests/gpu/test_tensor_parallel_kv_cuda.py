"""Pushed KV into a tensor-parallel decode pod's GPU pools, the parts one GPU can run: the
receiver splitting each page's heads between rank pools (on one device here, one per device on a
multi-GPU machine), and a rank's pool shared over CUDA IPC by its owner and opened in another
process (the follower -> rank 0 -> front relay). Pods of different TP sizes on several GPUs need a
multi-GPU machine (test_tensor_parallel_cuda.py)."""

import multiprocessing
import pickle
from types import SimpleNamespace

import pytest
import torch

from tandem.engine.kv_cache import KVCacheSpec
from tandem.proto.common.v1 import common_pb2
from tandem.transfer.receiver import KVReceiver
from tandem.transfer.wire import make_chunk

pytestmark = pytest.mark.gpu
LAYERS, BLOCK, DIM, HEADS = 3, 4, 8, 4


def _devices(n: int) -> list[str]:
    """``n`` rank devices: one per GPU where there are enough, else all on cuda:0."""
    count = torch.cuda.device_count()
    return [f"cuda:{r if count >= n else 0}" for r in range(n)]


@pytest.mark.parametrize("tp", [2, 4])
def test_pushed_pages_split_between_gpu_rank_pools(tp):
    spec = KVCacheSpec(LAYERS, HEADS, DIM, BLOCK, torch.bfloat16)
    per = HEADS // tp
    pools = [torch.zeros(LAYERS, 2, 16, BLOCK, per, DIM, dtype=torch.bfloat16, device=d)
             for d in _devices(tp)]  # fmt: skip
    engine = torch.cuda.Event()
    engine.record()
    r = KVReceiver(pools[0], spec, "fp", rank_pools=pools[1:], max_chunk_bytes=1 << 20)
    block_ids = [5, 2, 9]
    token = r.expect("a", block_ids, 0).token
    pages = torch.randn(LAYERS, 2, len(block_ids), BLOCK, HEADS, DIM).to(torch.bfloat16)
    chunk = make_chunk("a", "fp", 0, (0, LAYERS), (0, len(block_ids)), pages)
    chunk.transfer_token = token
    r.write(chunk, chunk.data)
    r.complete(
        common_pb2.KVTransferEnd(
            request_id="a", model_fingerprint="fp", transfer_token=token, total_chunks=1
        )
    )  # waits for every rank's copies
    for rank, pool in enumerate(pools):
        got = pool[:, :, block_ids].cpu()
        assert torch.equal(got, pages[..., rank * per : (rank + 1) * per, :]), rank


def _owner(conn) -> None:
    """A follower rank: share its pool as ``tp_ranks`` does, then report what was written."""
    from tandem.engine.tp_ranks import _shared_pool

    pool = torch.zeros(2, 3, device="cuda")
    runner = SimpleNamespace(kv_cache=SimpleNamespace(tensor=pool))
    conn.send(_shared_pool(SimpleNamespace(share_rank_pools=True), runner))
    conn.recv()  # written
    torch.cuda.synchronize()
    conn.send(pool.cpu().tolist())
    conn.recv()  # the opener let go


def test_a_rank_pool_shared_over_cuda_ipc_is_written_by_another_process():
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_owner, args=(theirs,))
    proc.start()
    try:
        shared = ours.recv()
        assert isinstance(shared, bytes)
        pool = pickle.loads(shared)  # what the decode pod's front does with EngineInfo's bytes
        assert pool.is_cuda and pool.shape == (2, 3)
        pool[1].fill_(7.0)
        torch.cuda.synchronize()
        ours.send("written")
        assert ours.recv() == [[0.0, 0.0, 0.0], [7.0, 7.0, 7.0]]
        del pool
        ours.send("done")
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()


def test_a_pool_is_not_shared_unless_asked():
    from tandem.engine.tp_ranks import _shared_pool

    runner = SimpleNamespace(kv_cache=SimpleNamespace(tensor=torch.zeros(2, device="cuda")))
    assert _shared_pool(SimpleNamespace(share_rank_pools=False), runner) is None
