"""her2st patients A-D as the benchmarks use them: per patient, the most variable genes' counts and
log-normalised values (log1p of counts per 10,000), spot obs unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PATH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "her2st" / "her2st_all_sections.h5ad"


def her2st_patients(n_genes: int, patients: str = "ABCD") -> list[tuple]:
    """``[(patient, obs, counts [n, n_genes], lognorm [n, n_genes], var)]``; genes ranked by the variance of
    the log-normalised values within the patient. Empty (with a message) when the data set is absent."""
    import anndata as ad

    if not PATH.exists():
        print(f"skip her2st: {PATH} not present (see ../shared/data/README.md)")
        return []
    full = ad.read_h5ad(PATH)
    out = []
    for patient in patients:
        a = full[full.obs.patient == patient]
        X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
        logn = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)
        keep = np.argsort(logn.var(0))[::-1][:n_genes]
        out.append((patient, a.obs.copy(), X[:, keep], logn[:, keep], a.var.iloc[keep].copy()))
    return out
