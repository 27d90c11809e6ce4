import numpy as np
import pytest

import lamina
from lamina.cluster import default_layout


@pytest.fixture(scope="module")
def client():
    with lamina.connect(n_workers=2, threads_per_worker=1) as c:
        yield c
    assert c.cluster.status.name == "closed"  # leaving the block shut the cluster down too


def test_local_cluster_is_private_and_torch_threads_are_one(client):
    assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    assert "127.0.0.1" in client.dashboard_link
    threads = client.run(lambda: __import__("torch").get_num_threads())
    assert len(threads) == 2 and set(threads.values()) == {1}


def _mmapped_bytes_of_a_malloc(n: int) -> int:
    """How much of a fresh ``malloc(n)`` glibc served by ``mmap`` (0: from its heap); glibc >= 2.33."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (k, ctypes.c_size_t)
            for k in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = (
        ctypes.c_void_p,
        [ctypes.c_size_t],
        [ctypes.c_void_p],
    )
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(n)
    during = libc.mallinfo2().hblkhd
    libc.free(block)
    return during - before


def test_workers_serve_tensors_below_32_mib_from_the_heap(client):
    """Dask starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which pins glibc's mmap threshold at 128 KiB;
    lamina's worker setup raises it to 32 MiB (every tensor a fresh mmap made registration 2.3x slower)."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or platform.libc_ver()[1] < "2.33":
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    served = client.run(lambda: (_mmapped_bytes_of_a_malloc(4 << 20), _mmapped_bytes_of_a_malloc(64 << 20)))
    for small, large in served.values():
        assert small == 0 and large >= 64 << 20, (small, large)


def test_small_jobs_compute_on_threads_and_big_ones_on_a_cluster():
    from lamina.cluster import Resources

    auto = Resources()
    assert not auto.wants_cluster(n_cells=200_000) and auto.wants_cluster(n_cells=5_000_000)
    assert not auto.wants_cluster(input_bytes=10 * 2**20) and auto.wants_cluster(input_bytes=None)
    assert Resources("processes").wants_cluster(n_cells=10)
    assert not Resources("threads").wants_cluster(n_cells=10**9)
    assert Resources(address="tcp://127.0.0.1:1").mode == "processes"
    with pytest.raises(lamina.ClusterError, match="choose one of auto, threads, processes"):
        Resources("fast")
    assert auto.client_for(n_cells=100) is None


def test_default_layout_uses_every_core():
    assert default_layout(2) == (2, 1)
    assert default_layout(16) == (8, 2)


def test_ingest_and_stage_on_the_cluster_equal_the_threaded_result(client, tmp_path, small_phantom, phantom_store):
    atlas = lamina.ingest(small_phantom, tmp_path / "c.lamina.zarr", cell_chunk=1024, client=client)
    a, b = atlas.to_xarray(), phantom_store.to_xarray()
    for var in ("x", "y", "X", "cell_type", "cell_section"):
        np.testing.assert_array_equal(a[var].values, b[var].values)
    lamina.section_stats(atlas, client=client)
    np.testing.assert_array_equal(atlas.root["qc/n_cells"][...], atlas.sections.n_cells.to_numpy())
    cx = atlas.root["qc/centroid_x"][...]
    sec = atlas.sections
    ref = [a["x"].values[s:e].astype(np.float64).mean() for s, e in zip(sec.cell_start, sec.cell_stop)]
    np.testing.assert_allclose(cx, ref, rtol=1e-9)


def test_unreachable_scheduler_and_missing_gpu_are_clear_errors():
    with pytest.raises(lamina.ClusterError, match="cannot reach a Dask scheduler at tcp://127.0.0.1:9"):
        lamina.connect("tcp://127.0.0.1:9", timeout=2)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(lamina.ClusterError, match="no usable CUDA device"):
        lamina.connect(gpu=True)


@pytest.mark.gpu
def test_gpu_cluster_has_one_worker_per_device():
    import torch

    client = lamina.connect(gpu=True)
    try:
        assert len(client.scheduler_info()["workers"]) == torch.cuda.device_count()
    finally:
        client.close()
