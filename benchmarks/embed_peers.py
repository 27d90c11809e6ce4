"""One peer method of benchmarks/embed.py, run in the peers' own virtual environment (kept apart from lamina's, so
that neither set of pins bends the other: benchmarks/embed_peers.requirements.txt).

    <peers-venv>/bin/python benchmarks/embed_peers.py METHOD INPUT.npz OUTPUT.npy

INPUT.npz holds ``counts`` [cell, gene] (raw), ``logn`` (log1p of 10^4 counts / total), ``xy`` (um) and
``genes``. The embedding [cell, dim] goes to OUTPUT.npy; a last line ``RESULT {"seconds": ...}`` gives the
method's own wall time (without the imports). Settings are the methods' documented defaults unless stated.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _adata(data, layer="logn"):
    import anndata as ad
    import pandas as pd

    adata = ad.AnnData(X=np.asarray(data[layer], np.float32), var=pd.DataFrame(index=[str(g) for g in data["genes"]]))
    adata.obsm["spatial"] = np.asarray(data["xy"], np.float64)
    adata.obs["x"], adata.obs["y"] = adata.obsm["spatial"][:, 0], adata.obsm["spatial"][:, 1]
    return adata


def pca(adata, n=30):
    import scanpy as sc

    sc.pp.scale(adata)
    sc.tl.pca(adata, n_comps=min(n, adata.n_vars - 1), random_state=0)
    return adata.obsm["X_pca"]


def banksy(data, lam: float):
    """pybanksy 1.3.5: k_geom 15, scaled Gaussian weights, AGF max_m 1, on z-scored log-normalised genes,
    then its PCA to 20 dimensions (the tutorial's settings)."""
    import scanpy as sc
    from banksy.embed_banksy import generate_banksy_matrix
    from banksy.initialize_banksy import initialize_banksy
    from banksy_utils.umap_pca import pca_umap

    adata = _adata(data)
    sc.pp.scale(adata)
    t = time.perf_counter()
    bd = initialize_banksy(
        adata,
        ("x", "y", "spatial"),
        num_neighbours=15,
        nbr_weight_decay="scaled_gaussian",
        max_m=1,
        plt_edge_hist=False,
        plt_nbr_weights=False,
        plt_agf_angles=False,
        plt_theta=False,
    )
    bd, _ = generate_banksy_matrix(adata, bd, [lam], max_m=1, verbose=False)
    pca_umap(bd, pca_dims=[20], add_umap=False, plt_remaining_var=False)
    return bd["scaled_gaussian"][lam]["adata"].obsm["reduced_pc_20"], time.perf_counter() - t


def cellcharter(data):
    """cellcharter 0.3.7: Delaunay graph (squidpy), long links removed (its default 99th percentile), mean of
    the neighbours' PCs over 3 layers concatenated with the cell's own (aggregate_neighbors(n_layers=3)). Its
    papers feed scVI latents; here the same 30 PCs lamina's niche starts from."""
    import cellcharter as cc
    import squidpy as sq

    adata = _adata(data)
    t = time.perf_counter()
    pca(adata)
    sq.gr.spatial_neighbors(adata, coord_type="generic", delaunay=True)
    cc.gr.remove_long_links(adata)
    cc.gr.aggregate_neighbors(adata, n_layers=3, use_rep="X_pca", out_key="X_cellcharter")
    return np.asarray(adata.obsm["X_cellcharter"]), time.perf_counter() - t


def stagate(data, epochs: int):
    """stagate-modern (STAGATE_pyG): radius graph of 40 um (about 6 neighbours per cell here), hidden [512, 30],
    ``epochs`` epochs (200 here, its default 1000 ran over 14 minutes on 2 CPU cores), on the log-normalised
    genes (all 33 are 'highly variable')."""
    import STAGATE_pyG
    import torch

    torch.manual_seed(0)
    adata = _adata(data)
    t = time.perf_counter()
    STAGATE_pyG.Cal_Spatial_Net(adata, rad_cutoff=40.0, verbose=False)
    adata = STAGATE_pyG.train_STAGATE(adata, n_epochs=epochs, verbose=False)
    return np.asarray(adata.obsm["STAGATE"]), time.perf_counter() - t


def graphst(data, epochs: int):
    """graphst-modern: its own preprocessing (seurat_v3 HVGs from raw counts, normalise, log, scale), its
    3-nearest-neighbour graph, ``epochs`` epochs (200 here, of its default 600, for CPU time), on CPU."""
    import torch
    from GraphST import GraphST

    adata = _adata(data, "counts")
    t = time.perf_counter()
    model = GraphST.GraphST(adata, device=torch.device("cpu"), epochs=epochs)
    adata = model.train()
    return np.asarray(adata.obsm["emb"]), time.perf_counter() - t


METHODS = {
    "banksy_0.2": lambda d: banksy(d, 0.2),
    "banksy_0.8": lambda d: banksy(d, 0.8),
    "cellcharter": cellcharter,
    "stagate": lambda d: stagate(d, 200),
    "graphst": lambda d: graphst(d, 200),
}


def main(argv) -> int:
    method, src, out = argv
    data = dict(np.load(src, allow_pickle=False))
    emb, seconds = METHODS[method](data)
    np.save(out, np.asarray(emb, np.float32))
    print("RESULT " + json.dumps({"seconds": seconds, "dim": int(np.asarray(emb).shape[1])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
