"""The shm transport's page copy: runs of blocks, split over copy threads sized to the CPUs the
process may use, and the huge-page advice on a pool mapping (best effort, never fatal)."""

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

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
    [([0, 1], [-3, -2]), ([0], [-3]), ([0], [4]), ([-1], [0]), ([4], [0]), ([0, 1], [0])],
)
def test_block_ids_outside_either_pool_are_refused_and_nothing_is_written(src_ids, dst_ids):
    src = torch.ones((2, 2, 4, 4, 2, 8))
    dst = torch.zeros((2, 2, 4, 4, 2, 8))
    with pytest.raises(ValueError):
        copy_pages(src, dst, np.array(src_ids), np.array(dst_ids), (0, 2))
    assert not dst.any()


def test_copy_threads_follow_the_cpus_the_process_may_use(monkeypatch):
    monkeypatch.setattr(shm_transport.os, "sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setattr(shm_transport, "_cgroup_cpus", lambda: None)
    assert shm_transport.copy_threads() == shm_transport.MAX_COPY_THREADS
    monkeypatch.setattr(shm_transport, "_cgroup_cpus", lambda: 2.5)  # a pod limited to 2.5 CPUs
    assert shm_transport.copy_threads() == 3
    monkeypatch.setattr(shm_transport, "_cgroup_cpus", lambda: 0.1)
    assert shm_transport.copy_threads() == 1
    monkeypatch.setattr(shm_transport, "_cgroup_cpus", lambda: None)
    monkeypatch.setattr(shm_transport.os, "sched_getaffinity", lambda _: {0, 1, 2})
    assert shm_transport.copy_threads() == 3


def test_a_cgroup_cpu_quota_is_read_and_anything_else_means_none(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("250000 100000\n")
    assert shm_transport._cgroup_cpus(str(cpu_max)) == 2.5
    for text in ("max 100000\n", "garbage", ""):
        cpu_max.write_text(text)
        assert shm_transport._cgroup_cpus(str(cpu_max)) is None
    assert shm_transport._cgroup_cpus(str(tmp_path / "absent")) is None


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "setting, mount_opts, possible",
    [
        ("always within_size advise [never] deny force", "rw,relatime,size=1g", False),
        ("always within_size advise [never] deny force", "rw,huge=within_size", True),
        ("always within_size advise [never] deny force", "rw,huge=advise", True),
        ("always within_size advise [never] deny force", "rw,huge=never", False),
        ("always within_size advise never deny [force]", "rw", True),
        ("always within_size advise never [deny] force", "rw,huge=always", False),
    ],
)
def test_huge_pages_are_possible_only_where_the_mount_or_the_kernel_allows(
    tmp_path, setting, mount_opts, possible
):
    mounts = _write(
        tmp_path / "mounts",
        f"proc /proc proc rw 0 0\ntmpfs /dev tmpfs rw,huge=always 0 0\n"
        f"tmpfs /dev/shm tmpfs {mount_opts} 0 0\n",
    )
    enabled = _write(tmp_path / "shmem_enabled", setting)
    pool = "/dev/shm/tandem-kv-x"
    assert shm_transport.hugepages_possible(pool, enabled, mounts) is possible
    # The longest mount point holding the file decides; a file elsewhere follows its own mount.
    assert shm_transport._mount_huge_option("/dev/other", mounts) == "always"
    assert shm_transport._mount_huge_option("/srv/x", mounts) == "never"
    assert not shm_transport.hugepages_possible(pool, str(tmp_path / "absent"), mounts)


def test_huge_page_advice_degrades_to_a_debug_log(monkeypatch, caplog):
    pool = torch.zeros(1 << 20, dtype=torch.uint8)
    caplog.set_level(logging.DEBUG, logger=shm_transport.__name__)
    monkeypatch.setattr(shm_transport, "hugepages_possible", lambda path: False)
    assert shm_transport.advise_hugepages(pool, "/dev/shm/tandem-kv-x") is False
    assert "not advised" in caplog.text

    class RefusingLibc:
        class madvise:  # noqa: N801 - stands for the C function
            argtypes = None

            def __new__(cls, *args):
                return -1

    monkeypatch.setattr(shm_transport, "hugepages_possible", lambda path: True)
    monkeypatch.setattr(shm_transport.ctypes, "CDLL", lambda *a, **k: RefusingLibc)
    caplog.clear()
    assert shm_transport.advise_hugepages(pool, "/dev/shm/tandem-kv-x") is False
    assert "MADV_HUGEPAGE" in caplog.text and "failed" in caplog.text

    def no_libc(*a, **k):
        raise OSError("no libc here")

    monkeypatch.setattr(shm_transport.ctypes, "CDLL", no_libc)
    assert shm_transport.advise_hugepages(pool, "/dev/shm/tandem-kv-x") is False


def test_huge_page_advice_on_a_real_mapping_never_raises(tmp_path, monkeypatch):
    """Where the kernel takes the advice it says so; where it does not, False, no exception."""
    path = tmp_path / "tandem-kv-hp"
    pool = torch.from_file(str(path), shared=True, size=4 << 20, dtype=torch.uint8)
    monkeypatch.setattr(shm_transport, "hugepages_possible", lambda p: True)
    assert shm_transport.advise_hugepages(pool, str(path)) in (True, False)
    pool[:] = 3  # the mapping still works either way
    assert int(pool.sum()) == 3 * (4 << 20)
