import json
import shutil

import dask.array as da
import numpy as np
import pytest

import lamina
from lamina.errors import FormatVersionError, StoreError, TooLargeError


def test_create_open_and_format_version(tmp_path):
    a = lamina.Atlas.create(tmp_path / "a.lamina.zarr")
    assert a.attrs["format_version"] == lamina.FORMAT_VERSION and a.attrs["units"] == "um"
    assert not a.has_cells and "empty" in repr(a)
    with pytest.raises(StoreError, match="already exists"):
        lamina.Atlas.create(tmp_path / "a.lamina.zarr")
    b = lamina.Atlas.open(tmp_path / "a.lamina.zarr")
    assert b.attrs["format"] == "lamina.atlas"
    with pytest.raises(StoreError, match="no cells yet"):
        _ = b.n_cells


def test_newer_format_version_is_refused(tmp_path, phantom_store):
    path = tmp_path / "new.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = lamina.FORMAT_VERSION + 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match="upgrade lamina"):
        lamina.Atlas.open(path)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no atlas store"):
        lamina.Atlas.open(tmp_path / "missing.zarr")
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a lamina atlas store"):
        lamina.Atlas.open(tmp_path / "plain.zarr")


def test_to_xarray_is_lazy_and_matches_the_input(phantom_store, phantom_table):
    table, _ = phantom_table
    ds = phantom_store.to_xarray()
    assert isinstance(ds["X"].data, da.Array) and isinstance(ds["x"].data, da.Array)
    assert ds.sizes == {"cell": 6000, "gene": 24, "section": 5}
    # phantom sections are generated in z order, so the store's rows are the table's rows
    np.testing.assert_array_equal(ds["x"].values, table.x.to_numpy(np.float32))
    np.testing.assert_array_equal(ds["X"].values, table.iloc[:, 5:].to_numpy(np.float32))
    assert ds["X"].data.chunks[0] == ds["x"].data.chunks[0]  # cell chunks aligned across arrays
    cats = ds["cell_type"].attrs["categories"]
    np.testing.assert_array_equal(np.array(cats)[ds["cell_type"].values], table.cell_type.astype(str))


def test_section_view_and_categoricals(phantom_store, phantom_table):
    table, _ = phantom_table
    sec = phantom_store.sections
    assert list(sec.id) == [f"S{i:03d}" for i in range(5)] and np.all(np.diff(sec.z) == 35.0)
    view = phantom_store.section("S002")
    assert view.sizes["cell"] == int((table.section == "S002").sum())
    assert set(np.unique(view["cell_section"].values)) == {2}
    obs = phantom_store.obs(sections=["S004"])
    assert obs.section.cat.categories.tolist() == list(sec.id)
    assert (obs.section == "S004").all()
    assert str(obs.cell_type.dtype) == "category"


def test_to_anndata_subset_and_size_guard(phantom_store, phantom_table):
    table, _ = phantom_table
    ad = phantom_store.to_anndata(sections=["S001", "S003"], genes=["g0003", "g0000"])
    m = table.section.isin(["S001", "S003"]).to_numpy()
    assert ad.shape == (int(m.sum()), 2)
    np.testing.assert_array_equal(ad.X[:, 0], table.loc[m, "g0003"].to_numpy(np.float32))
    np.testing.assert_allclose(ad.obsm["spatial"][:, 0], table.loc[m, "x"].to_numpy(np.float32))
    assert list(ad.var_names) == ["g0003", "g0000"]
    with pytest.raises(TooLargeError, match="export"):
        phantom_store.to_anndata(max_bytes=1000)


def test_info_lists_sections_cells_genes_stages_sizes(phantom_store):
    text = phantom_store.info()
    for needle in ("cells 6,000", "sections 5", "genes 24", "ingest", "complete", "MiB", "S004"):
        assert needle in text


def test_column_blocks_and_read_columns_read_only_the_chunks_asked_for():
    import zarr

    from lamina.store.arrays import column_blocks, read_columns

    values = np.arange(12 * 10, dtype=np.float32).reshape(12, 10)
    z = zarr.create_array(store={}, shape=values.shape, chunks=(5, 4), dtype="f4")
    z[:] = values
    blocks = list(column_blocks(z, 3, 11))
    assert [(c0, c1) for c0, c1, _ in blocks] == [(0, 4), (4, 8), (8, 10)]
    assert all(b.dtype == np.float64 for *_, b in blocks)
    np.testing.assert_array_equal(np.concatenate([b for *_, b in blocks], 1), values[3:11])
    assert [(c0, c1) for c0, c1, _ in column_blocks(z, 0, 12, skip=[0, 8])] == [(4, 8)]
    cols = np.array([9, 2, 2, 5])
    np.testing.assert_array_equal(read_columns(z, 3, 11, cols), values[3:11][:, cols])
    assert read_columns(z, 3, 11, []).shape == (8, 0)
    # columns 2 and 5 only: the chunks of columns 8-9 and the rows past 11 are never read
    reads = []
    store = zarr.storage.MemoryStore()
    z2 = zarr.create_array(store=store, shape=values.shape, chunks=(5, 4), dtype="f4")
    z2[:] = values
    get = store.get

    async def counting(key, *a, **k):
        reads.append(key)
        return await get(key, *a, **k)

    store.get = counting
    read_columns(z2, 3, 9, [2, 5])
    chunk_keys = sorted(k for k in reads if k.startswith("c/"))
    assert chunk_keys == ["c/0/0", "c/0/1", "c/1/0", "c/1/1"], chunk_keys
