"""Where a task's torch work runs: ``lamina.cluster.task_device`` and the stages that use it."""

import numpy as np
import pytest
import torch

import lamina
from lamina.cluster import task_device
from lamina.stages.registration import RegisterOptions, register_pair, register_pairs

DEFAULTS = RegisterOptions()


def test_task_device_honours_the_override_and_defaults_to_what_torch_sees(monkeypatch):
    monkeypatch.delenv("LAMINA_DEVICE", raising=False)
    assert task_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("LAMINA_DEVICE", "cpu")
    assert task_device() == torch.device("cpu")


def _blobs(shift=(0.0, 0.0), angle=0.0, n=64):
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float64)
    c = (n - 1) / 2
    ca, sa = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    u, v = ca * (xs - c) + sa * (ys - c) + c - shift[0], -sa * (xs - c) + ca * (ys - c) + c - shift[1]
    img = np.zeros((2, n, n))
    for ch, (bx, by, r) in enumerate([(20, 24, 6), (40, 38, 9)]):
        img[ch] = np.exp(-((u - bx) ** 2 + (v - by) ** 2) / (2 * r**2))
    img[0] += 0.5 * np.exp(-((u - 44) ** 2 + (v - 16) ** 2) / 18)
    return img.astype(np.float32)


def test_register_pair_runs_on_the_device_it_is_given():
    fixed, moving = _blobs(), _blobs(shift=(3.0, -2.0), angle=6.0)
    row = register_pair(moving, fixed, DEFAULTS, device=torch.device("cpu"))
    assert row["ncc_after"] > 0.95 > row["ncc_before"]


def test_pairs_registered_as_one_batch_get_what_each_gets_alone():
    """``register_pairs`` (the batch a task runs) against ``register_pair`` one by one, with a blank section in
    the batch: same transforms and QC numbers; the blank pair is flagged, not registered."""
    fixed = _blobs()
    pairs = [
        (_blobs(shift=(3.0, -2.0), angle=6.0), fixed),
        (np.zeros_like(fixed), fixed),
        (_blobs(shift=(-4.0, 1.0), angle=-25.0), fixed),
    ]
    cpu = torch.device("cpu")
    batch = register_pairs(pairs, DEFAULTS, seeds=[1, 2, 3], device=cpu)
    for (moving, fixed_), seed, row in zip(pairs, [1, 2, 3], batch):
        alone = register_pair(moving, fixed_, DEFAULTS, seed=seed, device=cpu)
        np.testing.assert_allclose(row["transform"], alone["transform"], atol=1e-9)
        assert (row["method"], row["flag"], row["n_inliers"]) == (alone["method"], alone["flag"], alone["n_inliers"])
        np.testing.assert_allclose([row["ncc_after"], row["overlap"]], [alone["ncc_after"], alone["overlap"]])
    assert batch[1]["method"] == "none" and "blank" in batch[1]["flag"]
    assert batch[0]["ncc_after"] > 0.95 and batch[2]["ncc_after"] > 0.95


@pytest.mark.gpu
def test_register_pair_on_gpu_matches_cpu():
    fixed, moving = _blobs(), _blobs(shift=(3.0, -2.0), angle=6.0)
    cpu = register_pair(moving, fixed, DEFAULTS, device=torch.device("cpu"))
    gpu = register_pair(moving, fixed, DEFAULTS, device=torch.device("cuda"))
    pts = np.array([[10.0, 10.0, 1.0], [50.0, 50.0, 1.0]])
    assert np.abs(pts @ gpu["transform"].T - pts @ cpu["transform"].T).max() < 0.5  # pixels


@pytest.mark.gpu
def test_align_and_reconstruct_on_gpu_workers(tmp_path):
    """The stages' tasks place their torch work on the worker's GPU and reach CPU-level accuracy."""
    from lamina.kernels.ransac import rigid_residuals

    ph = lamina.datasets.phantom(n_cells=12_000, n_sections=4, n_genes=6, seed=2)
    client = lamina.connect(gpu=True)
    try:
        assert set(client.run(lambda: task_device().type).values()) == {"cuda"}
        atlas = lamina.ingest(ph, tmp_path / "g.lamina.zarr", client=client)
        lamina.align(atlas, client)
        truth = np.concatenate([xyz for s in range(4) for _, xyz in ph.section_chunks(s)])[:, :2]
        xy = np.stack([atlas.root[f"aligned/{k}"][...] for k in ("x", "y")], 1).astype(np.float64)
        assert np.median(rigid_residuals(xy, truth)) < 40.0
        lamina.reconstruct(atlas, client=client, n_pcs=4, steps=20, subsample=128)
        assert np.isfinite(np.asarray(atlas.root["interpolated/x"][:1000])).all()
    finally:
        client.close()


@pytest.mark.gpu
def test_lddmm_batch_on_gpu_matches_cpu():
    """One batched LDDMM of three sections on the GPU against the same batch on the CPU (float32)."""
    from lamina.kernels import lddmm

    fixed = torch.from_numpy(np.stack([_blobs(angle=a) for a in (0.0, 3.0, -3.0)]))
    moving = torch.from_numpy(
        np.stack([_blobs(shift=s, angle=a) for s, a in [((2.0, 1.0), 1.0), ((0.0, -2.0), 4.0), ((-1.5, 0.5), -2.0)]])
    )
    kw = dict(steps=4, alpha=4.0, iterations=(60, 30), dtype=torch.float32, mass=True)
    v_cpu, _ = lddmm.register_batch(fixed, moving, **kw)
    v_gpu, _ = lddmm.register_batch(fixed.cuda(), moving.cuda(), **kw)
    d_cpu, d_gpu = lddmm.integrate_inverse(v_cpu), lddmm.integrate_inverse(v_gpu).cpu()
    assert float((d_cpu - d_gpu).abs().max()) < 0.05  # pixels
