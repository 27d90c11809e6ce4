import numpy as np
import pandas as pd
import pytest

import lamina

GENES = [f"g{i:04d}" for i in range(24)]
OPTS = dict(cell_type="cell_type", cell_id="cell_id", genes="rest", cell_chunk=1024)


def _expect(table):
    """What the store must hold: rows grouped by section in z order, input order kept within a section."""
    order = np.argsort(table.section.to_numpy(), kind="stable")
    return table.iloc[order].reset_index(drop=True)


def _check(atlas, table):
    exp = _expect(table)
    obs = atlas.obs()
    assert atlas.n_cells == len(table)
    # CSV text round trips to within 1 float32 ulp (< 1 nm here)
    np.testing.assert_allclose(obs.x.to_numpy(), exp.x.to_numpy(np.float32), rtol=2e-7)
    np.testing.assert_allclose(obs.y.to_numpy(), exp.y.to_numpy(np.float32), rtol=2e-7)
    np.testing.assert_array_equal(obs.section.astype(str), exp.section.astype(str))
    np.testing.assert_array_equal(obs.cell_type.astype(str), exp.cell_type.astype(str))
    np.testing.assert_array_equal(obs.cell_id, exp.cell_id)
    X = atlas.to_xarray()["X"].sel(gene=GENES).values
    np.testing.assert_allclose(X, exp[GENES].to_numpy(np.float32), rtol=1e-6, atol=1e-6)
    sec = atlas.sections
    assert np.all(np.diff(sec.z) > 0)
    np.testing.assert_array_equal(sec.cell_stop.to_numpy()[:-1], sec.cell_start.to_numpy()[1:])
    np.testing.assert_array_equal(
        atlas.to_xarray()["cell_section"].values, np.repeat(np.arange(len(sec)), sec.n_cells.to_numpy())
    )


@pytest.fixture(scope="module")
def shuffled(phantom_table):
    """The phantom table with its rows shuffled: sections interleaved, as in a real export."""
    table, _ = phantom_table
    return table.sample(frac=1.0, random_state=0).reset_index(drop=True)


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
def test_single_table_formats(tmp_path, shuffled, suffix):
    path = tmp_path / f"cells{suffix}"
    if suffix == ".parquet":
        shuffled.to_parquet(path, row_group_size=800)
    else:
        shuffled.to_csv(path, index=False)
    atlas = lamina.ingest(
        path, tmp_path / "a.lamina.zarr", read_rows=700, section_z={f"S{i:03d}": 35.0 * i for i in range(5)}, **OPTS
    )
    _check(atlas, shuffled)
    assert atlas.root["X"].chunks == (1024, 24)
    assert atlas.root["cells/x"].chunks == (1024,)


def test_folder_of_one_file_per_section(tmp_path, phantom_table):
    table, _ = phantom_table
    folder = tmp_path / "sections"
    folder.mkdir()
    for sid, part in table.groupby("section", observed=True):
        part.drop(columns="section").to_parquet(folder / f"{sid}.parquet")
    atlas = lamina.ingest(folder, tmp_path / "f.lamina.zarr", section_spacing=35.0, **OPTS)
    _check(atlas, table)
    assert list(atlas.sections.source.str.endswith(".parquet")) == [True] * 5


def test_h5ad_streamed_by_rows(tmp_path, shuffled):
    import anndata as ad
    import scipy.sparse as sp

    X = shuffled[GENES].to_numpy(np.float32)
    X[X < 1.0] = 0  # make it sparse-ish
    obs = shuffled[["section", "cell_type"]].astype(str)
    obs.index = shuffled.cell_id.astype(str)
    for kind, mat in (("csr", sp.csr_matrix(X)), ("dense", X)):
        adata = ad.AnnData(X=mat, obs=obs, var=pd.DataFrame(index=GENES))
        adata.obsm["spatial"] = shuffled[["x", "y"]].to_numpy()
        path = tmp_path / f"{kind}.h5ad"
        adata.write_h5ad(path)
        atlas = lamina.ingest(
            path,
            tmp_path / f"{kind}.lamina.zarr",
            spatial_key="spatial",
            cell_type="cell_type",
            cell_id="_index",
            genes="rest",
            read_rows=500,
            section_order=[f"S{i:03d}" for i in range(5)],
        )
        exp = _expect(shuffled.assign(**{g: X[:, i] for i, g in enumerate(GENES)}))
        np.testing.assert_array_equal(atlas.to_xarray()["X"].values, exp[GENES].to_numpy(np.float32))
        np.testing.assert_array_equal(atlas.obs().cell_id, exp.cell_id.astype(str))
        np.testing.assert_allclose(atlas.obs().x, exp.x.to_numpy(np.float32))


def test_paste_files_side_by_side_and_z_column(tmp_path, shuffled):
    left = shuffled[["x", "y"]].assign(z=shuffled.section.str[1:].astype(int) * 35.0)
    right = shuffled[["section", "cell_type"]]
    left.to_csv(tmp_path / "pos.tsv", sep="\t", index=False)
    right.to_csv(tmp_path / "meta.tsv", sep="\t", index=False)
    atlas = lamina.ingest(
        tmp_path / "pos.tsv",
        tmp_path / "p.lamina.zarr",
        paste=[tmp_path / "meta.tsv"],
        z="z",
        cell_type="cell_type",
        read_rows=1000,
    )
    assert atlas.n_cells == 6000 and atlas.n_genes == 0
    np.testing.assert_array_equal(atlas.sections.z, [0, 35, 70, 105, 140])
    assert atlas.sections.attrs == {} and atlas.root["sections/z"].attrs["source"] == "column z"


def test_order_spacing_units_and_normalisation(tmp_path, phantom_table):
    table, _ = phantom_table
    t = table.assign(x=table.x / 1000.0, y=table.y / 1000.0)  # mm
    t[GENES] = np.abs(t[GENES])
    path = tmp_path / "mm.parquet"
    t.to_parquet(path)
    order = ["S004", "S003", "S002", "S001", "S000"]
    atlas = lamina.ingest(
        path,
        tmp_path / "mm.lamina.zarr",
        units="mm",
        section_order=order,
        section_spacing=20.0,
        normalize="log1p",
        **OPTS,
    )
    assert list(atlas.sections.id) == order and list(atlas.sections.z) == [0, 20, 40, 60, 80]
    first = atlas.obs(sections=["S004"])
    np.testing.assert_allclose(first.x, table.x[table.section == "S004"].to_numpy(np.float32), rtol=1e-6)
    X = atlas.to_xarray()["X"].values
    np.testing.assert_allclose(np.expm1(X).sum(1), 1e4, rtol=1e-4)
    assert atlas.root["X"].attrs["normalization"] == "log1p"


def test_gene_join_union_and_intersection(tmp_path, phantom_table):
    table, _ = phantom_table
    folder = tmp_path / "genes"
    folder.mkdir()
    for i, (sid, part) in enumerate(table.groupby("section", observed=True)):
        drop = [GENES[i]]  # each file lacks a different gene
        part.drop(columns=["section", *drop]).to_csv(folder / f"{sid}.csv", index=False)
    with pytest.raises(lamina.InputError, match="gene_join"):
        lamina.ingest(folder, tmp_path / "strict.lamina.zarr", **OPTS)
    assert not (tmp_path / "strict.lamina.zarr").exists()
    u = lamina.ingest(folder, tmp_path / "u.lamina.zarr", gene_join="union", **OPTS)
    assert u.n_genes == 24
    measured = u.root["sections/gene_measured"][...]
    assert measured.sum() == 5 * 24 - 5
    assert all(not measured[i, u.genes.get_loc(GENES[i])] for i in range(5))
    assert np.all(u.to_xarray()["X"].isel(cell=slice(0, u.sections.n_cells[0])).sel(gene="g0000").values == 0)
    i = lamina.ingest(folder, tmp_path / "i.lamina.zarr", gene_join="intersection", **OPTS)
    assert list(i.genes) == GENES[5:]


def test_rerun_is_skipped_and_changed_input_needs_overwrite(tmp_path, phantom_table):
    table, _ = phantom_table
    path = tmp_path / "c.parquet"
    table.to_parquet(path)
    store = tmp_path / "r.lamina.zarr"
    a = lamina.ingest(path, store, **OPTS)
    stamp = a.stage_records()["ingest"]["finished"]
    b = lamina.ingest(path, store, **OPTS)
    assert b.stage_records()["ingest"]["finished"] == stamp
    with pytest.raises(lamina.StoreError, match="overwrite"):
        lamina.ingest(path, store, **{**OPTS, "genes": GENES[:3]})
    c = lamina.ingest(path, store, overwrite=True, **{**OPTS, "genes": GENES[:3]})
    assert c.n_genes == 3
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.old-*"))


def test_x_is_written_gene_chunk_by_gene_chunk(tmp_path, monkeypatch):
    """A wide table: /X is written one [cell chunk, gene chunk] block at a time (a task never gathers the whole
    rows of a cell chunk) and holds exactly the input."""
    import importlib

    write = importlib.import_module("lamina.ingest.write")
    rng = np.random.default_rng(0)
    n, G = 3000, 300
    frame = pd.DataFrame(rng.gamma(1.0, 1.0, (n, G)).astype(np.float32), columns=[f"g{j}" for j in range(G)])
    frame.insert(0, "section", np.repeat(["a", "b"], n // 2))
    frame.insert(1, "x", rng.uniform(0, 500, n))
    frame.insert(2, "y", rng.uniform(0, 500, n))
    shapes = []
    gather = write._gather

    def recording(staging, pieces, name, columns=None):
        out = gather(staging, pieces, name, columns)
        if name == "X":
            shapes.append(out.shape)
        return out

    monkeypatch.setattr(write, "_gather", recording)
    atlas = lamina.ingest(frame, tmp_path / "w.lamina.zarr", genes="rest", gene_chunk=64, cell_chunk=1024)
    X = np.asarray(atlas.root["X"][...])
    order = np.asarray(atlas.root["cells/input_row"][...])
    np.testing.assert_array_equal(X, frame.iloc[order, 3:].to_numpy())
    # 3 cell chunks x 5 gene chunks (4 of 64 genes, one of 44), each gathered alone
    assert len(shapes) == 15 and max(w for _, w in shapes) == 64 and sum(w for _, w in shapes) == 3 * G
