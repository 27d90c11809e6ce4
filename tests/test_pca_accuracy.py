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
