"""A shared-memory KV pool's memory: its owner allocates all of it at start (or refuses to
start when the directory cannot hold it), and a writer maps every page once, off the write path
(``kv_cache.prefault``, ``ShmPoolWriter.populated``)."""

import os
import sys

import pytest
import torch

from tandem.api.errors import ModelLoadError
from tandem.engine import kv_cache
from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
from tandem.transfer.transport import export_pool, open_writer

SPEC = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.bfloat16)
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")


def pool_bytes(cache: PagedKVCache) -> int:
    return cache.tensor.numel() * cache.tensor.element_size()


@LINUX
def test_the_owner_allocates_the_whole_pool_at_start(tmp_path):
    cache = PagedKVCache(SPEC, 256, torch.device("cpu"), path=str(tmp_path / "tandem-kv-pool"))
    allocated = os.stat(cache.path).st_blocks * 512
    assert allocated >= pool_bytes(cache)  # not a sparse file filled in under load


def test_a_pool_the_directory_cannot_hold_is_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(kv_cache, "_free_bytes", lambda directory: 1 << 10)
    with pytest.raises(ModelLoadError, match="TANDEM_SHM_DIR") as e:
        PagedKVCache(SPEC, 256, torch.device("cpu"), path=str(tmp_path / "tandem-kv-pool"))
    assert "GiB" in str(e.value)
    assert not (tmp_path / "tandem-kv-pool").exists()


@LINUX
def test_prefault_maps_pages_and_leaves_their_contents(tmp_path):
    path = str(tmp_path / "pool")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 64)
    t = torch.from_file(path, shared=True, size=256 * 64, dtype=torch.uint8)
    assert kv_cache.prefault(t)
    assert t[:256].tolist() == list(range(256)) and t[-1] == 255


def test_prefault_declines_what_it_cannot_map():
    assert not kv_cache.prefault(torch.empty(0))
    if torch.cuda.is_available():
        assert not kv_cache.prefault(torch.zeros(4, device="cuda"))


@LINUX
def test_a_writer_maps_the_pool_once_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_SHM_DIR", str(tmp_path))
    cache = PagedKVCache(SPEC, 32, torch.device("cpu"), path=str(tmp_path / "tandem-kv-pool"))
    descriptor = export_pool("shm", cache.tensor, path=cache.path).descriptor()
    writer = open_writer(descriptor, torch.zeros(4, 2, 9, 4, 2, 8, dtype=torch.bfloat16))
    assert writer.populated.wait(10)
    src = torch.randn(4, 2, 9, 4, 2, 8).to(torch.bfloat16)
    writer.write(src, torch.tensor([1, 2]), (0, 4), torch.tensor([5, 30]))
    assert torch.equal(cache.tensor[:, :, [5, 30]], src[:, :, [1, 2]])
    writer.close()


def test_a_pool_that_cannot_be_allocated_is_refused_and_its_file_removed(tmp_path, monkeypatch):
    """statvfs said there was room, but another pod took it first: madvise fails."""

    def full(tensor):
        raise OSError(12, "pre-faulting failed: Cannot allocate memory")

    monkeypatch.setattr(kv_cache, "prefault", full)
    with pytest.raises(ModelLoadError, match="could not be allocated"):
        PagedKVCache(SPEC, 256, torch.device("cpu"), path=str(tmp_path / "tandem-kv-pool"))
    assert not (tmp_path / "tandem-kv-pool").exists()


@LINUX
def test_a_writer_does_not_populate_a_sparse_pool(tmp_path, monkeypatch):
    """An owner that could not pre-fault its pool: mapping every page from the writer would
    allocate the missing ones, charged to the writer's memory. It leaves them to fault in."""
    monkeypatch.setenv("TANDEM_SHM_DIR", str(tmp_path))
    monkeypatch.setattr(kv_cache, "prefault", lambda tensor: False)  # an old kernel, say
    cache = PagedKVCache(SPEC, 256, torch.device("cpu"), path=str(tmp_path / "tandem-kv-pool"))
    assert os.stat(cache.path).st_blocks * 512 < pool_bytes(cache) // 2  # sparse
    descriptor = export_pool("shm", cache.tensor, path=cache.path).descriptor()
    writer = open_writer(descriptor, torch.zeros(4, 2, 9, 4, 2, 8, dtype=torch.bfloat16))
    assert writer.populated.wait(10)
    assert os.stat(cache.path).st_blocks * 512 < pool_bytes(cache) // 2  # still sparse
    writer.close()
