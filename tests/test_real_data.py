"""Ingest of the three shipped real data sets (skipped when ../shared/data is absent)."""

import json

import numpy as np
from conftest import need

import lamina


def test_dlpfc_csv(tmp_path, data_dir):
    path = need(data_dir / "dlpfc" / "dlpfc_12_sections_spots_layers.csv.gz")
    scale = json.loads((data_dir / "dlpfc/raw/151507/scalefactors_json.json").read_text())
    # Space Ranger's spot_diameter_fullres is the pixel span of a 65 um circle around each 55 um spot
    um_per_px = 65.0 / scale["spot_diameter_fullres"]
    atlas = lamina.ingest(
        path,
        tmp_path / "dlpfc.lamina.zarr",
        x="pxl_col_fullres",
        y="pxl_row_fullres",
        section="section",
        cell_type="layer",
        cell_id="barcode",
        obs=["donor"],
        units="px",
        pixel_size=um_per_px,
        na_values=["NA"],  # written by R: NA is a missing layer here
    )
    sec = atlas.sections
    assert atlas.n_cells == 47_681 and len(sec) == 12
    assert sec.n_cells.min() == 3_460 and sec.n_cells.max() == 4_789
    assert sec.set_index("id").n_cells["151507"] == 4_226
    assert atlas.categories("cell_type") == ["L1", "L2", "L3", "L4", "L5", "L6", "WM"]
    obs = atlas.obs(sections=["151507"])
    assert obs.cell_type.isna().sum() > 0  # the 'NA' spots stay missing, not a category
    # neighbouring Visium spots are 100 um apart centre to centre (the scale factor is approximate)
    xy = obs[["x", "y"]].to_numpy()
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    assert 85 < np.median(d[:, 1]) < 105


def test_merfish_paste_positions_and_metadata(tmp_path, data_dir):
    folder = need(data_dir / "merfish_moffitt")
    atlas = lamina.ingest(
        folder / "merFISH_3D_data_cell_locations.txt",
        tmp_path / "m.lamina.zarr",
        paste=[folder / "merFISH_3D_metadata.txt"],
        section="layer_ID",
        z="z",
        cell_type="orig_cell_types",
    )
    sec = atlas.sections
    assert atlas.n_cells == 73_655 and len(sec) == 12
    np.testing.assert_array_equal(sec.z, np.arange(-290, 261, 50))
    assert 5_500 < sec.n_cells.min() and sec.n_cells.max() < 6_700
    assert len(atlas.categories("cell_type")) == 16
    ext = atlas.obs(sections=[0])[["x", "y"]].agg(["min", "max"])
    assert 1500 < (ext.loc["max"] - ext.loc["min"]).max() < 2100  # ~1.8 mm field


def test_her2st_h5ad_sparse_counts(tmp_path, data_dir):
    import h5py

    path = need(data_dir / "her2st" / "her2st_all_sections.h5ad")
    with h5py.File(path, "r") as f:
        total = float(np.asarray(f["X/data"][...], dtype=np.float64).sum())
        x0 = f["X/indptr"][:3]
    atlas = lamina.ingest(
        path,
        tmp_path / "h.lamina.zarr",
        x="array_x",
        y="array_y",
        section="section",
        cell_type="cluster",
        obs=["patient"],
        genes="rest",
        cell_id="_index",
        units="px",
        pixel_size=200.0,
    )  # legacy ST: spot centres 200 um apart
    assert atlas.n_cells == 13_620 and atlas.n_genes == 18_758 and atlas.n_sections == 36
    X = atlas.to_xarray()["X"].data
    assert X.chunks[1][0] == 512  # gene-chunked
    np.testing.assert_allclose(float(X.sum(dtype=np.float64).compute()), total, rtol=1e-9)
    assert x0[0] == 0
    a = atlas.obs(sections=["A1"])
    assert len(a) == 346 and set(a.patient.astype(str)) == {"A"}
    assert all(c.isdigit() for c in atlas.categories("cell_type"))
