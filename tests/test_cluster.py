import numpy as np
import pytest

import lamina
from lamina.cluster import default_layout


@pytest.fixture(scope="module")
def client():
    c = lamina.connect(n_workers=2, threads_per_worker=1)
    yield c
    c.close()
    c.cluster.close()


def test_local_cluster_is_private_and_torch_threads_are_one(client):
    assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    assert "127.0.0.1" in client.dashboard_link
    threads = client.run(lambda: __import__("torch").get_num_threads())
    assert len(threads) == 2 and set(threads.values()) == {1}


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
