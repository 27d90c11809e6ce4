"""The streamed PCA against the exact one: the subspace of its components overlaps the exact top-k subspace
(mean squared cosine of the principal angles, ``|V_exact^T V|_F^2 / k``) by >= 0.95 with the defaults."""

from __future__ import annotations

import numpy as np
import pytest

import lamina


def _overlap(atlas, X: np.ndarray, k: int) -> float:
    mu = X.mean(0)
    sd = X.std(0, ddof=1)
    Z = (X - mu) / np.where(sd > 1e-6, sd, 1.0)
    # exact top-k right singular vectors through the smaller Gram matrix
    if Z.shape[0] < Z.shape[1]:
        lam, U = np.linalg.eigh(Z @ Z.T)
        U = U[:, np.argsort(lam)[::-1][:k]]
        V = Z.T @ U
    else:
        lam, V = np.linalg.eigh(Z.T @ Z)
        V = V[:, np.argsort(lam)[::-1][:k]]
    V /= np.linalg.norm(V, axis=0)
    C = np.asarray(atlas.root["pca/components"][...], np.float64)
    return float(np.linalg.norm(V.T @ C.T) ** 2 / k)


def test_pca_matches_the_exact_subspace_on_the_phantom(tmp_path):
    ph = lamina.datasets.phantom(n_cells=6000, n_sections=3, n_genes=300, seed=3)
    atlas = lamina.ingest(ph, tmp_path / "ph.lamina.zarr")
    lamina.pca(atlas, n_pcs=50)
    X = np.asarray(atlas.root["X"][...], np.float64)
    assert _overlap(atlas, X, 50) >= 0.95
    ratio = np.asarray(atlas.root["pca/explained_variance_ratio"][...])
    assert np.all(np.diff(ratio) <= 1e-6) and 0 < ratio.sum() <= 1


def test_pca_matches_the_exact_subspace_on_her2st(tmp_path, data_dir):
    import anndata as ad

    path = data_dir / "her2st" / "her2st_all_sections.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not present (see ../shared/data/README.md)")
    a = ad.read_h5ad(path)
    a = a[a.obs.patient == "A"]
    X = a.X.toarray()
    keep = (X > 0).sum(0) > 0
    X = np.log1p(X[:, keep] / np.maximum(X.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    b = ad.AnnData(X, obs=a.obs[["section", "pixel_x", "pixel_y"]].copy())
    b.var_names = np.asarray(a.var_names[keep])
    b.obsm["spatial"] = a.obs[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    atlas = lamina.ingest(b, tmp_path / "a.lamina.zarr", section="section", genes="rest")
    lamina.pca(atlas, n_pcs=50)
    # 2,065 spots x 16,938 genes: the flat spectrum where 4 passes of subspace iteration reached 0.37
    assert _overlap(atlas, np.asarray(atlas.root["X"][...], np.float64), 50) >= 0.95


def test_pca_reads_x_gene_chunk_by_gene_chunk(tmp_path, monkeypatch):
    """A wide store (1200 genes in chunks of 64): the same components and PCs whether a task keeps its cell chunk's
    gene blocks or reads each one twice, the PCs equal the projection of the whole matrix, and one product holds
    a few gene blocks, not the whole rows."""
    import importlib
    import tracemalloc

    from lamina.kernels.pca import project

    pca_stage = importlib.import_module("lamina.stages.pca")  # the module: lamina.stages.pca is its function

    ph = lamina.datasets.phantom(n_cells=4000, n_sections=2, n_genes=1200, seed=4)
    atlas = lamina.ingest(ph, tmp_path / "wide.lamina.zarr", gene_chunk=64, cell_chunk=2048)
    assert atlas.root["X"].chunks == (2048, 64)
    lamina.pca(atlas, n_pcs=20)
    held = {k: np.asarray(atlas.root[f"pca/{k}"][...]) for k in ("components", "pcs")}
    X = np.asarray(atlas.root["X"][...], np.float64)
    assert _overlap(atlas, X, 20) >= 0.95
    g = atlas.root["pca"]
    whole = project(X, *(np.asarray(g[k][...]) for k in ("mean", "scale", "components")))
    assert np.abs(held["pcs"] - whole).max() <= 1e-3 * np.abs(whole).max()

    monkeypatch.setattr(pca_stage, "HOLD_BYTES", 0)  # every block read twice
    reads = []
    blocks = pca_stage.arrays.column_blocks
    monkeypatch.setattr(pca_stage.arrays, "column_blocks", lambda *a, **k: reads.append(a[1:3]) or blocks(*a, **k))
    lamina.pca(atlas, n_pcs=20, force=True)
    # per cell chunk (2): 8 Krylov products and the Rayleigh-Ritz one read it twice each, the projection once
    assert len(reads) == 2 * (2 * 9 + 1), len(reads)
    for k, v in held.items():
        np.testing.assert_allclose(np.asarray(atlas.root[f"pca/{k}"][...]), v, rtol=0, atol=1e-5)

    mean, scale = np.asarray(g["mean"][...], np.float64), np.asarray(g["scale"][...], np.float64)
    W = np.linalg.qr(np.random.default_rng(0).normal(size=(1200, 30)))[0]
    tracemalloc.start()
    out = pca_stage._gram_times(atlas.path, 0, 2048, mean, scale, W)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    Z = (X[:2048] - mean) / scale
    np.testing.assert_allclose(out, Z.T @ (Z @ W), rtol=1e-9, atol=1e-6)
    row_chunk = 2048 * 1200 * 8  # 19.7 MB: a task held it (and its standardised copy) before
    assert peak < row_chunk / 4, peak
