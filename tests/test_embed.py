"""Niche embeddings, the learned encoder, spatial domains and their exports."""

import shutil

import numpy as np
import pandas as pd
import pytest
import zarr

import lamina
from lamina.kernels.niche import azimuthal_gradient, mean_or_own, nearest_centroid, one_hot, pair_owner, weights
from lamina.maps import map_neighbourhoods, neighbours, sampled
from lamina.stages.warp import mark_aligned


# ------------------------------------------------------------------------------------------- kernels
def _csr(xy, radius):
    xyz = np.c_[xy, np.zeros(len(xy))]
    return neighbours(xyz, np.arange(len(xy)), radius=radius)


def test_disk_means_equal_a_direct_mean_and_an_isolated_cell_is_its_own_niche():
    rng = np.random.default_rng(0)
    xy = np.r_[rng.uniform(0, 100, (60, 2)), [[1000.0, 1000.0]]]  # the last cell has no neighbour
    v = rng.normal(size=(61, 3))
    ptr, idx, d = _csr(xy, 20.0)
    owner = np.arange(61)
    keep = idx != owner[pair_owner(ptr)]
    out = mean_or_own(weights(ptr, idx, 61, keep), v, owner)
    for i in (0, 7, 33):
        nb = [j for j in range(61) if j != i and np.hypot(*(xy[j] - xy[i])) <= 20.0]
        np.testing.assert_allclose(out[i], v[nb].mean(0) if nb else v[i], rtol=1e-12)
    np.testing.assert_array_equal(out[60], v[60])


def test_the_azimuthal_gradient_measures_a_linear_trend_and_ignores_a_constant():
    # a ring of 8 neighbours at 10 um around the origin; values = a * x (+ a constant): the m = 1 filter is
    # |sum w (v_j - vbar) e^{i phi}| / sum w = a * 10 / 2 (mean of cos^2 over the ring)
    angles = np.arange(8) * np.pi / 4
    xy = np.r_[[[0.0, 0.0]], 10.0 * np.c_[np.cos(angles), np.sin(angles)]]
    ptr, idx, d = _csr(xy, 15.0)
    for a, c in ((2.0, 0.0), (2.0, 5.0), (0.0, 3.0)):
        v = (a * xy[:, :1] + c).repeat(2, axis=1)
        g = azimuthal_gradient(v, xy, np.arange(9), ptr, idx, d, sigma_um=10.0)
        np.testing.assert_allclose(g[0], [a * 5.0, a * 5.0], atol=1e-12)


def test_block_pca_scales_each_block_and_whitens_the_own_part():
    from lamina.kernels.niche import block_pca

    rng = np.random.default_rng(0)
    f = rng.normal(size=(2000, 13)) * rng.uniform(0.1, 5.0, 13) + rng.normal(size=13)
    layout = [("own", 3), ("means", 4), ("means", 4), ("types", 2)]
    w = {"means": 1.0, "types": 0.5}
    mu, scale, M, ratio = block_pca(len(f), f.sum(0), f.T @ f, layout, w, dim=5, own_weight=0.25)
    z = (f - mu) * scale
    var = z.var(0)
    np.testing.assert_allclose([var[3:7].sum(), var[7:11].sum(), var[11:13].sum()], [0.5, 0.5, 0.5], rtol=1e-9)
    e = z @ M
    assert M.shape == (13, 5 + 3) and len(ratio) == 5
    hood = e[:, :5]
    c = np.cov(hood.T, bias=True)
    np.testing.assert_allclose(c - np.diag(np.diag(c)), 0.0, atol=1e-9)  # principal axes
    assert np.all(np.diff(np.diag(c)) <= 1e-12)
    own = e[:, 5:]
    np.testing.assert_allclose(own.var(0), 0.25**2 * np.diag(c).sum() / 3, rtol=1e-9)
    np.testing.assert_allclose(np.corrcoef(own[:, 1], f[:, 1])[0, 1], 1.0)
    _, _, M0, _ = block_pca(len(f), f.sum(0), f.T @ f, layout, w, dim=5, own_weight=0.0)
    assert M0.shape == (13, 5)


def test_composition_and_the_nearest_centre():
    hot = one_hot(np.array([0, 2, -1, 2]), 3).toarray()
    np.testing.assert_array_equal(hot, [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1]])
    c = np.array([[0.0, 0.0], [10.0, 0.0]])
    np.testing.assert_array_equal(nearest_centroid(np.array([[1.0, 1.0], [9.0, -1.0], [4.9, 0]]), c), [0, 1, 0])


# ----------------------------------------------------------------------------------- reduce / sample
def test_the_folded_map_equals_the_all_cells_sum_and_the_sample_ignores_tiles(phantom_store, tmp_path):
    path = tmp_path / "r.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")

    def count(nb):  # (cells, neighbour pairs, sum of the core rows)
        return np.array([len(nb.core), len(nb.indices), nb.rows[nb.core].sum()], np.float64)

    add = np.add
    whole = map_neighbourhoods(count, atlas, radius=40.0, coords="raw", reduce=add, tile_um=300.0)
    assert whole[0] == atlas.n_cells and whole[2] == atlas.n_cells * (atlas.n_cells - 1) / 2
    other = map_neighbourhoods(count, atlas, radius=40.0, coords="raw", reduce=add, tile_um=1000.0)
    np.testing.assert_array_equal(whole, other)
    part = [
        map_neighbourhoods(count, atlas, radius=40.0, coords="raw", reduce=add, sample=0.2, tile_um=t)
        for t in (300, 900)
    ]
    np.testing.assert_array_equal(part[0], part[1])
    chosen = sampled(np.arange(atlas.n_cells), 0.2)
    assert part[0][0] == chosen.sum() and abs(chosen.mean() - 0.2) < 0.03
    assert part[0][2] == np.flatnonzero(chosen).sum()
    with pytest.raises(lamina.InputError, match="target array to write, or reduce"):
        map_neighbourhoods(count, atlas, radius=40.0, coords="raw")


# ------------------------------------------------------------------------------------------ the stage
@pytest.fixture(scope="module")
def flat_stack(tmp_path_factory):
    """A phantom whose sections are cut without transforms: raw positions are the true 3D frame."""
    ph = lamina.datasets.phantom(
        n_cells=4800,
        n_sections=8,
        n_genes=16,
        seed=5,
        max_rotation_deg=0,
        max_translation_um=0,
        scale_range=0,
        warp_um=0,
        noise=1.5,
    )
    path = tmp_path_factory.mktemp("emb") / "e.lamina.zarr"
    atlas = lamina.ingest(ph, path, cell_chunk=1000)
    lamina.pca(atlas, n_pcs=10)
    return atlas


def _copy(atlas, tmp_path, name="c.lamina.zarr"):
    shutil.copytree(atlas.path, tmp_path / name)
    return lamina.Atlas.open(tmp_path / name, mode="r+")


def test_niche_needs_an_aligned_stack_for_3d_and_runs_2d_without_one(flat_stack, tmp_path):
    atlas = _copy(flat_stack, tmp_path)
    with pytest.raises(lamina.MissingInputError, match="warp"):
        lamina.niche(atlas)  # z_sections=1 by default: the adjacent sections must be in one frame
    lamina.niche(atlas, z_sections=0, radii_um=[30.0, 60.0])
    values, attrs = atlas.embedding("niche")
    assert values.shape == (atlas.n_cells, 16 + 10) and attrs["params"]["z"] is False
    v = np.asarray(values)
    assert np.isfinite(v).all()
    g = atlas.root["embeddings/niche"]
    blocks = np.asarray(g["feature_block"][...]).tolist()
    assert blocks.count("own") == 10 and blocks.count("means") == 20 and "z" not in blocks
    # the own part: the PCs, whitened, at own_weight (0.25) times the neighbourhood part's RMS
    hood, own = v[:, :16], v[:, 16:]
    ratio = np.sqrt((own**2).sum(1).mean() / (hood**2).sum(1).mean())
    assert abs(ratio - 0.25) < 0.02
    pcs = np.asarray(atlas.root["pca/pcs"][...])
    np.testing.assert_allclose(np.corrcoef(own[:, 3], pcs[:, 3])[0, 1], 1.0, atol=1e-6)


def test_niche_in_3d_is_reproducible_and_the_fit_subset_changes_little(flat_stack, tmp_path):
    atlas = _copy(flat_stack, tmp_path)
    mark_aligned(atlas)
    lamina.niche(atlas, radii_um=[30.0, 60.0])
    first = np.asarray(atlas.embedding("niche")[0])
    assert atlas.root["embeddings/niche"].attrs["params"]["z"] is True
    assert "z" not in np.asarray(atlas.root["embeddings/niche/feature_block"][...]).tolist()  # pooled
    lamina.niche(atlas, radii_um=[30.0, 60.0], z_mode="block")
    assert np.asarray(atlas.root["embeddings/niche/feature_block"][...]).tolist().count("z") == 10 * 2
    lamina.niche(atlas, radii_um=[30.0, 60.0], force=True)
    np.testing.assert_array_equal(np.asarray(atlas.embedding("niche")[0]), first)
    lamina.niche(atlas, radii_um=[30.0, 60.0], fit_cells=2400)
    assert atlas.stage_records()["niche"]["fit_cells"] < atlas.n_cells
    sub = np.asarray(atlas.embedding("niche")[0])
    # a PCA fitted on half the cells spans nearly the same subspace (compared up to rotation)
    q1, q2 = np.linalg.qr(first[:, :4] - first[:, :4].mean(0))[0], np.linalg.qr(sub[:, :4] - sub[:, :4].mean(0))[0]
    assert np.linalg.svd(q1.T @ q2, compute_uv=False).min() > 0.9


def test_neighbourhoods_recover_the_layers_and_adjacent_sections_add_to_them(flat_stack, tmp_path):
    """A linear probe of the layer, fitted on the even sections and scored on the odd ones (held out)."""
    from sklearn.linear_model import LogisticRegression

    atlas = _copy(flat_stack, tmp_path)
    mark_aligned(atlas)
    layers = np.asarray(atlas.root["cells/cell_type"][...])
    train = np.asarray(atlas.root["cells/section"][...]) % 2 == 0

    def accuracy(v):
        clf = LogisticRegression(max_iter=2000).fit(v[train], layers[train])
        return clf.score(v[~train], layers[~train])

    own = accuracy(np.asarray(atlas.root["pca/pcs"][...]))
    scores = []
    for z in (0, 1, 2):
        lamina.niche(atlas, radii_um=[30.0, 60.0, 120.0], z_sections=z)
        scores.append(accuracy(np.asarray(atlas.embedding("niche")[0])))
    assert scores[0] > own + 0.05, (own, scores)  # measured 0.768 -> 0.878
    assert scores[1] > scores[0] + 0.01 and scores[2] > scores[1], scores  # pooled: 0.899, 0.911


def test_niche_bad_input(flat_stack, tmp_path):
    atlas = _copy(flat_stack, tmp_path)
    with pytest.raises(lamina.ConfigError, match="unknown block"):
        lamina.niche(atlas, z_sections=0, weights={"mean": 1.0})
    with pytest.raises(lamina.ConfigError, match="increasing positive"):
        lamina.niche(atlas, z_sections=0, radii_um=[60.0, 30.0])
    with pytest.raises(lamina.InputError, match="numeric"):
        lamina.niche(atlas, z_sections=0, cell_types="x")
    with pytest.raises(lamina.MissingInputError, match="not a cell column"):
        lamina.niche(atlas, z_sections=0, cell_types="celltype")
    atlas.root["pca/pcs"][5, 2] = np.nan
    with pytest.raises(lamina.InputError, match="NaN or inf .* row 5"):
        lamina.niche(atlas, z_sections=0)
    assert "niche" not in atlas.embeddings()  # nothing half-written


def test_a_one_cell_section_and_a_labelled_composition(tmp_path):
    rng = np.random.default_rng(3)
    n = 400
    table = pd.DataFrame(
        {
            "x": np.r_[rng.uniform(0, 300, n), [50.0]],
            "y": np.r_[rng.uniform(0, 300, n), [50.0]],
            "slice": ["a"] * n + ["b"],
            "kind": rng.choice(["T", "B", "NA"], n + 1),
            **{f"g{i}": rng.poisson(3, n + 1).astype(float) for i in range(6)},
        }
    )
    table.to_parquet(tmp_path / "t.parquet")
    atlas = lamina.ingest(
        tmp_path / "t.parquet",
        tmp_path / "t.lamina.zarr",
        section="slice",
        genes="rest",
        obs=["kind"],
        min_cells_per_section=1,
    )
    lamina.pca(atlas, n_pcs=4)
    lamina.niche(atlas, z_sections=0, cell_types="kind", radii_um=[20.0, 40.0])
    v = np.asarray(atlas.embedding("niche")[0])
    assert np.isfinite(v).all() and atlas.root["embeddings/niche"].attrs["params"]["n_types"] == 3
    # the lone cell's neighbourhood is itself: its own PCs and its own type, whatever the radius
    g = atlas.root["embeddings/niche"]
    blocks = np.asarray(g["feature_block"][...])
    assert blocks.tolist().count("types") == 6
    import importlib

    from lamina.store import arrays

    niche_mod = importlib.import_module("lamina.stages.niche")
    spec = niche_mod._spec(atlas, niche_mod.NicheOptions(z_sections=0, cell_types="kind", radii_um=(20.0, 40.0)))
    spec.update({"exact_um": 90.0, "fraction": {}, "seed": 0, "z_scale": 1.0})  # exact lists to 3 sigma
    F = len(blocks)
    arrays.create(atlas.root, "f", (atlas.n_cells, F), np.float64, (atlas.cell_chunk, F), ("cell", "f"))
    map_neighbourhoods(
        niche_mod.features,
        atlas,
        "f",
        radius=40.0,
        coords="raw",
        columns=["pca/pcs", "cells/kind"],
        kwargs={"spec": spec},
    )
    lone = np.asarray(atlas.root["f"][n])
    pcs = np.asarray(atlas.root["pca/pcs"][n])
    kind = int(atlas.root["cells/kind"][n])
    np.testing.assert_array_equal(lone[blocks == "means"], np.tile(pcs, 2))
    np.testing.assert_array_equal(lone[blocks == "types"], np.tile(np.eye(3)[kind], 2))


# ------------------------------------------------------------------------------------- the encoder
def test_encoder_trains_resumes_and_loads_local_weights_only(flat_stack, tmp_path):
    import torch
    from safetensors.torch import save_file

    from lamina.stages.encoder import load_encoder

    atlas = _copy(flat_stack, tmp_path)
    lamina.niche(atlas, z_sections=0, radii_um=[30.0, 60.0])
    lamina.encoder(atlas, steps=40, steps_per_task=20, batch=128, pool=2000)
    values, attrs = atlas.embedding("encoder")
    v = np.asarray(values)
    assert v.shape == (atlas.n_cells, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    rec = atlas.stage_records()["encoder"]
    assert rec["final_loss"] < rec["first_loss"]
    assert not any(k.startswith("ckpt-encoder") for k in atlas.root.get("_tmp", zarr.group()).group_keys())
    # a local safetensors file is a starting point; steps=0 uses it as it is and gives the same embedding
    model = load_encoder(atlas.root)
    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    lamina.encoder(atlas, steps=0, weights_path=str(tmp_path / "enc.safetensors"))
    np.testing.assert_allclose(np.asarray(atlas.embedding("encoder")[0]), v, atol=1e-6)
    # a full pickle (as SpatialFormer publishes) is refused, not unpickled
    torch.save(model, tmp_path / "pickled.pt")  # the whole module object
    with pytest.raises(lamina.InputError, match="weights-only"):
        lamina.encoder(atlas, steps=0, weights_path=str(tmp_path / "pickled.pt"))
    with pytest.raises(lamina.InputError, match="not a file"):
        lamina.encoder(atlas, weights_path=str(tmp_path / "absent.safetensors"))


def test_an_interrupted_encoder_training_resumes_from_its_checkpoint(flat_stack, tmp_path, monkeypatch):
    import importlib

    enc = importlib.import_module("lamina.stages.encoder")

    atlas = _copy(flat_stack, tmp_path)
    lamina.niche(atlas, z_sections=0, radii_um=[30.0])
    calls = []
    real = enc._train_block

    def flaky(store, ckpt, cfg, a, b):
        calls.append(a)
        if a == 20 and len(calls) == 2:
            raise RuntimeError("worker lost")
        return real(store, ckpt, cfg, a, b)

    monkeypatch.setattr(enc, "_train_block", flaky)
    with pytest.raises(RuntimeError, match="worker lost"):
        lamina.encoder(atlas, steps=40, steps_per_task=20, batch=64, pool=1000)
    lamina.encoder(atlas, steps=40, steps_per_task=20, batch=64, pool=1000)
    assert calls == [0, 20, 20]  # the second run started at step 20, from the checkpoint


# ------------------------------------------------------------------------------- domains and export
def test_domains_are_written_as_a_categorical_and_exported_with_the_embeddings(flat_stack, tmp_path):
    atlas = _copy(flat_stack, tmp_path)
    mark_aligned(atlas)
    lamina.niche(atlas, radii_um=[30.0, 60.0])
    counts = lamina.domains(atlas, k=5)
    assert list(counts.index) == ["D1", "D2", "D3", "D4", "D5"] and counts.sum() == atlas.n_cells
    assert atlas.categories("domain") == list(counts.index)
    obs = atlas.obs(columns=["domain"])
    assert obs["domain"].value_counts().loc["D1"] == counts.loc["D1"]
    again = lamina.domains(atlas, k=3)  # replaces its own column
    assert len(again) == 3 and atlas.categories("domain") == ["D1", "D2", "D3"]
    for bad, match in ((1, "between 2"), (atlas.n_cells + 1, "between 2")):
        with pytest.raises(lamina.ConfigError, match=match):
            lamina.domains(atlas, k=bad)
    with pytest.raises(lamina.ConfigError, match="ingested data"):
        lamina.domains(atlas, k=3, column="cell_type")
    with pytest.raises(lamina.StoreError, match="no embedding"):
        lamina.domains(atlas, k=3, key="encoder")
    ad = atlas.to_anndata()
    assert ad.obsm["X_niche"].shape == (atlas.n_cells, 26)
    assert ad.obsm["spatial"].shape == (atlas.n_cells, 3)  # aligned 3D, the squidpy key
    np.testing.assert_allclose(ad.obsm["spatial"][:, 2], ad.obs["z"].to_numpy())
    assert list(ad.obs["domain"].cat.categories) == ["D1", "D2", "D3"]
    out = lamina.export.export(atlas, "parquet", tmp_path / "cells.parquet")
    frame = pd.read_parquet(out)
    assert {"niche_0", "niche_25", "aligned_z", "domain"} <= set(frame.columns)
    np.testing.assert_allclose(frame["niche_3"].to_numpy(), ad.obsm["X_niche"][:, 3])


def test_embed_pipeline_runs_niche_then_encoder(flat_stack, tmp_path):
    atlas = _copy(flat_stack, tmp_path)
    seconds = lamina.embed(atlas, learned=False, z_sections=0, radii_um=[30.0])
    assert list(seconds) == ["niche"] and atlas.embeddings() == ["niche"]
    seconds = lamina.embed(atlas, z_sections=0, radii_um=[30.0], steps=10, batch=64, pool=500)
    assert seconds["niche"] < 1.0 and "encoder" in seconds  # niche was up to date
    assert atlas.embeddings() == ["encoder", "niche"]


def test_domains_from_the_command_line(flat_stack, tmp_path, capsys):
    from lamina.cli import main

    atlas = _copy(flat_stack, tmp_path)
    lamina.niche(atlas, z_sections=0, radii_um=[30.0])
    assert main(["domains", atlas.path, "-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "/cells/domain: 4 domains of /embeddings/niche" in out and "D4:" in out
    assert main(["domains", atlas.path, "-k", "1"]) == 2  # a clear error, no traceback
    err = capsys.readouterr().err
    assert "k must be an integer between 2" in err and "Traceback" not in err
    assert lamina.Atlas.open(atlas.path).categories("domain") == ["D1", "D2", "D3", "D4"]  # left intact


def test_large_disks_from_a_hashed_subset_estimate_the_exact_means(flat_stack, tmp_path):
    import importlib

    from lamina.store import arrays

    niche_mod = importlib.import_module("lamina.stages.niche")
    atlas = _copy(flat_stack, tmp_path)
    opts = niche_mod.NicheOptions(z_sections=0, cell_types=None, gradient_um=0.0, radii_um=(30.0, 200.0))
    spec = niche_mod._spec(atlas, opts)
    out = {}
    for name, exact, fraction in (("exact", 200.0, {}), ("sampled", 30.0, {repr(200.0): [0.25] * atlas.n_sections})):
        spec.update({"exact_um": exact, "fraction": fraction, "seed": 0, "z_scale": 1.0})
        arrays.create(atlas.root, name, (atlas.n_cells, 30), np.float64, (atlas.cell_chunk, 30), ("cell", "f"))
        map_neighbourhoods(
            niche_mod.features,
            atlas,
            name,
            radius=exact,
            halo_um=200.0,
            coords="raw",
            columns=["pca/pcs"],
            kwargs={"spec": spec},
            tile_um=300.0,
        )
        out[name] = np.asarray(atlas.root[name][...])[:, 20:30]  # the means at 200 um
    np.testing.assert_array_equal(  # the 30 um disks are exact in both
        np.asarray(atlas.root["exact"][:, 10:20]), np.asarray(atlas.root["sampled"][:, 10:20])
    )
    r = [np.corrcoef(out["exact"][:, j], out["sampled"][:, j])[0, 1] for j in range(3)]
    assert min(r) > 0.85, r  # a quarter of ~30 cells per disk: noisy, unbiased
    bias = np.abs(out["exact"].mean(0) - out["sampled"].mean(0)).max() / out["exact"].std(0).max()
    assert bias < 0.05, bias


def test_pooled_3d_disks_are_cylinder_means_over_the_adjacent_sections(flat_stack, tmp_path):
    """z_mode=pool: the 30 um means of a cell are the mean PCs of the other cells within 30 um in plane in its
    own and the adjacent sections (sections 35 um apart: a 3D ball of 30 um would hold only its own section)."""
    import importlib

    from lamina.store import arrays

    niche_mod = importlib.import_module("lamina.stages.niche")
    atlas = _copy(flat_stack, tmp_path)
    mark_aligned(atlas)
    opts = niche_mod.NicheOptions(cell_types=None, gradient_um=0.0, radii_um=(30.0,))
    spec = niche_mod._spec(atlas, opts)
    assert spec["z"] and spec["z_mode"] == "pool"
    spec.update({"exact_um": 30.0, "fraction": {}, "seed": 0, "z_scale": 0.0})
    arrays.create(atlas.root, "f", (atlas.n_cells, 20), np.float64, (atlas.cell_chunk, 20), ("cell", "f"))
    map_neighbourhoods(
        niche_mod.features,
        atlas,
        "f",
        radius=30.0,
        halo_um=30.0,
        coords="aligned",
        z_sections=1,
        z_scale=0.0,
        columns=["pca/pcs"],
        kwargs={"spec": spec},
        tile_um=300.0,
    )
    means = np.asarray(atlas.root["f"][...])[:, 10:20]
    pcs = np.asarray(atlas.root["pca/pcs"][...])
    x, y = np.asarray(atlas.root["aligned/x"][...]), np.asarray(atlas.root["aligned/y"][...])
    sec = np.asarray(atlas.root["cells/section"][...])
    rng = np.random.default_rng(0)
    checked = from_other = 0
    for i in rng.choice(atlas.n_cells, 40, replace=False):
        near = (np.hypot(x - x[i], y - y[i]) <= 30.0) & (np.abs(sec - sec[i]) <= 1)
        near[i] = False
        expect = pcs[near].mean(0) if near.any() else pcs[i]
        np.testing.assert_allclose(means[i], expect, rtol=1e-5, atol=1e-6)  # float32 PCs
        checked += 1
        from_other += int((near & (sec != sec[i])).any())
    assert checked == 40 and from_other >= 20, from_other  # most disks do reach into the adjacent sections


def test_a_config_builds_the_embed_pipeline(tmp_path, capsys):
    import yaml

    from lamina.cli import main

    rng = np.random.default_rng(4)
    n = 600
    table = pd.DataFrame(
        {"x": rng.uniform(0, 400, n), "y": rng.uniform(0, 400, n), "section": "s1"}
        | {f"g{i}": rng.poisson(4, n) for i in range(5)}
    )
    table.to_csv(tmp_path / "cells.csv", index=False)
    cfg = {
        "store": "e.lamina.zarr",
        "input": {"path": "cells.csv", "genes": "rest"},
        "run": ["embed"],
        "stages": {"niche": {"radii_um": [20, 40], "weights": {"gradient": 0}, "dim": 4}, "encoder": False},
        "cluster": {"n_workers": 1},
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["build", str(tmp_path / "b.yaml")]) == 0
    atlas = lamina.Atlas.open(tmp_path / "e.lamina.zarr")
    assert atlas.completed_stages() == ["ingest", "pca", "niche"]
    assert atlas.embedding("niche")[0].shape == (n, 4 + 5)
    cfg["stages"]["niche"]["weights"] = {"gradiant": 1}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["build", str(tmp_path / "b.yaml")]) == 2
    assert "unknown block(s) ['gradiant']" in capsys.readouterr().err
