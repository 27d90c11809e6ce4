"""The Python API as scanpy / squidpy users drive it: in-memory inputs, results out, one writer per store."""

import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import zarr

import lamina
from lamina.cli import main
from lamina.errors import InputError, StoreLockedError

GENES = [f"g{i}" for i in range(6)]


@pytest.fixture(scope="module")
def table():
    """Two sections of 300 cells, labels with a real "NA" label and two missing ones, shuffled rows."""
    rng = np.random.default_rng(0)
    n = 600
    df = pd.DataFrame(
        {
            "x": rng.uniform(0, 800, n),
            "y": rng.uniform(0, 600, n),
            "slice": np.repeat(["s1", "s2"], n // 2),
            "ct": rng.choice(["NA", "T", "B"], n).astype(object),
            "id": [f"c{i}" for i in range(n)],
            "area": rng.uniform(20, 80, n),
            **{g: rng.poisson(1.0 + i, n).astype(float) for i, g in enumerate(GENES)},
        }
    )
    df.loc[[5, 400], "ct"] = None
    df.loc[[7], "area"] = np.nan
    return df.sample(frac=1.0, random_state=1).reset_index(drop=True)


KW = dict(x="x", y="y", section="slice", cell_type="ct", cell_id="id", obs=["area"], genes=GENES)


def _same_atlas(a, b):
    pd.testing.assert_frame_equal(a.obs(), b.obs())
    np.testing.assert_array_equal(a.root["X"][...], b.root["X"][...])
    assert a.categories("cell_type") == b.categories("cell_type")


def test_dataframe_csv_and_parquet_give_the_same_atlas(tmp_path, table):
    from_frame = lamina.ingest(table, tmp_path / "df.lamina.zarr", **KW)
    table.to_csv(tmp_path / "t.csv", index=False)
    table.to_parquet(tmp_path / "t.parquet")
    from_csv = lamina.ingest(tmp_path / "t.csv", tmp_path / "csv.lamina.zarr", **KW)
    from_parquet = lamina.ingest(tmp_path / "t.parquet", tmp_path / "pq.lamina.zarr", **KW)
    _same_atlas(from_frame, from_csv)
    _same_atlas(from_frame, from_parquet)
    obs = from_csv.obs()
    assert from_csv.categories("cell_type") == ["B", "NA", "T"]  # "NA" is a label, not a missing value
    assert int(obs.cell_type.isna().sum()) == 2 and int(obs.area.isna().sum()) == 1
    # the input order comes back from input_row; a section's rows keep their input order
    back = obs.sort_values("input_row")
    np.testing.assert_array_equal(back.cell_id.to_numpy(), table.id.to_numpy())
    np.testing.assert_array_equal(back.input_row.to_numpy(), np.arange(len(table)))
    # the same table again is a no-op; a changed one needs overwrite
    again = lamina.ingest(table, tmp_path / "df.lamina.zarr", **KW)
    assert again.stage_records()["ingest"]["finished"] == from_frame.stage_records()["ingest"]["finished"]
    changed = table.assign(x=table.x + 1.0)
    with pytest.raises(lamina.StoreError, match="overwrite"):
        lamina.ingest(changed, tmp_path / "df.lamina.zarr", **KW)


def test_csv_missing_numbers_are_missing_but_text_na_stays(tmp_path):
    (tmp_path / "t.csv").write_text(
        "x,y,section,label,depth\n1,2,a,NA,3.5\n4,5,a,T,NA\n6,7,a,,\n8,9,a,NA,1\n"
        + "".join(f"{i},{i + 1},a,T,2\n" for i in range(10, 30))
    )
    atlas = lamina.ingest(tmp_path / "t.csv", tmp_path / "a.lamina.zarr", cell_type="label", obs=["depth"])
    obs = atlas.obs()
    assert atlas.categories("cell_type") == ["NA", "T"]
    assert obs.cell_type.isna().tolist()[:4] == [False, False, True, False]
    assert obs.depth.dtype.kind == "f" and obs.depth.isna().tolist()[:4] == [False, True, True, False]


def test_dict_of_sections_and_anndata_in_memory(tmp_path, table):
    import anndata as ad
    import scipy.sparse as sp

    per_section = {sid: part.drop(columns="slice") for sid, part in table.groupby("slice", sort=False)}
    kw = {**KW, "section": None}
    from_dict = lamina.ingest(per_section, tmp_path / "dict.lamina.zarr", **kw)
    assert from_dict.sections.id.tolist() == list(per_section)
    assert from_dict.sections.n_cells.tolist() == [len(p) for p in per_section.values()]

    adata = ad.AnnData(
        X=sp.csr_matrix(table[GENES].to_numpy(np.float32)),
        obs=table[["slice", "ct", "area"]].set_axis(pd.Index(table.id.to_numpy())),
        var=pd.DataFrame(index=GENES),
    )
    adata.obsm["spatial"] = table[["x", "y"]].to_numpy()
    from_adata = lamina.ingest(
        adata,
        tmp_path / "ad.lamina.zarr",
        section="slice",
        cell_type="ct",
        cell_id="_index",
        obs=["area"],
        genes="rest",
    )
    reference = lamina.ingest(table, tmp_path / "df.lamina.zarr", **KW)
    _same_atlas(from_adata, reference)
    assert from_adata.stage_records()["ingest"]["params"]["spatial_key"] == "spatial"  # found, not guessed at x
    with pytest.raises(InputError, match="section 'bad'.*DataFrame, an AnnData or a file"):
        lamina.ingest({"bad": 3}, tmp_path / "bad.lamina.zarr")


def test_pixels_of_unknown_size_are_recorded(tmp_path, table):
    atlas = lamina.ingest(table, tmp_path / "px.lamina.zarr", units="px", **KW)
    assert atlas.attrs["units"] == "px" and atlas.attrs["scale_known"] is False
    np.testing.assert_allclose(atlas.cells().x.sort_index().to_numpy()[:3], atlas.obs().x.to_numpy()[:3])
    assert atlas.sections.n_cells.sum() == len(table)
    with pytest.raises(lamina.ConfigError, match="pixel_size applies to units='px' only"):
        lamina.ingest(table, tmp_path / "bad.lamina.zarr", pixel_size=0.5, **KW)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    ph = lamina.datasets.phantom(n_cells=6000, n_sections=3, n_genes=12, seed=5)
    atlas = lamina.ingest(ph, tmp_path_factory.mktemp("api") / "a.lamina.zarr", cell_chunk=1024)
    lamina.align(atlas)
    lamina.pca(atlas, n_pcs=4)
    return atlas


def test_cells_give_raw_and_aligned_positions_and_the_affine_alone(aligned, tmp_path):
    cells = aligned.cells()
    assert list(cells.columns[:10]) == [
        "section", "cell_id", "input_row", "x", "y", "z", "aligned_x", "aligned_y", "aligned_z", "cell_type"
    ]  # fmt: skip
    np.testing.assert_array_equal(cells.aligned_x.to_numpy(), aligned.root["aligned/x"][...])
    np.testing.assert_array_equal(
        cells.z.to_numpy(), aligned.sections.z.to_numpy(np.float32)[aligned.obs().section.cat.codes]
    )
    pd.testing.assert_frame_equal(aligned.obs(aligned=True), cells)
    # the affine alone is what align(fine=False) would have written, without re-running anything here
    affine = aligned.cells(aligned="affine")
    copy = tmp_path / "affine.lamina.zarr"
    shutil.copytree(aligned.path, copy)
    other = lamina.Atlas.open(copy)
    lamina.align(other, fine=False)
    np.testing.assert_allclose(affine.aligned_x.to_numpy(), other.root["aligned/x"][...], atol=1e-3)
    np.testing.assert_allclose(affine.aligned_y.to_numpy(), other.root["aligned/y"][...], atol=1e-3)
    moved = np.hypot(affine.aligned_x - cells.aligned_x, affine.aligned_y - cells.aligned_y)
    assert 0.1 < float(moved.median()) < 200.0  # the refined warp moves cells, by um, not mm
    xy = cells.loc[cells.section == "S001", ["x", "y"]].to_numpy()[:5]
    np.testing.assert_allclose(
        lamina.to_atlas(aligned, "S001", xy, stage="affine"),
        affine.loc[affine.section == "S001", ["aligned_x", "aligned_y"]].to_numpy()[:5],
        atol=1e-3,
    )
    one = aligned.cells(sections=["S002"], columns=["cell_type"])
    assert one.index[0] == aligned.sections.cell_start.iloc[2] and "cell_type" in one and len(one) == one.index.size


def test_anndata_export_follows_scanpy_conventions(aligned):
    adata = aligned.to_anndata()
    cells = aligned.cells()
    assert list(adata.obs_names[:3]) == [str(v) for v in cells.cell_id[:3]]  # cell ids, not 0..n
    assert adata.obs_names.is_unique
    np.testing.assert_allclose(adata.obsm["spatial"], cells[["aligned_x", "aligned_y", "aligned_z"]].to_numpy())
    np.testing.assert_allclose(adata.obsm["spatial_raw"], cells[["x", "y"]].to_numpy())
    np.testing.assert_allclose(adata.obsm["X_pca"], aligned.root["pca/pcs"][...])
    assert {"section", "z", "input_row", "cell_type"} <= set(adata.obs.columns)
    assert "x" not in adata.obs and "aligned_x" not in adata.obs
    assert adata.X.dtype == np.float32
    dense = aligned.to_anndata(sparse=False).X
    sparse = aligned.to_anndata(sparse=True).X
    np.testing.assert_array_equal(sparse.toarray(), dense)
    assert sparse.format == "csr"


def test_anndata_of_a_sparse_table_is_sparse_and_missing_labels_stay_missing(tmp_path, table):
    sparse_table = table.copy()
    sparse_table[GENES] = np.where(np.arange(len(table))[:, None] % 4 == 0, sparse_table[GENES], 0.0)
    atlas = lamina.ingest(sparse_table, tmp_path / "s.lamina.zarr", **KW)
    adata = atlas.to_anndata()
    assert adata.X.format == "csr" and adata.X.nnz < 0.3 * adata.X.shape[0] * adata.X.shape[1]
    assert int(adata.obs.cell_type.isna().sum()) == 2
    assert list(adata.obs.cell_type.cat.categories) == ["B", "NA", "T"]  # no "nan" category
    assert adata.obs_names.tolist()[:1] == [str(atlas.obs().cell_id[0])]


SQUIDPY = """
import sys, anndata, numpy as np, squidpy as sq
adata = anndata.read_h5ad(sys.argv[1])
adata = adata[adata.obs.cell_type.notna()].copy()  # squidpy's enrichment needs every cell labelled
sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=6)
sq.gr.nhood_enrichment(adata, cluster_key="cell_type", n_perms=20, seed=0)
z = adata.uns["cell_type_nhood_enrichment"]["zscore"]
print(z.shape[0], z.shape[1], bool(np.isfinite(z).all()))
"""


def test_squidpy_reads_the_export(aligned, tmp_path):
    """squidpy's neighbours + enrichment on the export, in this interpreter when it has squidpy, else in the
    one ``LAMINA_SQUIDPY_PYTHON`` names (squidpy's dependencies are not lamina's to install)."""
    import importlib.util

    python = sys.executable if importlib.util.find_spec("squidpy") else os.environ.get("LAMINA_SQUIDPY_PYTHON")
    if not python:
        pytest.skip("squidpy is not installed here and LAMINA_SQUIDPY_PYTHON names no interpreter that has it")
    aligned.to_anndata().write_h5ad(tmp_path / "e.h5ad")
    out = subprocess.run([python, "-c", SQUIDPY, str(tmp_path / "e.h5ad")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    k = len(aligned.categories("cell_type"))
    assert out.stdout.split()[-3:] == [str(k), str(k), "True"]


def test_xarray_sees_aligned_cells_consolidated_and_without_warnings(aligned):
    import xarray as xr

    ds = aligned.to_xarray()
    np.testing.assert_array_equal(ds.aligned_x.values, aligned.root["aligned/x"][...])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "failed to open consolidated metadata" warning
        cells = xr.open_zarr(aligned.path, group="cells")
        pcs = xr.open_zarr(aligned.path, group="pca")
    assert cells.sizes["cell"] == aligned.n_cells and pcs.pcs.shape == (aligned.n_cells, 4)
    # a stage run after the consolidation still sees its own new arrays (lamina never reads the snapshot)
    lamina.pca(aligned, n_pcs=3)
    assert aligned.root["pca/pcs"].shape[1] == 3
    assert xr.open_zarr(aligned.path, group="pca").pcs.shape[1] == 3


HOLD = """
import sys, time
from lamina.store.lock import writer
with writer(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_one_writer_per_store_and_stale_locks(phantom_store, tmp_path):
    path = tmp_path / "l.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    atlas = lamina.Atlas.open(path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=rf"being written by process {holder.pid} on .*delete .*\.lock"):
            lamina.section_stats(atlas)
        assert lamina.Atlas.open(path).n_cells == 6000  # readers are never blocked
        holder.kill()  # a killed writer leaves its lock behind: the next writer takes it over
        holder.wait()
        assert os.path.exists(f"{path}.lock")
        lamina.section_stats(atlas)
        assert atlas.group_is_complete("qc") and not os.path.exists(f"{path}.lock")
    finally:
        holder.kill()


def test_a_second_writer_waits_when_asked(phantom_store, tmp_path):
    from lamina.store.lock import writer

    path = tmp_path / "w.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.replace("time.sleep(60)", "time.sleep(2)"), str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with writer(path, wait=30):
            waited = time.perf_counter() - t0
        assert 0.5 < waited < 20
    finally:
        holder.kill()


def test_two_concurrent_builds_one_fails_clearly(tmp_path, phantom_table):
    table, _ = phantom_table
    table.to_parquet(tmp_path / "cells.parquet")
    (tmp_path / "b.yaml").write_text(
        "store: b.lamina.zarr\nrun: [section_stats, rasterize, register]\nreport: {enabled: false}\n"
        "input: {path: cells.parquet, columns: {cell_type: cell_type}, genes: rest}\n"
    )
    cmd = [sys.executable, "-m", "lamina.cli", "build", "b.yaml"]
    runs = [subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=240), p.stderr.read()) for p in runs)
    assert [code for code, _ in results] == [0, 2], results
    assert "is being written by process" in results[1][1] and "Traceback" not in results[1][1]
    assert "still alive" not in results[0][1] + results[1][1]
    atlas = lamina.Atlas.open(tmp_path / "b.lamina.zarr")
    assert atlas.group_is_complete("transforms") and not os.path.exists(tmp_path / "b.lamina.zarr.lock")


SPATIALDATA = """
import json, sys, numpy as np, spatialdata as sd
from spatialdata.transformations import get_transformation
s = sd.read_zarr(sys.argv[1])
t = s.tables["table"]
sec = sys.argv[2]
joined, table = sd.join_spatialelement_table(
    sdata=s, spatial_element_names=f"cells_{sec}", table_name="table", how="inner"
)
shapes = joined[f"cells_{sec}"]
image = get_transformation(s.images[f"{sec}_image"], get_all=True)[sec]
print(json.dumps({
    "n_obs": int(t.n_obs), "n_vars": int(t.n_vars), "X_sum": float(np.asarray(t.X).sum()),
    "frames": sorted(s.coordinate_systems), "points": int(len(s.points["cells"])),
    "joined": int(table.n_obs), "same_cells": bool((shapes.index.to_numpy() == table.obs["cell"].to_numpy()).all()),
    "shape_x": float(shapes.geometry.x.iloc[0]), "table_x": float(table.obsm["spatial_raw"][0, 0]),
    "image": image.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")).tolist(),
    "points_z": float(s.points["cells"]["z"].compute().max()),
}))
"""


def _with_image(aligned, tmp_path):
    import tifffile

    path = tmp_path / "img.lamina.zarr"
    shutil.copytree(aligned.path, path)
    sid = str(aligned.sections.id.iloc[1])
    tifffile.imwrite(tmp_path / "he.tif", np.full((300, 400, 3), 200, np.uint8), tile=(128, 128), photometric="rgb")
    atlas = lamina.add_image(path, sid, tmp_path / "he.tif", image_to_section=[[2, 0, 10], [0, 2, 20], [0, 0, 1]])
    return atlas, sid


def test_spatialdata_export_is_an_anndata_table_with_shapes_points_and_images(aligned, tmp_path):
    """Read back without spatialdata: the table with anndata, the shapes and points with pyarrow."""
    import anndata
    import pyarrow.parquet as pq

    atlas, sid = _with_image(aligned, tmp_path)
    out = tmp_path / "a.spatialdata.zarr"
    assert main(["export", atlas.path, "--format", "spatialdata", "--out", str(out)]) == 0
    table = anndata.read_zarr(out / "tables" / "table")
    cells = atlas.cells()
    assert table.shape == (atlas.n_cells, atlas.n_genes)
    np.testing.assert_array_equal(np.asarray(table.X), np.asarray(atlas.root["X"][:]))
    np.testing.assert_array_equal(table.obsm["spatial"], cells[["aligned_x", "aligned_y", "aligned_z"]].to_numpy())
    np.testing.assert_array_equal(table.obsm["spatial_raw"], cells[["x", "y"]].to_numpy())
    np.testing.assert_allclose(table.obsm["X_pca"], np.asarray(atlas.root["pca/pcs"][:]))
    assert (table.obs["cell"].to_numpy() == cells.index.to_numpy()).all()
    assert table.obs["region"].astype(str).tolist() == [f"cells_{s}" for s in cells.section.astype(str)]
    assert table.obs["cell_type"].isna().sum() == cells.cell_type.isna().sum()
    assert table.uns["spatialdata_attrs"]["instance_key"] == "cell"
    shapes = pq.read_table(out / "shapes" / f"cells_{sid}" / "shapes.parquet").to_pandas()
    wkb = np.frombuffer(b"".join(shapes.geometry), dtype=[("o", "u1"), ("k", "<u4"), ("x", "<f8"), ("y", "<f8")])
    mine = cells[cells.section.astype(str) == sid]
    assert (wkb["k"] == 1).all() and np.allclose(wkb["x"], mine.x) and np.allclose(wkb["y"], mine.y)
    assert (shapes.index.to_numpy() == mine.index.to_numpy()).all()
    points = pd.read_parquet(out / "points" / "cells" / "points.parquet")
    assert len(points) == atlas.n_cells and np.allclose(points.z, cells.aligned_z)
    image = zarr.open_group(str(out / "images" / f"{sid}_image"), mode="r")
    assert image["s0"].shape == (3, 300, 400)
    affine = image.attrs["ome"]["multiscales"][0]["coordinateTransformations"][0]["affine"]
    assert affine[1] == [0.0, 0.0, 2.0, 10.0] and affine[2] == [0.0, 2.0, 0.0, 20.0]


def test_spatialdata_reads_the_export(aligned, tmp_path):
    """spatialdata.read_zarr on the export, in this interpreter when it has spatialdata, else in the one
    ``LAMINA_SPATIALDATA_PYTHON`` names (spatialdata pins dask and geometry libraries of its own)."""
    import importlib.util
    import json

    python = sys.executable if importlib.util.find_spec("spatialdata") else os.environ.get("LAMINA_SPATIALDATA_PYTHON")
    if not python:
        pytest.skip("spatialdata is not installed here and LAMINA_SPATIALDATA_PYTHON names no interpreter that has it")
    atlas, sid = _with_image(aligned, tmp_path)
    out = lamina.export_spatialdata(atlas, tmp_path / "s.zarr")
    run = subprocess.run([python, "-c", SPATIALDATA, str(out), sid], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["n_obs"] == atlas.n_cells and got["n_vars"] == atlas.n_genes
    assert got["X_sum"] == pytest.approx(float(np.asarray(atlas.root["X"][:]).sum()), rel=1e-5)
    assert got["frames"] == sorted(["atlas", *map(str, atlas.sections.id)])
    assert got["points"] == atlas.n_cells and got["same_cells"]
    n_sid = int((atlas.cells().section.astype(str) == sid).sum())
    assert got["joined"] == n_sid and got["shape_x"] == pytest.approx(got["table_x"], abs=1e-3)
    assert np.allclose(got["image"], [[2, 0, 10], [0, 2, 20], [0, 0, 1]])
    assert got["points_z"] == pytest.approx(float(atlas.root["aligned/z"][:].max()), abs=1e-3)


def _coordinate_image(aligned, tmp_path, sid, px=4.0):
    """A float image of ``sid`` whose two channels hold the section's raw x and y (um) at each pixel centre."""
    import tifffile

    xy = aligned.cells().query("section == @sid")[["x", "y"]].to_numpy()
    lo = np.floor(xy.min(0)) - 40
    W, H = (np.ceil((xy.max(0) + 40 - lo) / px)).astype(int)
    cols, rows = np.meshgrid(np.arange(W), np.arange(H))
    image = np.stack([lo[0] + (cols + 0.5) * px, lo[1] + (rows + 0.5) * px]).astype(np.float32)
    tifffile.imwrite(tmp_path / "coords.ome.tif", image, ome=True, metadata={"axes": "CYX"})
    path = tmp_path / "coords.lamina.zarr"
    shutil.copytree(aligned.path, path)
    affine = [[px, 0, lo[0]], [0, px, lo[1]], [0, 0, 1]]
    return lamina.add_image(path, sid, tmp_path / "coords.ome.tif", image_to_section=affine), xy


def test_an_image_in_the_atlas_frame_lands_where_its_cells_do(aligned, tmp_path):
    """The image's pixels carry their own raw position: read back at each cell's aligned position they give the
    cell's raw position (the same transforms as the cells, refined displacement included), in um."""
    from lamina.kernels.resample import bilinear

    sid = str(aligned.sections.id.iloc[2])
    atlas, raw = _coordinate_image(aligned, tmp_path, sid)
    img = lamina.image_in_atlas(atlas, sid, pixel_size_um=4.0, chunk=96)
    assert img.dims == ("c", "y", "x") and img.attrs["stage"] == "refined" and img.attrs["section"] == sid
    assert img.attrs["z_um"] == float(atlas.sections.z.iloc[2])
    assert img.data.chunks[1][0] == 96 and img.dtype == np.float32
    values = img.values
    cells = atlas.cells().query("section == @sid")
    col = (cells.aligned_x.to_numpy() - float(img.x[0])) / 4.0
    row = (cells.aligned_y.to_numpy() - float(img.y[0])) / 4.0
    back = bilinear(values, col, row).T
    err = np.linalg.norm(back - raw, axis=1)
    assert np.median(err) < 0.5 and np.quantile(err, 0.99) < 2.0, (np.median(err), err.max())
    # the refined frame is not the affine one: the same cells read in the affine image are off by the warp
    affine = lamina.image_in_atlas(
        atlas,
        sid,
        pixel_size_um=4.0,
        stage="affine",
        bounds=(float(img.x[0]) - 2, float(img.y[0]) - 2, float(img.x[-1]) + 2, float(img.y[-1]) + 2),
    )
    off = np.linalg.norm(bilinear(affine.values, col, row).T - raw, axis=1)
    assert np.median(off) > 3 * np.median(err)
    # another chunking gives the same pixels; outside the image the fill
    again = lamina.image_in_atlas(atlas, sid, pixel_size_um=4.0, chunk=250, fill=-1).values
    inside = values != 0
    np.testing.assert_array_equal(again[inside], values[inside])
    assert (again[~inside] == -1).all() and (~inside).any()


def test_an_image_in_the_atlas_frame_exports_as_a_tiled_tiff_and_refuses_bad_requests(aligned, tmp_path):
    import tifffile

    from lamina.atlas_image import export_image

    sid = str(aligned.sections.id.iloc[1])
    tifffile.imwrite(tmp_path / "he.tif", np.full((600, 800, 3), 200, np.uint8), tile=(128, 128), photometric="rgb")
    shutil.copytree(aligned.path, tmp_path / "img.lamina.zarr")
    affine = [[2, 0, 10], [0, 2, 20], [0, 0, 1]]  # 2 um per pixel
    atlas = lamina.add_image(tmp_path / "img.lamina.zarr", sid, tmp_path / "he.tif", image_to_section=affine)
    img = lamina.image_in_atlas(atlas, sid, pixel_size_um=6.0)
    assert img.attrs["image_level"] == 1  # 4 um pixels, shrunk 1.5x (never more than 2x)
    assert img.dtype == np.uint8 and set(np.unique(img.values)) <= {0, 199, 200}
    out = export_image(atlas, sid, tmp_path / "he.atlas.tif", pixel_size_um=6.0, tile=64)
    with tifffile.TiffFile(out) as tf:
        back = tf.asarray()
        page = tf.pages[0]
        assert page.is_tiled and page.tilewidth == 64 and page.photometric == tifffile.PHOTOMETRIC.RGB
        assert f"section {sid}" in page.description
    np.testing.assert_array_equal(np.moveaxis(back, -1, 0), img.values)
    assert not list(tmp_path.glob("*.partial"))
    assert main(["export", atlas.path, "--images", "--out", str(tmp_path / "imgs"), "--pixel-size", "6"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "imgs" / f"{sid}.tif"), back)
    with pytest.raises(lamina.InputError, match="pixel_size_um"):
        lamina.image_in_atlas(atlas, sid, pixel_size_um=0)
    with pytest.raises(lamina.InputError, match="bounds"):
        lamina.image_in_atlas(atlas, sid, bounds=(0, 0, -1, 5))
    with pytest.raises(lamina.UnknownSectionError, match="has no image"):
        lamina.image_in_atlas(atlas, str(aligned.sections.id.iloc[0]))


def test_images_of_an_unregistered_atlas_are_refused_by_the_cli_with_exit_2(tmp_path, capsys):
    import tifffile

    ph = lamina.datasets.phantom(n_cells=1200, n_sections=2, n_genes=4, seed=1)
    atlas = lamina.ingest(ph, tmp_path / "raw.lamina.zarr")
    sid = str(atlas.sections.id.iloc[0])
    tifffile.imwrite(tmp_path / "he.tif", np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    lamina.add_image(atlas.path, sid, tmp_path / "he.tif", pixel_size_um=10.0)
    assert main(["export", atlas.path, "--images", "--out", str(tmp_path / "imgs")]) == 2
    err = capsys.readouterr().err
    assert "no registration yet" in err and "Traceback" not in err
    assert not list((tmp_path / "imgs").glob("*.tif"))
    assert main(["export", atlas.path]) == 2  # neither --format nor --images
    assert "--format" in capsys.readouterr().err
