"""The shm transport's page copy: runs of blocks, split over copy threads sized to the CPUs the
process may use, and the huge-page advice on the owner's pool (best effort, never fatal)."""

import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from tandem.api.errors import KVTransferError
from tandem.engine import kv_cache
from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
from tandem.transfer import shm_transport
from tandem.transfer.shm_transport import _runs, copy_pages


def reference(src, dst, src_ids, dst_ids, layers):
    want = dst.clone()
    l0, l1 = layers
    for s, d in zip(src_ids, dst_ids, strict=True):
        want[l0:l1, :, d] = src[l0:l1, :, s]
    return want


def test_runs_are_cut_where_either_side_breaks_and_at_part_bounds():
    s = np.array([4, 5, 6, 9, 10, 2, 3, 7], dtype=np.int64)
    d = np.array([0, 1, 2, 3, 5, 6, 7, 8], dtype=np.int64)
    # 4,5,6 -> 0,1,2 is one run; 9 -> 3; 10 -> 5 (destination breaks); 2,3 -> 6,7; 7 -> 8.
    assert _runs(s, d, 1) == [[(4, 0, 3), (9, 3, 1), (10, 5, 1), (2, 6, 2), (7, 8, 1)]]
    # Two parts of 4 blocks each: the run 2,3 -> 6,7 lies in the second; none crosses a bound.
    assert _runs(s, d, 2) == [[(4, 0, 3), (9, 3, 1)], [(10, 5, 1), (2, 6, 2), (7, 8, 1)]]
    consecutive = np.arange(10, dtype=np.int64)
    split = _runs(consecutive, consecutive + 3, 3)
    assert split == [[(0, 3, 3)], [(3, 6, 3)], [(6, 9, 4)]]  # one run, cut in three
    assert _runs(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 2) == [[], []]


@pytest.fixture
def four_copy_threads(monkeypatch):
    """Every write splits over 4 threads (the caller and 3 pool threads), however few cores."""
    pool = ThreadPoolExecutor(3, thread_name_prefix="test-shm-copy")
    monkeypatch.setattr(shm_transport, "_copy_pool", (pool, 4))
    monkeypatch.setattr(shm_transport, "PARALLEL_MIN_BYTES", 1)
    yield
    pool.shutdown()


@pytest.mark.parametrize(
    "src_ids, dst_ids",
    [
        ([0, 1, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11]),  # one run on both sides
        ([0, 1, 2, 3, 4, 5, 6, 7, 8], [11, 10, 9, 8, 7, 6, 5, 4, 3]),  # consecutive on one side
        ([8, 7, 6, 5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8]),
        ([2, 3, 4, 0, 1, 7, 8, 5, 6], [5, 6, 7, 9, 10, 0, 1, 2, 3]),  # runs of 2 and 3
        ([5], [0]),
    ],
)
def test_threaded_runs_copy_exactly_the_named_pages(four_copy_threads, src_ids, dst_ids):
    g = torch.Generator().manual_seed(7)
    # Random bit patterns (NaNs included): pages must land bit for bit.
    src = torch.randint(-(2**15), 2**15, (5, 2, 9, 4, 2, 8), generator=g, dtype=torch.int16)
    src = src.view(torch.bfloat16)
    for layers in [(0, 5), (1, 4), (4, 5)]:
        dst = torch.full((5, 2, 13, 4, 2, 8), 7, dtype=torch.int16).view(torch.bfloat16)
        want = reference(src, dst, src_ids, dst_ids, layers)
        nbytes = copy_pages(src, dst, np.array(src_ids), np.array(dst_ids), layers)
        assert torch.equal(dst.view(torch.int16), want.view(torch.int16))
        assert nbytes == (layers[1] - layers[0]) * 2 * len(src_ids) * 4 * 2 * 8 * 2


def test_pools_of_other_page_shapes_are_refused():
    src = torch.zeros((2, 2, 4, 4, 2, 8))
    with pytest.raises(ValueError, match="page shape"):
        copy_pages(src, torch.zeros((2, 2, 4, 4, 2, 4)), [0], [0], (0, 2))
    with pytest.raises(ValueError, match="page shape"):
        copy_pages(src, torch.zeros((2, 2, 4, 4, 2, 8), dtype=torch.float16), [0], [0], (0, 2))


@pytest.mark.parametrize(
    "src_ids, dst_ids",
    [
        ([0, 1], [-3, -2]),
        ([0], [-3]),
        ([0], [4]),
        ([-1], [0]),
        ([4], [0]),
        ([0, 1], [0]),
        ([0, 1, 2], [3, 1, 3]),  # a destination named twice: two threads could tear it
    ],
)
def test_block_ids_outside_either_pool_are_refused_and_nothing_is_written(src_ids, dst_ids):
    src = torch.ones((2, 2, 4, 4, 2, 8))
    dst = torch.zeros((2, 2, 4, 4, 2, 8))
    with pytest.raises(ValueError):
        copy_pages(src, dst, np.array(src_ids), np.array(dst_ids), (0, 2))
    assert not dst.any()


def test_a_destination_block_named_twice_is_refused_once_per_transfer():
    from tandem.transfer.transport import check_distinct_block_ids

    with pytest.raises(KVTransferError, match="a destination block id is named twice"):
        check_distinct_block_ids((4, 5, 4))
    check_distinct_block_ids((4, 5, 6))
    check_distinct_block_ids(())
    shape = (2, 2, 8, 4, 2, 8)
    # The per-write check is bounds only (duplicates are the transfer's, checked once); a source
    # block read twice is fine.
    shm_transport.check_block_ids(torch.tensor([0, 0]), torch.tensor([4, 5]), shape)
    with pytest.raises(KVTransferError, match="outside the decode pool's 7 blocks"):
        shm_transport.check_block_ids(torch.tensor([0, 1]), torch.tensor([4, 7]), shape)


@pytest.mark.parametrize("failing", ["caller", "pool"])
def test_a_failed_part_raises_only_once_every_other_part_has_stopped(
    four_copy_threads, monkeypatch, failing
):
    """A write whose part fails is aborted, and its blocks may be reused at once: copy_pages
    must not return (raise) while another thread still writes into them."""
    copy = shm_transport._copy_runs
    main = threading.main_thread()
    finished = []

    def flaky(s_pages, d_pages, runs):
        mine = threading.current_thread() is main
        if mine == (failing == "caller") and (mine or runs[0][1] == 2):
            raise RuntimeError("copy failed")
        time.sleep(0.2 if mine else 0.4)  # slow parts: still writing when the failure is known
        copy(s_pages, d_pages, runs)
        finished.append(runs)

    monkeypatch.setattr(shm_transport, "_copy_runs", flaky)
    src = torch.arange(2 * 2 * 8 * 4, dtype=torch.float32).view(2, 2, 8, 4)
    dst = torch.zeros_like(src)
    ids = np.arange(8)
    with pytest.raises(RuntimeError, match="copy failed"):
        copy_pages(src, dst, ids, ids, (0, 2))
    assert len(finished) == 3  # the three other parts of four, all done before the raise
    for runs in finished:
        for s, d, k in runs:
            assert torch.equal(dst[:, :, d : d + k], src[:, :, s : s + k])


def test_one_cpu_copies_on_the_writing_thread_alone(monkeypatch):
    monkeypatch.setattr(shm_transport, "_copy_pool", None)
    monkeypatch.setattr(shm_transport, "copy_threads", lambda: 1)
    monkeypatch.setattr(shm_transport, "PARALLEL_MIN_BYTES", 1)
    assert shm_transport._copy_threads() == (None, 1)
    copiers = []
    copy = shm_transport._copy_runs

    def record(s_pages, d_pages, runs):
        copiers.append(threading.current_thread())
        copy(s_pages, d_pages, runs)

    monkeypatch.setattr(shm_transport, "_copy_runs", record)
    src = torch.randn(3, 2, 6, 4)
    dst = torch.zeros(3, 2, 9, 4)
    src_ids, dst_ids = [5, 0, 1, 2], [8, 0, 4, 5]
    want = reference(src, dst, src_ids, dst_ids, (0, 3))
    copy_pages(src, dst, np.array(src_ids), np.array(dst_ids), (0, 3))
    assert torch.equal(dst, want)
    assert copiers and all(t is threading.current_thread() for t in copiers)


def test_copy_threads_follow_the_cpus_the_process_may_use(monkeypatch):
    monkeypatch.setattr(shm_transport.os, "sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setattr(shm_transport, "_cgroup_cpus", lambda: None)
    monkeypatch.setattr(shm_transport.torch, "get_num_threads", lambda: 64)
    assert shm_transport.copy_threads() == shm_transport.MAX_COPY_THREADS
    monkeypatch.setattr(shm_transport, "_cgroup_cpus", lambda: 2.5)  # a pod limited to 2.5 CPUs
    assert shm_transport.copy_threads() == 3
    monkeypatch.setattr(shm_transport, "_cgroup_cpus", lambda: 0.1)
    assert shm_transport.copy_threads() == 1
    monkeypatch.setattr(shm_transport, "_cgroup_cpus", lambda: None)
    monkeypatch.setattr(shm_transport.os, "sched_getaffinity", lambda _: {0, 1, 2})
    assert shm_transport.copy_threads() == 3
    # torch's own setting (OMP_NUM_THREADS, torch.set_num_threads) caps them too.
    monkeypatch.setattr(shm_transport.os, "sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setattr(shm_transport.torch, "get_num_threads", lambda: 2)
    assert shm_transport.copy_threads() == 2


def test_a_cgroup_cpu_quota_is_read_and_anything_else_means_none(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("250000 100000\n")
    assert shm_transport._cgroup_cpus(str(tmp_path)) == 2.5
    for text in ("max 100000\n", "garbage", ""):
        cpu_max.write_text(text)
        assert shm_transport._cgroup_cpus(str(tmp_path)) is None
    assert shm_transport._cgroup_cpus(str(tmp_path / "absent")) is None


@pytest.mark.parametrize(
    "quota, period, cpus",
    [
        ("150000\n", "100000\n", 1.5),
        ("-1\n", "100000\n", None),  # cgroup v1's "no quota"
        ("400000", "0", None),
        ("lots", "100000", None),
        (None, "100000", None),
    ],
)
def test_a_cgroup_v1_cpu_quota_is_read_where_there_is_no_v2_one(tmp_path, quota, period, cpus):
    v1 = tmp_path / "cpu"
    v1.mkdir()
    if quota is not None:
        (v1 / "cpu.cfs_quota_us").write_text(quota)
    (v1 / "cpu.cfs_period_us").write_text(period)
    assert shm_transport._cgroup_cpus(str(tmp_path)) == cpus


def _write(path, text):
    path.write_text(text)
    return str(path)


ENABLED_NEVER = "always within_size advise [never] deny force"


@pytest.mark.parametrize(
    "setting, mount_opts, advised",
    [
        (ENABLED_NEVER, "rw,relatime,size=1g", False),
        (ENABLED_NEVER, "rw,huge=within_size", False),  # huge without asking
        (ENABLED_NEVER, "rw,huge=always", False),
        (ENABLED_NEVER, "rw,huge=advise", True),
        (ENABLED_NEVER, "rw,huge=never", False),
        ("always within_size advise never deny [force]", "rw,huge=advise", False),
        ("always within_size advise never [deny] force", "rw,huge=advise", False),
    ],
)
def test_huge_pages_are_asked_for_only_on_a_huge_advise_tmpfs(
    tmp_path, setting, mount_opts, advised
):
    mounts = _write(
        tmp_path / "mounts",
        f"proc /proc proc rw 0 0\ntmpfs /dev tmpfs rw,huge=always 0 0\n"
        f"tmpfs /dev/shm tmpfs {mount_opts} 0 0\n",
    )
    enabled = _write(tmp_path / "shmem_enabled", setting)
    pool = "/dev/shm/tandem-kv-x"
    assert kv_cache.hugepages_on_advice(pool, enabled, mounts) is advised
    # The longest mount point holding the file decides; a file elsewhere follows its own mount.
    assert kv_cache._mount_huge_option("/dev/other", mounts) == "always"
    assert kv_cache._mount_huge_option("/srv/x", mounts) == "never"
    assert not kv_cache.hugepages_on_advice(pool, str(tmp_path / "absent"), mounts)


class RecordingLibc:
    """Stands for libc: records madvise calls and answers ``result``."""

    def __init__(self, result=0):
        self.calls = []
        outer = self

        class Madvise:
            argtypes = None

            def __call__(self, *args):
                outer.calls.append(args)
                return result

        self.madvise = Madvise()


@pytest.mark.parametrize("option, asked", [("never", False), ("advise", True)])
def test_the_owner_asks_for_huge_pages_on_its_pool_before_prefaulting_it(
    tmp_path, monkeypatch, option, asked
):
    mounts = _write(tmp_path / "mounts", f"tmpfs {tmp_path} tmpfs rw,huge={option} 0 0\n")
    enabled = _write(tmp_path / "shmem_enabled", ENABLED_NEVER)
    monkeypatch.setattr(
        kv_cache,
        "hugepages_on_advice",
        functools.partial(kv_cache.hugepages_on_advice, shmem_enabled=enabled, mounts=mounts),
    )
    libc = RecordingLibc()
    monkeypatch.setattr(kv_cache.ctypes, "CDLL", lambda *a, **k: libc)
    order = []
    monkeypatch.setattr(kv_cache, "prefault", lambda t: order.append(("prefault", len(libc.calls))))
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    cache = PagedKVCache(spec, 4, torch.device("cpu"), path=str(tmp_path / "tandem-kv-pool"))
    if asked:
        (start, length, advice), *more = libc.calls
        assert not more and advice == kv_cache._MADV_HUGEPAGE
        addr = cache.tensor.data_ptr()
        assert start <= addr and start + length == addr + cache.tensor.numel() * 4
        assert order == [("prefault", 1)]  # advised first: the pages are made huge
    else:
        assert libc.calls == [] and order == [("prefault", 0)]


def test_huge_page_advice_degrades_to_a_debug_log(monkeypatch, caplog):
    pool = torch.zeros(1 << 20, dtype=torch.uint8)
    caplog.set_level(logging.DEBUG, logger=kv_cache.__name__)
    monkeypatch.setattr(kv_cache, "hugepages_on_advice", lambda path: False)
    assert kv_cache.advise_hugepages(pool, "/dev/shm/tandem-kv-x") is False
    assert "not asked for" in caplog.text

    monkeypatch.setattr(kv_cache, "hugepages_on_advice", lambda path: True)
    refusing = RecordingLibc(result=-1)
    monkeypatch.setattr(kv_cache.ctypes, "CDLL", lambda *a, **k: refusing)
    caplog.clear()
    assert kv_cache.advise_hugepages(pool, "/dev/shm/tandem-kv-x") is False
    assert refusing.calls
    assert "MADV_HUGEPAGE" in caplog.text and "failed" in caplog.text

    def no_libc(*a, **k):
        raise OSError("no libc here")

    monkeypatch.setattr(kv_cache.ctypes, "CDLL", no_libc)
    caplog.clear()
    assert kv_cache.advise_hugepages(pool, "/dev/shm/tandem-kv-x") is False
    assert "not available" in caplog.text
