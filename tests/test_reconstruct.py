"""Stages of the isotropic reconstruction on a small phantom: pca -> train_flow -> interpolate -> voxelize ->
invert -> Parquet, plus resume, determinism, bad input and the isoST import. Registration is replaced by
``mark_aligned`` (raw coordinates taken as aligned) so the tests exercise these stages alone."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from conftest import interrupt_training

import lamina
from lamina.errors import InputError, StoreError, TooLargeError
from lamina.kernels.pca import invert as invert_rows
from lamina.stages import flow as flow_stage
from lamina.stages.pca import read_pca
from lamina.stages.warp import mark_aligned

# the raw coordinates of this phantom are not aligned (mark_aligned takes them as they are), so the held-out
# check would find no overlap and keep the untrained flow; these tests are about the stages' mechanics (the
# check has tests/test_flow_validation.py)
FLOW = {"steps": 4, "steps_per_task": 2, "subsample": 128, "hidden": 16, "k": 5, "dz_um": 10.0, "validate": False}


@pytest.fixture(scope="module")
def recon(tmp_path_factory, phantom_store):
    path = tmp_path_factory.mktemp("recon") / "r.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    atlas = lamina.Atlas.open(path)
    mark_aligned(atlas)
    lamina.pca(atlas, n_pcs=8)
    lamina.train_flow(atlas, **FLOW)
    lamina.interpolate(atlas)
    lamina.voxelize(atlas, voxel_um=40.0)
    lamina.invert(atlas)
    return atlas


def test_pca_matches_numpy_svd(recon):
    X = np.asarray(recon.root["X"][...], np.float64)
    Z = (X - X.mean(0)) / X.std(0, ddof=1)
    _, s, vt = np.linalg.svd(Z, full_matrices=False)
    comp = np.asarray(recon.root["pca/components"][...])
    assert np.abs((vt[:8] * comp).sum(1)).min() > 0.999
    np.testing.assert_allclose(np.asarray(recon.root["pca/pcs"][...]), Z @ comp.T, atol=1e-3)
    ratio = np.asarray(recon.root["pca/explained_variance_ratio"][...])
    np.testing.assert_allclose(ratio, s[:8] ** 2 / (s**2).sum(), rtol=1e-3)
    assert recon.root["pca/pcs"].chunks[0] == recon.cell_chunk  # chunk-aligned with /cells


def test_pca_refuses_more_components_than_genes_and_nonfinite_expression(recon, tmp_path):
    with pytest.raises(InputError, match="24 genes"):
        lamina.pca(recon, n_pcs=25)
    path = tmp_path / "nan.lamina.zarr"
    shutil.copytree(recon.path, path)
    bad = lamina.Atlas.open(path, mode="r+")
    row = int(bad.sections.cell_start[2]) + 5
    bad.root["X"][row, 3] = np.nan
    with pytest.raises(InputError, match=rf"row {row} \(section 'S002'\)"):
        lamina.pca(bad, n_pcs=4)
    assert bad.group_is_complete("pca") and bad.root["pca/components"].shape[0] == 8  # old result intact


def test_interpolated_layers_have_the_planned_depths_weights_and_counts(recon):
    g = recon.root["interpolated"]
    sec = recon.sections
    z = sec.z.to_numpy()
    gz, w = np.asarray(g["z"][...]), np.asarray(g["weight"][...])
    steps = int(round((z[1] - z[0]) / FLOW["dz_um"]))
    expected = z[:-1, None] + (z[1] - z[0]) * np.arange(1, steps)[None] / steps
    np.testing.assert_allclose(np.unique(gz), np.sort(expected.ravel()), atol=1e-3)
    for depth in np.unique(gz):  # a layer's weights add up to a section's cell count (weighted by nearness)
        k = int(np.searchsorted(z, depth)) - 1
        t = (depth - z[k]) / (z[k + 1] - z[k])
        np.testing.assert_allclose(w[gz == depth].sum(), (1 - t) * sec.n_cells[k] + t * sec.n_cells[k + 1], rtol=1e-4)
    assert np.isfinite(np.asarray(g["pcs"][...])).all() and np.isfinite(np.asarray(g["x"][...])).all()
    starts, stops = np.asarray(g["gap_start"][...]), np.asarray(g["gap_stop"][...])
    gap = np.asarray(g["gap"][...])
    for i, s in enumerate(np.asarray(g["gap_section"][...])):
        assert (gap[starts[i] : stops[i]] == s).all()


def test_interpolation_is_deterministic_for_a_seed(recon, tmp_path):
    path = tmp_path / "again.lamina.zarr"
    shutil.copytree(recon.path, path)
    again = lamina.Atlas.open(path, mode="r+")
    lamina.interpolate(again, force=True)
    for k in ("x", "y", "pcs"):
        np.testing.assert_array_equal(
            np.asarray(again.root[f"interpolated/{k}"][...]), np.asarray(recon.root[f"interpolated/{k}"][...])
        )
    lamina.interpolate(again, seed=1)
    assert not np.array_equal(
        np.asarray(again.root["interpolated/pcs"][...]), np.asarray(recon.root["interpolated/pcs"][...])
    )


def test_training_resumes_from_its_checkpoint(recon, tmp_path, monkeypatch):
    path = tmp_path / "resume.lamina.zarr"
    shutil.copytree(recon.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")
    opts = {**FLOW, "steps": 6, "seed": 3}
    real = interrupt_training(monkeypatch, at_step=2)
    with pytest.raises(KeyboardInterrupt):
        lamina.train_flow(atlas, **opts)
    ckpts = [k for k in atlas.root["_tmp"].group_keys() if k.startswith("ckpt-train_flow-")]
    assert len(ckpts) == 1 and atlas.root[f"_tmp/{ckpts[0]}"].attrs["steps_done"] == 2
    first_two = np.asarray(atlas.root[f"_tmp/{ckpts[0]}/loss"][:2])
    calls = []
    monkeypatch.setattr(flow_stage, "_train_block", real)
    interrupt_training(monkeypatch, at_step=None, calls=calls)
    lamina.train_flow(atlas, **opts)
    assert calls == [2, 4]  # steps 0-1 were not redone
    np.testing.assert_array_equal(np.asarray(atlas.root["flow/loss"][:2]), first_two)
    assert np.isfinite(np.asarray(atlas.root["flow/loss"][...])).all()
    assert "_tmp" not in atlas.root or not list(atlas.root["_tmp"].group_keys())  # checkpoint removed


def test_flow_needs_three_sections_and_a_positive_step(recon):
    with pytest.raises(InputError, match="at least 3 sections"):
        lamina.train_flow(recon, sections=[0, 1], **FLOW)
    with pytest.raises(lamina.ConfigError, match="'dz_um' .* must be > 0, got 0.0"):
        lamina.train_flow(recon, **{**FLOW, "dz_um": 0.0})
    with pytest.raises(TypeError, match="unknown option 'step' \\(did you mean 'steps'\\?\\)"):
        lamina.train_flow(recon, step=3)


def test_voxel_volume_sums_and_means(recon):
    vol = recon.root["volume"]
    dens = np.asarray(vol["density"][...], np.float64)
    w = np.asarray(recon.root["interpolated/weight"][...], np.float64)
    np.testing.assert_allclose(dens.sum(), recon.n_cells + w.sum(), rtol=1e-5)
    # one voxel by brute force over every observed (weight 1) and interpolated (its weight) cell in it
    v, (ox, oy, oz) = float(vol.attrs["voxel_um"]), vol.attrs["origin"]
    cells = lambda g, z: (np.asarray(recon.root[f"{g}/x"][...]), np.asarray(recon.root[f"{g}/y"][...]), z)  # noqa: E731
    sec = np.asarray(recon.root["cells/section"][...])
    obs = cells("aligned", recon.sections.z.to_numpy()[sec])
    itp = cells("interpolated", np.asarray(recon.root["interpolated/z"][...]))
    index = lambda x, y, z: np.stack(
        [np.floor((z - oz) / v), np.floor((y - oy) / v), np.floor((x - ox) / v)], 1
    ).astype(int)  # noqa: E731
    io, ii = index(*obs), index(*itp)
    k, j, i = np.argwhere(dens > 0)[len(np.argwhere(dens > 0)) // 2]
    mo, mi = (io == (k, j, i)).all(1), (ii == (k, j, i)).all(1)
    wi = w[mi]
    total = np.asarray(recon.root["pca/pcs"][...])[mo].sum(0) + (
        np.asarray(recon.root["interpolated/pcs"][...])[mi] * wi[:, None]
    ).sum(0)
    np.testing.assert_allclose(dens[k, j, i], mo.sum() + wi.sum(), rtol=1e-5)
    np.testing.assert_allclose(vol["pcs"][:, k, j, i], total / (mo.sum() + wi.sum()), rtol=1e-4, atol=1e-5)
    assert np.isnan(np.asarray(vol["pcs"][0])[np.asarray(vol["density"]) == 0]).all()


def test_volume_has_um_coordinates_to_select_on(recon):
    vol = recon.volume()
    attrs = recon.root["volume"].attrs
    x0, y0, z0 = attrs["origin"]
    voxel = attrs["voxel_um"]
    assert vol.density.dims == ("z", "y", "x") and vol.pcs.dims == ("pc", "z", "y", "x")
    np.testing.assert_allclose(vol.x.values[:2], [x0 + 0.5 * voxel, x0 + 1.5 * voxel])
    np.testing.assert_allclose(vol.z.values[-1], z0 + (vol.sizes["z"] - 0.5) * voxel)
    k = vol.sizes["z"] // 2
    picked = vol.density.sel(z=float(vol.z[k]) + 0.2 * voxel, method="nearest").values
    np.testing.assert_array_equal(picked, recon.root["volume/density"][k])


def test_invert_and_parquet_export_match_the_pca_inversion(recon, tmp_path):
    import pyarrow.parquet as pq

    p = read_pca(recon.root)
    vol, expr = recon.root["volume/pcs"], recon.root["expression/values"]
    dens = np.asarray(recon.root["volume/density"][...])
    k, j, i = np.argwhere(dens > 0)[::97][:20].T
    pcs = np.stack([np.asarray(vol[:, a, b, c]) for a, b, c in zip(k, j, i)])
    want = invert_rows(pcs, p["mean"], p["scale"], p["components"])
    got = np.stack([np.asarray(expr[:, a, b, c]) for a, b, c in zip(k, j, i)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    out = tmp_path / "vol.parquet"
    n = lamina.export_expression_parquet(recon, out, genes=["g0000", "g0003"], row_group_rows=500)
    assert n == int((dens > 0).sum())
    f = pq.ParquetFile(out)
    assert f.schema_arrow.names == ["x", "y", "z", "cells", "g0000", "g0003"] and f.metadata.num_row_groups >= 2
    t = f.read().to_pandas()
    np.testing.assert_allclose(t.cells.sum(), dens.sum(), rtol=1e-5)
    assert np.isfinite(t.g0003).all()


def test_voxelize_refuses_a_grid_too_large_for_the_disk(recon, tmp_path):
    path = tmp_path / "big.lamina.zarr"
    shutil.copytree(recon.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")
    before = dict(atlas.root["volume"].attrs)
    with pytest.raises(TooLargeError, match="choose a larger voxel_um"):
        lamina.voxelize(atlas, voxel_um=0.01)
    assert dict(atlas.root["volume"].attrs) == before  # the old volume is untouched
    with pytest.raises(lamina.ConfigError, match="voxel_um"):
        lamina.voxelize(atlas, voxel_um=float("nan"))


def test_reconstruction_tolerates_a_section_without_some_cell_type(tmp_path, small_phantom):
    """The flow does not use types; a section that lacks a type is ordinary input."""
    frames = [f for s in range(small_phantom.spec.n_sections) for f, _ in small_phantom.section_chunks(s)]
    table = pd.concat(frames, ignore_index=True)
    table = table[~((table.section == "S001") & (table.cell_type == "tube"))]
    table.to_parquet(tmp_path / "cells.parquet")
    atlas = lamina.ingest(
        tmp_path / "cells.parquet",
        tmp_path / "t.lamina.zarr",
        cell_type="cell_type",
        genes=[g for g in table.columns if g.startswith("g")],
        section_z={s: 35.0 * i for i, s in enumerate(sorted(table.section.unique()))},
    )
    mark_aligned(atlas)
    seconds = lamina.reconstruct(
        atlas, n_pcs=4, dz_um=FLOW["dz_um"], voxel_um=50.0, **{k: v for k, v in FLOW.items() if k != "dz_um"}
    )
    assert set(seconds) == {"pca", "train_flow", "interpolate", "voxelize", "invert"}
    assert np.isfinite(np.asarray(atlas.root["interpolated/pcs"][...])).all()


def test_volume_picture(recon, tmp_path):
    from lamina.report import volume_slices

    path = volume_slices(recon, tmp_path / "v.png", gene="g0001")
    assert path.stat().st_size > 20_000
    with pytest.raises(KeyError, match="nope"):
        volume_slices(recon, tmp_path / "w.png", gene="nope")


def _write_isost(folder, n_slices=4, n=200, F=5, seed=0, coords=3):
    rng = np.random.default_rng(seed)
    lo, sc = rng.normal(size=F), rng.uniform(1, 2, F)
    folder.mkdir(parents=True, exist_ok=True)
    raw = []
    for k in range(n_slices):
        xy = rng.uniform(0, 500, (n, 2))
        f = rng.uniform(0, 1, (n, F))
        cols = [xy, np.full((n, 1), 20.0 * k)] if coords == 3 else [xy]
        t = np.concatenate(cols + [f], 1)
        torch.save(torch.tensor(t, dtype=torch.float32), folder / f"slice{k}.pt")
        raw.append(t)
    pd.DataFrame([lo], columns=[f"PC{i}" for i in range(F)]).to_csv(folder / "min.csv", index=False)
    pd.DataFrame([sc], columns=[f"PC{i}" for i in range(F)]).to_csv(folder / "scale.csv", index=False)
    return raw, lo, sc


def test_isost_import_restores_features_and_is_aligned(tmp_path):
    raw, lo, sc = _write_isost(tmp_path / "iso")
    atlas = lamina.import_isost(tmp_path / "iso", tmp_path / "i.lamina.zarr")
    assert list(atlas.genes) == [f"PC{i}" for i in range(5)] and atlas.n_sections == 4
    np.testing.assert_allclose(atlas.sections.z, [0, 20, 40, 60])
    X = atlas.to_anndata(sections=["slice2"]).X
    np.testing.assert_allclose(X, raw[2][:, 3:].astype(np.float32) * sc + lo, rtol=1e-5)
    assert atlas.group_is_complete("aligned")
    np.testing.assert_allclose(np.asarray(atlas.root["aligned/x"][...])[:200], raw[0][:, 0], rtol=1e-6)


def test_isost_import_bad_files(tmp_path):
    _write_isost(tmp_path / "a", coords=2)
    atlas = lamina.import_isost(tmp_path / "a", tmp_path / "a.lamina.zarr", coords=2, spacing=15.0)
    np.testing.assert_allclose(atlas.sections.z, [0, 15, 30, 45])
    (tmp_path / "a" / "slice9.pt").write_bytes(b"not a tensor file")
    with pytest.raises(InputError, match="slice9.pt"):
        lamina.import_isost(tmp_path / "a", tmp_path / "b.lamina.zarr", coords=2)
    _write_isost(tmp_path / "c", F=5)
    pd.DataFrame([np.zeros(4)]).to_csv(tmp_path / "c" / "min.csv", index=False, header=False)
    with pytest.raises(InputError, match="min has 4 values and scale 5"):
        lamina.import_isost(tmp_path / "c", tmp_path / "c.lamina.zarr")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "c" / "slice0.pt")
    with pytest.raises(InputError):
        lamina.import_isost(tmp_path / "c", tmp_path / "d.lamina.zarr")
    assert not (tmp_path / "d.lamina.zarr").exists()


def test_stages_need_their_inputs(phantom_store, tmp_path):
    path = tmp_path / "bare.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")
    with pytest.raises(StoreError, match="warp"):
        lamina.train_flow(atlas, **FLOW)
    with pytest.raises(StoreError, match="voxelize"):
        lamina.invert(atlas)
    assert isinstance(zarr.open_group(str(path), mode="r"), zarr.Group)


def test_gaps_without_layers_and_costly_gaps_are_named(recon, tmp_path, caplog):
    """Issue 21 item 4: a gap narrower than 1.5 dz gets no layer, and says so (which gaps, the dz that fills
    them); a gap of many Euler steps says what it costs and the dz that bounds it."""
    from lamina.stages.interpolate import MANY_STEPS, gap_messages

    z, sec = np.array([0.0, 35.0, 70.0, 520.0]), np.arange(4)
    ids = ["a", "b", "c", "d"]
    assert gap_messages(ids, z, sec, 20.0) == []  # 35 / 20 = 1.75 steps rounds to 2: one layer per gap
    empty, costly = gap_messages(ids, z, sec, 25.0), gap_messages(ids, z, sec, 10.0)
    assert len(empty) == 1 and "2 of 3 gaps" in empty[0] and "a-b (35 um), b-c (35 um)" in empty[0]
    assert "below 23.3 um" in empty[0]
    assert len(costly) == 1 and "c-d (450 um) takes 45 Euler steps" in costly[0]
    assert f"keeps every gap within {MANY_STEPS} steps" in costly[0] and "of 18 um keeps" in costly[0]
    path = tmp_path / "wide.lamina.zarr"
    shutil.copytree(recon.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")
    spacing = float(np.diff(atlas.sections.z.to_numpy())[0])
    with caplog.at_level("WARNING", logger="lamina"):
        lamina.interpolate(atlas, dz_um=spacing / 1.2)  # every gap < 1.5 dz: nothing generated, and said
    assert "4 of 4 gaps are narrower than 1.5 x dz_um" in caplog.text
    record = atlas.stage_records()["interpolate"]
    assert record["n_cells"] == 0 and record["empty_gaps"] == 4 and len(record["notes"]) == 1
    assert lamina.mark_aligned is mark_aligned


def test_a_held_out_section_stays_out_of_the_flow_and_the_volume(recon, tmp_path):
    """``lamina.reconstruct(..., sections=...)`` (issue 21 item 4): the option goes to train_flow and voxelize,
    so the held-out section neither trains the flow nor puts its own cells in the volume; its depth is filled
    by the layers interpolated across the wider gap."""
    path = tmp_path / "loo.lamina.zarr"
    shutil.copytree(recon.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")
    keep = [s for s in atlas.sections.id if s != "S002"]
    lamina.reconstruct(atlas, sections=keep, voxel_um=40.0, **FLOW)
    assert list(atlas.root["flow/sections"][...]) == [0, 1, 3, 4]
    n = atlas.sections.n_cells.to_numpy()
    w = np.asarray(atlas.root["interpolated/weight"][...], np.float64)
    dens = np.asarray(atlas.root["volume/density"][...], np.float64)
    np.testing.assert_allclose(dens.sum(), n.sum() - n[2] + w.sum(), rtol=1e-5)
    z = atlas.sections.z.to_numpy()
    layers = np.unique(atlas.root["interpolated/z"][...])
    wide = layers[(layers > z[1]) & (layers < z[3])]  # the 70 um gap: 7 steps of 10 um, 6 layers
    assert len(wide) == 6 and np.abs(wide - z[2]).min() <= FLOW["dz_um"] / 2 + 1e-3  # S002's depth is filled
    assert atlas.stage_records()["voxelize"]["observed_sections"] == [0, 1, 3, 4]
