"""First steps: a phantom atlas, ingested and inspected from Python.

python examples/quickstart.py
"""

import numpy as np

import lamina

if __name__ == "__main__":
    client = lamina.connect()
    ph = lamina.datasets.phantom(n_cells=50_000, n_sections=8, n_genes=40, seed=1)
    print(ph.describe())
    atlas = lamina.ingest(ph, "quickstart.lamina.zarr", overwrite=True, client=client)
    lamina.section_stats(atlas, client=client)
    print(atlas.info())

    ds = atlas.to_xarray()  # lazy
    mean_expr = ds["X"].mean("cell").compute()  # computed chunk by chunk on the cluster
    print("mean expression of the first genes:", np.round(mean_expr.values[:5], 3))

    one = atlas.section("S003")
    xy = np.stack([one["x"].values, one["y"].values], axis=1)
    true_xy = ph.to_true(3, xy)  # exact ground truth for this section
    print(f"section S003: {len(xy):,} cells; first cell observed {xy[0]} um, truly at {true_xy[0].round(2)} um")
    client.close()
