"""The embedding protocol of benchmarks/embed.py: data loading (osmFISH) and the scores, shared with the peers'
script (which runs in its own virtual environment and imports only numpy, pandas and scikit-learn from here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
OSMFISH = DATA / "osmfish"
#: um per pixel of the osmFISH mosaic coordinates: not documented by the source. 0.065 um (a 100x objective on a
#: 6.5 um camera pixel) gives a median nearest-neighbour distance of 10.6 um between cells, as expected for cortex.
OSMFISH_UM_PER_PX = 0.065
FOLDS = 5
BLOCKS_PER_FOLD = 5


def osmfish_table(with_counts: bool = False):
    """All 5,328 cells with coordinates and expression: x, y (um), ClusterName, Region, then log1p(10^4 counts /
    total) of the 33 genes (and the raw counts ``[cell, gene]`` with ``with_counts``). Cells of Region
    "Excluded" stay (they are tissue: neighbours of the others); the scores use the 4,839 others."""
    coords = pd.read_csv(OSMFISH / "osmFISH_prep_cell_coordinates.txt", sep="\t").set_index("ID")
    meta = pd.read_csv(OSMFISH / "osmFISH_prep_cell_metadata.txt", sep="\t").set_index("CellID")
    expr = pd.read_csv(OSMFISH / "osmFISH_prep_expression.txt", sep="\t", index_col=0).T
    cells = expr.index.intersection(coords.index).intersection(meta.index)
    counts = expr.loc[cells].astype(np.float64)
    total = counts.sum(1).replace(0, 1.0)
    logn = np.log1p(counts.div(total, axis=0) * 1e4)
    out = pd.DataFrame(
        {
            "x": coords.loc[cells, "X"].to_numpy() * OSMFISH_UM_PER_PX,
            "y": coords.loc[cells, "Y"].to_numpy() * OSMFISH_UM_PER_PX,
            "ClusterName": meta.loc[cells, "ClusterName"].astype(str).to_numpy(),
            "Region": meta.loc[cells, "Region"].astype(str).to_numpy(),
        },
        index=pd.Index(cells, name="cell_id"),
    )
    logn.index = out.index
    table = pd.concat([out, logn.astype(np.float32)], axis=1).reset_index()
    return (table, counts.to_numpy(np.float32)) if with_counts else table


def spatial_folds(xy: np.ndarray, seed: int = 0) -> np.ndarray:
    """Fold ``[n]`` of each cell: ``FOLDS x BLOCKS_PER_FOLD`` k-means blocks of the coordinates, dealt to the
    folds at random (each fold is 5 compact patches of tissue, so a probe cannot lean on a cell's neighbours
    being in its training set)."""
    from sklearn.cluster import KMeans

    blocks = KMeans(FOLDS * BLOCKS_PER_FOLD, n_init=3, random_state=seed).fit_predict(xy)
    deal = np.random.default_rng(seed).permutation(FOLDS * BLOCKS_PER_FOLD) % FOLDS
    return deal[blocks]


def domain_scores(emb: np.ndarray, labels: np.ndarray, k: int, seeds=(0, 1, 2)) -> dict:
    """Spatial domains by k-means (k = number of regions) of the embedding as it is (its geometry is the
    method's: no rescaling of dimensions): ARI and NMI vs the labels, mean over ``seeds``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    z = np.asarray(emb, np.float64)
    ari, nmi = [], []
    for s in seeds:
        pred = KMeans(k, n_init=10, random_state=s).fit_predict(z)
        ari.append(adjusted_rand_score(labels, pred))
        nmi.append(normalized_mutual_info_score(labels, pred))
    return {"ari": float(np.mean(ari)), "nmi": float(np.mean(nmi))}


def probe_f1(emb: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> float:
    """Linear probe: logistic regression on the standardised embedding, trained on 4 spatial folds and scored on
    the fifth (macro-F1 over the classes of the held-out fold), mean over the 5 folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    scores = []
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        scaler = StandardScaler().fit(emb[train])
        clf = LogisticRegression(max_iter=3000, C=1.0).fit(scaler.transform(emb[train]), labels[train])
        pred = clf.predict(scaler.transform(emb[test]))
        scores.append(f1_score(labels[test], pred, average="macro", labels=np.unique(labels[test])))
    return float(np.mean(scores))


def score(emb: np.ndarray, table: pd.DataFrame) -> dict:
    """ARI / NMI of k-means domains and the region / cell-type probes, on the cells not marked Excluded."""
    keep = (table["Region"] != "Excluded").to_numpy()
    e = np.asarray(emb, np.float64)[keep]
    t = table[keep]
    folds = spatial_folds(t[["x", "y"]].to_numpy())
    regions, types = t["Region"].to_numpy(), t["ClusterName"].to_numpy()
    out = domain_scores(e, regions, k=len(np.unique(regions)))
    out["region_f1"] = probe_f1(e, regions, folds)
    out["type_f1"] = probe_f1(e, types, folds)
    return out
