"""First steps from Python: a table in memory -> an aligned atlas -> pandas / AnnData; then the same on a cluster.

python examples/quickstart.py
"""

import numpy as np
import pandas as pd

import lamina

if __name__ == "__main__":
    ph = lamina.datasets.phantom(n_cells=20_000, n_sections=4, n_genes=40, seed=1)
    print(ph.describe())
    # any table with one row per cell: here the phantom's, as a pandas DataFrame
    table = pd.concat([frame for s in range(4) for frame, _ in ph.section_chunks(s)], ignore_index=True)

    # small atlas: no client, the stages run on threads in this process
    atlas = lamina.ingest(
        table, "quickstart.lamina.zarr", section="section", cell_type="cell_type", cell_id="cell_id", genes="rest",
        section_spacing=35.0, overwrite=True,
    )  # fmt: skip
    lamina.align(atlas)
    print(atlas.info())

    cells = atlas.cells()  # raw x, y, z and aligned_x, aligned_y, aligned_z per cell
    print(cells.head())
    moved = np.hypot(cells.aligned_x - cells.x, cells.aligned_y - cells.y)
    print(f"registration moved cells by {moved.median():.0f} um (median)")
    adata = atlas.to_anndata()  # obs_names = cell ids, obsm["spatial"] = aligned 3D (squidpy's key)
    print(adata)

    # a larger job on a local cluster; leaving the block shuts the cluster down
    with lamina.connect() as client:
        lamina.section_stats(atlas, client=client)  # up to date: skipped
        mean_expr = atlas.to_xarray()["X"].mean("cell").compute()  # chunk by chunk on the workers
    print("mean expression of the first genes:", np.round(mean_expr.values[:5], 3))
