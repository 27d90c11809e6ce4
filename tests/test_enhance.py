"""enhance: histology kernels against obvious implementations, the stage on a phantom whose image carries (or
does not carry) the expression, tiling invariance, the spot projection, and bad input."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lamina
from lamina.kernels import enhance as K

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import enhance as bench  # noqa: E402


# ------------------------------------------------------------------------------------------ kernels
def test_stain_density_recovers_known_stains():
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 1.0, (3, 5, 7))
    od = np.einsum("dhw,dc->chw", d, K.STAINS)
    rgb = 256.0 * np.exp(-od) - 1.0
    np.testing.assert_allclose(K.stain_density(rgb), d, atol=1e-9)


def test_pool_mean_matches_a_loop_with_a_partial_edge():
    x = np.random.default_rng(1).normal(size=(2, 7, 10))
    out = K.pool_mean(x, 3)
    assert out.shape == (2, 3, 4)
    for i in range(3):
        for j in range(4):
            np.testing.assert_allclose(out[:, i, j], x[:, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3].mean((1, 2)))


def test_footprint_means_match_brute_force_and_tiles():
    rng = np.random.default_rng(2)
    grid = rng.normal(size=(3, 40, 50))
    centres = rng.uniform(0, 50, (30, 2)) * [1, 0.8]
    means, count = K.footprint_means(grid, centres, 3.2)
    rr, cc = np.mgrid[0:40, 0:50]
    for i, (x, y) in enumerate(centres):
        d2 = (cc + 0.5 - x) ** 2 + (rr + 0.5 - y) ** 2
        inside = d2 <= 3.2**2
        inside[np.unravel_index(np.argmin(d2), d2.shape)] = True
        assert count[i] == inside.sum()
        np.testing.assert_allclose(means[i], grid[:, inside].mean(1))
    # the same from a tile that holds the footprints (origin = the tile's place in the grid)
    sub, _ = K.footprint_means(grid[:, 5:, 7:], centres[(centres[:, 0] > 12) & (centres[:, 1] > 10)], 3.2, (5, 7))
    np.testing.assert_allclose(sub, means[(centres[:, 0] > 12) & (centres[:, 1] > 10)])


def test_fit_ridge_matches_least_squares_with_group_offsets():
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(200, 5))
    group = rng.integers(0, 3, 200)
    B = rng.normal(size=(5, 2))
    O = np.array([[1.0, -1.0], [3.0, 0.0], [-2.0, 2.0]])
    W = Z @ B + O[group] + 0.01 * rng.normal(size=(200, 2))
    b, o = K.fit_ridge(Z, W, group, 4, alpha=0.0)
    np.testing.assert_allclose(b, B, atol=0.01)
    np.testing.assert_allclose(o[:3], O, atol=0.01)
    np.testing.assert_allclose(o[3], o[:3].mean(0))  # a group without rows gets the mean offset
    shrunk, _ = K.fit_ridge(Z, W, group, 3, alpha=1e6)
    assert np.abs(shrunk).max() < 0.01


def test_ridge_block_error_matches_refits_without_each_block():
    rng = np.random.default_rng(5)
    Z, W, group = rng.normal(size=(60, 4)), rng.normal(size=(60, 2)), rng.integers(0, 2, 60)
    blocks = rng.integers(0, 8, 60)
    brute = 0.0
    for b in np.unique(blocks):
        out = blocks == b
        coef, off = K.fit_ridge(Z[~out], W[~out], group[~out], 2, 1.0)
        brute += float(((W[out] - Z[out] @ coef - off[group[out]]) ** 2).sum())
    np.testing.assert_allclose(K.ridge_block_error(Z, W, group, 2, [1.0], blocks), [brute], rtol=1e-8)
    # one row per block is leave-one-out
    for alpha in (0.1, 10.0):
        loo = 0.0
        for i in range(60):
            keep = np.arange(60) != i
            coef, off = K.fit_ridge(Z[keep], W[keep], group[keep], 2, alpha)
            loo += float(((W[i] - Z[i] @ coef - off[group[i]]) ** 2).sum())
        np.testing.assert_allclose(K.ridge_block_error(Z, W, group, 2, [alpha], np.arange(60)), [loo], rtol=1e-8)
    with pytest.raises(ValueError, match="share n"):
        K.ridge_block_error(Z, W[:50], group, 2, [1.0], blocks)


def test_per_feature_penalties_equal_a_rescaled_design():
    """A penalty ``a_f`` per feature is a penalty of 1 on the feature scaled by ``1 / sqrt(a_f)``."""
    rng = np.random.default_rng(8)
    Z, W, group = rng.normal(size=(80, 5)), rng.normal(size=(80, 3)), rng.integers(0, 2, 80)
    pen = np.array([0.5, 2.0, 10.0, 100.0, 1.0])
    b, o = K.fit_ridge(Z, W, group, 2, pen)
    b1, o1 = K.fit_ridge(Z / np.sqrt(pen), W, group, 2, 1.0)
    np.testing.assert_allclose(b, b1 / np.sqrt(pen)[:, None], rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(o, o1, rtol=1e-7, atol=1e-10)
    blocks = rng.integers(0, 6, 80)
    np.testing.assert_allclose(
        K.ridge_block_error(Z, W, group, 2, [pen], blocks),
        K.ridge_block_error(Z / np.sqrt(pen), W, group, 2, [1.0], blocks),
    )
    with pytest.raises(ValueError, match="one per feature"):
        K.fit_ridge(Z, W, group, 2, pen[:3])


def test_neighbour_features_match_the_dense_formula_and_leave_a_spot_out_of_its_own():
    rng = np.random.default_rng(9)
    spots, W = rng.uniform(0, 600, (40, 2)), rng.uniform(0, 2, (40, 3))
    base, sigmas = W.mean(0), [30.0, 90.0]
    pts = np.r_[rng.uniform(0, 600, (25, 2)), [[5000.0, 5000.0]]]  # the last point has no spot near

    def dense(p, exclude=None):
        d = np.sqrt(((p[:, None] - spots[None]) ** 2).sum(-1))
        out = []
        for s in sigmas:
            k = np.where(d <= 4 * s, np.exp(-(d**2) / (2 * s * s)), 0.0)
            if exclude is not None:
                k[np.arange(len(p)), exclude] = 0.0
            out.append(base + k @ (W - base) / (k.sum(1) + 0.1)[:, None])
        return np.concatenate(out, 1)

    np.testing.assert_allclose(K.neighbour_features(pts, spots, W, base, sigmas, 0.1), dense(pts), rtol=1e-10)
    np.testing.assert_allclose(K.neighbour_features(pts, spots, W, base, sigmas)[-1], np.tile(base, 2))
    own = K.neighbour_features(spots, spots, W, base, sigmas, 0.1, exclude=np.arange(40))
    np.testing.assert_allclose(own, dense(spots, np.arange(40)), rtol=1e-10)
    # neighbour_design: per group, each spot left out of its own; points from all spots of their group
    group = np.repeat([0, 1], 20)
    mine, at, b = K.neighbour_design(spots, W, group, 3, sigmas, 0.1, (pts, np.zeros(len(pts), np.int64)))
    np.testing.assert_allclose(b[:2], [W[:20].mean(0), W[20:].mean(0)])
    np.testing.assert_allclose(b[2], W.mean(0))  # a group without spots: the mean of all
    np.testing.assert_allclose(
        mine[:20], K.neighbour_features(spots[:20], spots[:20], W[:20], b[0], sigmas, 0.1, exclude=np.arange(20))
    )
    np.testing.assert_allclose(at, K.neighbour_features(pts, spots[:20], W[:20], b[0], sigmas, 0.1))


def test_on_lattice_is_bilinear_between_its_nodes_and_the_same_for_any_tiling():
    calls = []

    def fn(nodes):
        calls.append(len(nodes))
        return np.c_[3.0 * nodes[:, 0] - 2.0 * nodes[:, 1] + 1.0, np.sin(nodes[:, 0] / 7.0)]

    rc = np.stack(np.meshgrid(np.arange(40) + 0.5, np.arange(30) + 0.5), -1).reshape(-1, 2)
    whole = K.on_lattice(rc, 6.0, fn)
    np.testing.assert_allclose(whole[:, 0], 3.0 * rc[:, 0] - 2.0 * rc[:, 1] + 1.0, atol=1e-10)  # linear: exact
    assert calls[-1] == 8 * 6  # the nodes 0, 6, ..., 42 by 0, 6, ..., 30: each once
    at_node = K.on_lattice(np.array([[12.0, 18.0]]), 6.0, fn)
    np.testing.assert_allclose(at_node, fn(np.array([[12.0, 18.0]])), atol=1e-12)
    parts = np.concatenate([K.on_lattice(rc[i : i + 97], 6.0, fn) for i in range(0, len(rc), 97)])
    np.testing.assert_array_equal(parts, whole)
    # a smooth field: within the bilinear bound h^2 / 8 max |f''|
    np.testing.assert_allclose(whole[:, 1], np.sin(rc[:, 0] / 7.0), atol=36 / (8 * 49) + 1e-9)


def test_neighbour_field_interpolates_the_neighbour_features_within_a_small_error():
    rng = np.random.default_rng(4)
    g = np.arange(0, 2000, 100.0) + 50
    spots = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    W = np.c_[(spots[:, 0] > 1000).astype(float) * 2.0, rng.uniform(0, 1, len(spots))]  # a step edge and noise
    base, sigmas = W.mean(0), [20.0, 75.0, 300.0]
    grid_to_um = np.array([[8.0, 0, 0], [0, 8.0, 0], [0, 0, 1]])  # 8 um superpixels
    rc = rng.uniform(0, 250, (3000, 2))
    exact = K.neighbour_features(K.to_um(rc, grid_to_um), spots, W, base, sigmas, 0.1)
    got = K.neighbour_field(rc, grid_to_um, 8.0, spots, W, base, sigmas, 0.1)
    np.testing.assert_allclose(got[:, :2], exact[:, :2], rtol=1e-12)  # 20 um: a step under a superpixel, exact
    err = np.abs(got - exact)[:, 2:]
    assert err[:, 0].max() < 0.01 * 2.0  # the step edge of height 2, to within 1%
    assert err.max() < 0.05 and err.mean() < 0.005


def test_neighbour_ridge_cv_hides_each_fold_from_the_neighbour_features():
    rng = np.random.default_rng(10)
    n = 90
    xy, Z = rng.uniform(0, 500, (n, 2)), rng.normal(size=(n, 3))
    W = np.c_[np.sin(xy[:, 0] / 80), np.cos(xy[:, 1] / 60)] + 0.1 * rng.normal(size=(n, 2))
    group, folds, sigmas = rng.integers(0, 2, n), rng.integers(0, 3, n), [40.0]
    pens = [np.r_[np.full(3, 10.0), np.full(2, 1.0)], np.full(5, 1e6)]
    brute = np.zeros(2)
    for k in range(3):
        tr, ho = folds != k, folds == k
        own, at, _ = K.neighbour_design(xy[tr], W[tr], group[tr], 2, sigmas, 0.1, (xy[ho], group[ho]))
        mu, sd = own.mean(0), own.std(0)
        for j, pen in enumerate(pens):
            B, O = K.fit_ridge(np.c_[Z[tr], (own - mu) / sd], W[tr], group[tr], 2, pen)
            brute[j] += ((W[ho] - np.c_[Z[ho], (at - mu) / sd] @ B - O[group[ho]]) ** 2).sum()
    cv = K.neighbour_ridge_cv(Z, W, xy, group, 2, folds, sigmas, pens, 0.1)
    np.testing.assert_allclose(cv, brute, rtol=1e-8)
    assert cv[0] < 0.5 * cv[1]  # the neighbours carry the smooth field; the offsets alone do not


def test_spatial_blocks_are_squares_within_each_section():
    xy = np.array([[10.0, 10.0], [290.0, 290.0], [310.0, 10.0], [10.0, 10.0], [5.0, 5.0], [6.0, 6.0]])
    group = np.array([0, 0, 0, 1, 2, 2])
    b = K.spatial_blocks(xy, group, 300.0)
    assert b[0] == b[1] != b[2]  # same 300 um square, then the next one
    assert b[3] != b[0]  # the same place in another section is another block
    assert b[4] != b[5] and len(set(b)) == 5  # a section inside one square: one block per row
    np.testing.assert_array_equal(K.spatial_blocks(xy, group, 0.0), np.arange(6))


def test_project_to_spots_makes_each_spots_cells_average_to_its_measurement():
    rng = np.random.default_rng(6)
    pred, measured = rng.normal(size=(40, 3)), rng.normal(size=(5, 3))
    owner = rng.integers(-1, 4, 40)  # spot 4 holds no cell
    out = K.project_to_spots(pred, owner, measured)
    for s in range(4):
        np.testing.assert_allclose(out[owner == s].mean(0), measured[s], atol=1e-12)
        d = out[owner == s] - pred[owner == s]  # one shift per spot: the detail among its cells stays
        np.testing.assert_allclose(d, np.broadcast_to(d[0], d.shape), atol=1e-12)
    np.testing.assert_array_equal(out[owner == -1], pred[owner == -1])
    with pytest.raises(ValueError, match="measured must be"):
        K.project_to_spots(pred, owner, measured[:, :2])
    with pytest.raises(ValueError, match="owner"):
        K.project_to_spots(pred, owner[:10], measured)


def test_residual_field_matches_the_dense_formula():
    rng = np.random.default_rng(4)
    pts, spots, res = rng.uniform(0, 500, (60, 2)), rng.uniform(0, 500, (25, 2)), rng.normal(size=(25, 3))
    k = np.exp(-((pts[:, None] - spots[None]) ** 2).sum(-1) / (2 * 40.0**2))
    k[np.sqrt(((pts[:, None] - spots[None]) ** 2).sum(-1)) > 160] = 0
    np.testing.assert_allclose(K.residual_field(pts, spots, res, 40.0, 0.1), k @ res / (k.sum(1) + 0.1)[:, None])


def test_histology_phantom_fields_on_its_grid_equal_the_pointwise_sum():
    """The phantom's image evaluates its Gaussian bumps separably on the pixel grid; the same values as the sum
    over bumps at each point (the form its truth uses at the spots)."""
    from lamina.datasets.histology import _fields

    at, on_grid = _fields(np.random.default_rng(0), 2, 300.0)
    c = np.linspace(1.0, 299.0, 37)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    np.testing.assert_allclose(on_grid(c), at(xx.ravel(), yy.ravel()).reshape(2, 37, 37), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------- stage
def _store(tmp_path, info=1.0, seed=0, name="ph.lamina.zarr", **kw):
    from lamina.datasets.histology import histology_phantom

    ph = histology_phantom(seed=seed, info=info, folder=tmp_path / f"img{info}", **kw)
    atlas = bench.build_store(tmp_path / name, ph.table, ph.genes, ph.images, ph.pixel_size_um, obs=["visible"])
    return ph, atlas


def _scores(ph, atlas, **options):
    vis = ph.table["visible"].to_numpy().astype(bool)
    Y = ph.table[ph.genes].to_numpy(np.float64)
    xy = ph.table[["x", "y"]].to_numpy(np.float64) * ph.pixel_size_um
    sec = ph.table["section"].to_numpy().astype(str)
    genes = np.arange(len(ph.genes))
    P = bench.lamina_predict(atlas, {"fit_column": "visible", **options})
    return (
        bench.score(P, ph.truth, sec, ~vis, genes),
        bench.score(bench.idw(Y, xy, sec, vis), ph.truth, sec, ~vis, genes),
        bench.score(bench.gauss(Y, xy, sec, vis, 100.0), ph.truth, sec, ~vis, genes),
    )


def test_enhance_uses_the_image_when_it_carries_expression(tmp_path):
    ph, atlas = _store(tmp_path, info=1.0)
    lam, idw, gauss = _scores(ph, atlas)
    # hidden spots only, against the noise-free truth: measured 0.904 vs IDW 0.733
    assert lam > idw + 0.10 and lam > 0.85, (lam, idw)
    g = atlas.root["enhance"]
    assert g.attrs["encoding-type"] == "lamina.enhance"
    assert g["S0"].attrs["encoding-type"] == "lamina.enhance-section"
    assert g["S0/embedding"].shape[0] == g.attrs["rank"]
    assert "features" not in g["S0"] and "context" not in g["S0"]  # the scratch grids are dropped
    assert np.asarray(g["cells/fitted"][...]).sum() == ph.table["visible"].sum()


def test_several_seeds_are_one_model_whose_gene_maps_are_their_mean(tmp_path):
    ph, atlas = _store(tmp_path, info=1.0)
    one, _, _ = _scores(ph, atlas, rank=4)
    three, _, _ = _scores(ph, atlas, rank=4, seeds=3)
    g = atlas.root["enhance"]
    assert g.attrs["rank"] == 12 and g["S0/embedding"].shape[0] == 12 and g["model/loadings"].shape[0] == 12
    # each model's loadings carry 1 / 3: the three blocks of metagenes sum to about one model's total
    H = np.asarray(g["model/loadings"][...])
    assert np.allclose([H[k * 4 : (k + 1) * 4].sum() for k in range(3)], H.sum() / 3, rtol=0.25)
    assert abs(three - one) < 0.03 and three > 0.85, (one, three)  # bootstrap models agree on hidden spots
    again, _, _ = _scores(ph, atlas, rank=4, seeds=3)
    assert again == three  # seeded: the same ensemble


def test_enhance_does_not_invent_detail_from_an_uninformative_image(tmp_path):
    ph, atlas = _store(tmp_path, info=0.0)
    lam, idw, gauss = _scores(ph, atlas)
    # the image follows an unrelated field: the image penalty is the grid's largest and enhance gives what its
    # spots alone give (measured 0.759 both; IDW 0.733: the spots' own smoothing, metagenes and neighbours)
    assert atlas.root["enhance"].attrs["alpha"] == 1e6
    spots_only, _, _ = _scores(ph, atlas, alpha=1e9)
    assert abs(lam - spots_only) <= 0.005, (lam, spots_only)
    assert idw - 0.02 <= lam <= max(idw, gauss) + 0.04, (lam, idw, gauss)


def test_the_neighbour_block_beats_the_image_head_alone_on_noisy_spots(tmp_path):
    """Version 3's neighbour block against version 2 (neighbour_pitches=()), hidden spots of the noisy phantom
    against its truth: the fitted spots' smoothed scores, weighted by a penalty chosen with each fold hidden."""
    ph, atlas = _store(tmp_path, info=0.0, noise=0.4)
    v3, idw, _ = _scores(ph, atlas)
    g = atlas.root["enhance"]
    R = g.attrs["rank"]
    assert g["model/neighbour_coef"].shape == (3 * R, R) and g["model/neighbour_base"].shape == (1, R)
    assert g.attrs["neighbour_sigmas_um"] == [75.0, 150.0, 300.0]  # 0.75 / 1.5 / 3 pitches of 100 um
    v2, _, _ = _scores(ph, atlas, neighbour_pitches=[])
    assert "neighbour_coef" not in atlas.root["enhance/model"]
    assert v3 > v2 + 0.01 and v3 > idw + 0.03, (v3, v2, idw)  # measured 0.668, 0.650, IDW 0.622


def test_embedding_is_the_same_under_two_tilings_and_matches_the_spot_scores(tmp_path, monkeypatch):
    import importlib

    stage = importlib.import_module("lamina.stages.histology")  # the module, not the function it exports

    ph, atlas = _store(tmp_path)
    opts = {"fit_column": "visible", "genes": ["G00", "G03"], "project": True, "residual_sigma_um": 150.0}
    lamina.enhance(atlas, **opts)
    g = atlas.root["enhance"]
    sp_um = atlas.root["histology/S0"].attrs["superpixel_um"]
    # every neighbour width and the residual field are interpolated from lattices here, so the tiles must share
    # their nodes
    assert min(g.attrs["neighbour_sigmas_um"]) / (K.LATTICE_PER_SIGMA * sp_um) > 1.0
    assert g.attrs["residual_sigma_um"] / (K.LATTICE_PER_SIGMA * sp_um) > 1.0
    emb = np.asarray(g["S0/embedding"][...])
    genes = np.asarray(g["S0/genes"][...])
    assert atlas.root["enhance/S0/genes"].chunks[0] == 2
    monkeypatch.setattr(stage, "TILE", 24)
    monkeypatch.setattr(importlib.import_module("lamina.stages.enhancement"), "GENE_CHUNK", 1)
    lamina.enhance(atlas, **opts, force=True)
    assert atlas.root["histology/S0/features"].chunks[1] == 24
    g = atlas.root["enhance"]
    assert g["S0/embedding"].chunks[1] == 24 and emb.shape[1] > 48
    assert g["S0/genes"].chunks[:2] == (1, 24)  # gene-chunked: one gene per chunk and per task
    np.testing.assert_allclose(np.asarray(g["S0/embedding"][...]), emb, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g["S0/genes"][...]), genes, atol=1e-5)
    # /enhance/cells/scores is each spot's footprint mean of the embedding (the tiles and the driver agree)
    A = np.asarray(g["S0"].attrs["grid_to_section"])
    xy = np.c_[atlas.root["cells/x"][...], atlas.root["cells/y"][...]].astype(float)
    centres = (np.c_[xy, np.ones(len(xy))] @ np.linalg.inv(A).T)[:, :2]
    radius = float(g["S0"].attrs["spot_radius_um"]) / float(g["S0"].attrs["superpixel_um"])
    means, _ = K.footprint_means(emb, centres, radius)
    np.testing.assert_allclose(means, np.asarray(g["cells/scores"][...]), atol=1e-4)
    # the picture: image, measured spots and enhanced map of the genes written, per section
    from PIL import Image

    from lamina.report import enhance_figure

    png = enhance_figure(atlas, tmp_path / "enhance.png")
    assert Image.open(png).size[0] > 3 * Image.open(png).size[1]  # 1 section x (image + 2 genes x 2 panels)
    with pytest.raises(lamina.UnknownGeneError, match="NOPE"):
        enhance_figure(atlas, tmp_path / "x.png", genes=["NOPE"])
    # gene maps = embedding x loadings, and inside a fitted spot's footprint (project) + its measurement's residual:
    # the footprint mean of a gene map is the measurement
    names = [str(x) for x in g["model/gene"][...]]
    H = np.asarray(g["model/loadings"][...])[:, [names.index("G00"), names.index("G03")]]
    fitted = np.asarray(g["cells/fitted"][...])
    owner = K.footprint_mask(centres[fitted], radius, *emb.shape[1:])
    outside = np.broadcast_to(owner < 0, genes.shape)
    np.testing.assert_allclose(genes[outside], np.einsum("rg,ryx->gyx", H, emb)[outside], atol=1e-4)
    gmeans, _ = K.footprint_means(genes, centres[fitted], radius)
    X = np.asarray(atlas.root["X"][...])[fitted][:, [list(atlas.genes).index(x) for x in ("G00", "G03")]]
    np.testing.assert_allclose(gmeans, X, atol=1e-4)


def test_projection_makes_fitted_spots_match_their_scores(tmp_path):
    from scipy.optimize import nnls

    ph, atlas = _store(tmp_path)
    lamina.enhance(atlas, fit_column="visible", project=True)
    g = atlas.root["enhance"]
    fitted = np.asarray(g["cells/fitted"][...])
    scores = np.asarray(g["cells/scores"][...], np.float64)
    names = [str(x) for x in g["model/gene"][...]]
    X = np.asarray(atlas.root["X"][...], np.float64)[:, [list(atlas.genes).index(n) for n in names]]
    H = np.asarray(g["model/loadings"][...], np.float64)
    # the projected scores of a fitted spot are its NMF scores W_s = argmin_{w >= 0} |x_s - w H| (sklearn's
    # transform, to its tolerance): the spot's footprint mean reproduces W_s H
    W = np.stack([nnls(H.T, x)[0] for x in X[fitted]])
    np.testing.assert_allclose(scores[fitted], W, atol=0.02 * np.abs(W).max())
    assert np.abs(scores[~fitted] - np.stack([nnls(H.T, x)[0] for x in X[~fitted]])).mean() > 0.01


def test_enhance_cells_reads_the_embedding_and_projects_each_spots_cells(tmp_path):
    import pandas as pd

    ph, atlas = _store(tmp_path)
    lamina.enhance(atlas, fit_column="visible", project=True)
    g = atlas.root["enhance"]
    xy = np.c_[atlas.root["cells/x"][...], atlas.root["cells/y"][...]].astype(np.float64)
    radius = float(g["S0"].attrs["spot_radius_um"])
    scores = np.asarray(g["cells/scores"][...], np.float64)
    names = [str(x) for x in g["model/gene"][...]]
    H = np.asarray(g["model/loadings"][...], np.float64)
    metagenes = [f"metagene_{k}" for k in range(H.shape[0])]
    # a "cell" on each spot with the spot's disc is the spot: its scores, and genes = scores @ loadings
    at_spots = lamina.enhance_cells(
        atlas, pd.DataFrame({"section": "S0", "x": xy[:, 0], "y": xy[:, 1]}), radius_um=radius, project=False
    )
    np.testing.assert_allclose(at_spots[metagenes].to_numpy(), scores, atol=1e-5)
    np.testing.assert_allclose(at_spots[names].to_numpy(), scores @ H, atol=1e-4)
    assert (at_spots.spot == -1).all()
    # four cells of 5 um around each spot centre, given in image pixels as a segmentation of the image gives them
    offsets = np.array([[-8.0, -8.0], [8.0, -8.0], [-8.0, 8.0], [8.0, 8.0]])
    kids = (xy[:, None] + offsets[None]).reshape(-1, 2)
    px = kids / ph.pixel_size_um
    cells = pd.DataFrame({"sec": "S0", "cx": px[:, 0], "cy": px[:, 1]}, index=[f"c{i}" for i in range(len(px))])
    out = lamina.enhance_cells(atlas, cells, section="sec", x="cx", y="cy", frame="image", radius_um=5.0)
    assert list(out.index) == list(cells.index)
    np.testing.assert_allclose(out[["x", "y"]].to_numpy(), kids, atol=1e-3)
    fitted = np.asarray(g["cells/fitted"][...])
    parent = np.repeat(np.arange(len(xy)), 4)
    np.testing.assert_array_equal(out.spot.to_numpy(), np.where(fitted[parent], parent, -1))
    X = np.asarray(atlas.root["X"][...], np.float64)[:, [list(atlas.genes).index(n) for n in names]]
    means = out[names].to_numpy().reshape(-1, 4, len(names)).mean(1)
    np.testing.assert_allclose(means[fitted], X[fitted], atol=1e-5)  # each measured spot's cells average to it
    # a held-out spot's cells are the embedding's, unshifted; and the cells differ from each other
    free = out[np.repeat(~fitted, 4)]
    np.testing.assert_allclose(free[names].to_numpy(), free[metagenes].to_numpy() @ H, atol=1e-4)
    assert np.abs(out[names].to_numpy().reshape(-1, 4, len(names)).std(1)).mean() > 0.01


def test_enhanced_cells_export_as_parquet_and_anndata_from_the_cli(tmp_path, capsys):
    import anndata as ad
    import pandas as pd

    from lamina.cli import main

    ph, atlas = _store(tmp_path)
    lamina.enhance(atlas, fit_column="visible")
    xy = np.c_[atlas.root["cells/x"][:40], atlas.root["cells/y"][:40]].astype(np.float64) + 6.0
    table = pd.DataFrame({"section": "S0", "x": xy[:, 0], "y": xy[:, 1]}, index=[f"n{i}" for i in range(40)])
    table.to_csv(tmp_path / "nuclei.csv", index_label="cell")
    want = lamina.enhance_cells(atlas, table, radius_um=4.0, genes=["G01", "G03"])
    argv = ["export", atlas.path, "--enhanced", "--cells", str(tmp_path / "nuclei.csv"), "--cell-radius", "4"]
    assert main([*argv, "--format", "parquet", "--genes", "G01,G03", "--out", str(tmp_path / "c.parquet")]) == 0
    got = pd.read_parquet(tmp_path / "c.parquet")
    assert list(got.cell) == list(table.index)
    np.testing.assert_allclose(got[["G01", "G03"]].to_numpy(), want[["G01", "G03"]].to_numpy(), atol=1e-6)
    assert main([*argv, "--format", "anndata", "--out", str(tmp_path / "c.h5ad")]) == 0
    # --sections keeps the table's rows of those sections; an unknown one is named
    assert main([*argv, "--format", "parquet", "--sections", "S0", "--out", str(tmp_path / "s.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "s.parquet")) == 40
    capsys.readouterr()
    assert main([*argv, "--format", "parquet", "--sections", "S9", "--out", str(tmp_path / "s9.parquet")]) == 2
    assert "no section 'S9'" in capsys.readouterr().err
    # from Python: an option enhance_cells does not take is named before anything is written
    with pytest.raises(lamina.ConfigError, match="unknown option.*radius"):
        lamina.export_enhanced_cells(atlas, table, tmp_path / "o.parquet", radius=4.0)
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "o.parquet.partial").exists()
    a = ad.read_h5ad(tmp_path / "c.h5ad")
    assert (
        a.n_obs == 40 and "G01" in a.var_names and a.obsm["X_enhance"].shape[1] == atlas.root["enhance"].attrs["rank"]
    )
    np.testing.assert_allclose(a.obsm["spatial"][:, :2], xy, atol=1e-3)
    np.testing.assert_array_equal(a.obs["spot"].to_numpy(), want["spot"].to_numpy())
    # a table it cannot read, or --cells without --enhanced: exit 2, a message, no file
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                atlas.path,
                "--enhanced",
                "--format",
                "parquet",
                "--cells",
                str(tmp_path / "bad.parquet"),
                "--out",
                str(tmp_path / "bad-out.parquet"),
            ]
        )
        == 2
    )
    assert "could not be read as a table" in capsys.readouterr().err
    assert not (tmp_path / "bad-out.parquet").exists() and not (tmp_path / "bad-out.parquet.partial").exists()
    assert main(["export", atlas.path, "--format", "parquet", "--cells", str(tmp_path / "nuclei.csv")]) == 2


def test_enhance_cells_refuses_what_it_cannot_place(tmp_path):
    import pandas as pd

    ph, atlas = _store(tmp_path)
    cells = pd.DataFrame({"section": ["S0", "S0"], "x": [100.0, 200.0], "y": [100.0, 200.0]})
    with pytest.raises(lamina.MissingInputError, match="run lamina.enhance"):
        lamina.enhance_cells(atlas, cells)
    lamina.enhance(atlas, fit_column="visible")
    with pytest.raises(lamina.InputError, match=r"no column\(s\) \['cx'\]"):
        lamina.enhance_cells(atlas, cells, x="cx")
    with pytest.raises(lamina.InputError, match="NaN or infinite coordinates .* index 1"):
        lamina.enhance_cells(atlas, cells.assign(y=[100.0, np.nan]))
    with pytest.raises(lamina.UnknownSectionError, match=r"\['S7'\].*enhanced: S0"):
        lamina.enhance_cells(atlas, cells.assign(section=["S0", "S7"]))
    with pytest.raises(lamina.InputError, match="1 of 2 cells of section 'S0' lie outside .* index 1"):
        lamina.enhance_cells(atlas, cells.assign(x=[100.0, 1e6]))
    with pytest.raises(lamina.ConfigError, match="frame='pixels'"):
        lamina.enhance_cells(atlas, cells, frame="pixels")
    with pytest.raises(lamina.ConfigError, match="radius_um=-1"):
        lamina.enhance_cells(atlas, cells, radius_um=-1.0)
    with pytest.raises(lamina.UnknownGeneError, match="NOPE"):
        lamina.enhance_cells(atlas, cells, genes=["NOPE"])


# --------------------------------------------------------------------------------------- bad input
def test_spots_outside_the_image_name_the_section_and_file(tmp_path):
    from lamina.datasets.histology import histology_phantom

    ph = histology_phantom(seed=1, folder=tmp_path / "img")
    # pixel size 4x too small: the spots fall far outside the image
    atlas = bench.build_store(tmp_path / "bad.lamina.zarr", ph.table, ph.genes, {}, ph.pixel_size_um, obs=["visible"])
    lamina.add_image(atlas, "S0", ph.images["S0"], pixel_size_um=ph.pixel_size_um / 4)
    with pytest.raises(lamina.InputError, match=r"outside its image.*S0\.png"):
        lamina.enhance(atlas)
    assert "enhance" not in atlas.root  # nothing written half


def test_enhance_refuses_what_it_cannot_use(tmp_path):
    ph, atlas = _store(tmp_path)
    with pytest.raises(lamina.UnknownGeneError, match="NOPE"):
        lamina.enhance(atlas, genes=["NOPE"])
    with pytest.raises(lamina.MissingInputError, match="fit_column='held'"):
        lamina.enhance(atlas, fit_column="held")
    with pytest.raises(lamina.InputError, match=r"\['S9'\] are not in"):
        lamina.enhance(atlas, sections=["S9"])
    bare = bench.build_store(tmp_path / "bare.lamina.zarr", ph.table, ph.genes, {}, ph.pixel_size_um)
    with pytest.raises(lamina.MissingInputError, match="no section .* has an image"):
        lamina.enhance(bare)
    neg = ph.table.copy()
    neg[ph.genes] = neg[ph.genes] - 5.0
    atlas_neg = bench.build_store(tmp_path / "neg.lamina.zarr", neg, ph.genes, ph.images, ph.pixel_size_um)
    with pytest.raises(lamina.InputError, match="negative or non-finite"):
        lamina.enhance(atlas_neg)


def test_a_grey_image_is_read_as_rgb(tmp_path):
    from PIL import Image

    ph, atlas = _store(tmp_path)
    grey = tmp_path / "grey.png"
    Image.open(ph.images["S0"]).convert("L").save(grey)
    lamina.add_image(atlas, "S0", grey, pixel_size_um=ph.pixel_size_um)
    lam, idw, _ = _scores(ph, atlas)
    assert lam > idw, (lam, idw)  # grey still carries the stain's density


def test_benchmark_smoke(tmp_path):
    import subprocess

    out = subprocess.run(
        [sys.executable, str(Path(bench.__file__)), "--smoke", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT smoke"))
    vals = dict(kv.split("=") for kv in line.split()[2:])
    assert float(vals["lamina_r"]) > float(vals["idw_r"]) + 0.1


def test_a_refit_reuses_the_features_and_a_new_image_recomputes_them(tmp_path):
    ph, atlas = _store(tmp_path)
    lamina.enhance(atlas, fit_column="visible")
    first = atlas.stage_records()["histology"]["finished"]
    seconds = lamina.enhance(atlas, rank=4)  # another model: the features are reused
    assert atlas.stage_records()["histology"]["finished"] == first and seconds["histology"] < 1.0
    assert atlas.root["enhance"].attrs["rank"] == 4
    lamina.add_image(atlas, "S0", ph.images["S0"], pixel_size_um=ph.pixel_size_um)  # the same file, a new copy
    lamina.enhance(atlas, rank=4)
    assert atlas.stage_records()["histology"]["finished"] != first


def test_export_of_the_enhanced_maps_parquet_anndata_and_cli(tmp_path):
    import anndata as ad
    import pandas as pd

    from lamina.cli import main

    ph, atlas = _store(tmp_path)
    lamina.enhance(atlas, fit_column="visible")
    out = lamina.export_enhanced(atlas, tmp_path / "sp.parquet", genes=["G01", "G05"])
    df = pd.read_parquet(out)
    g = atlas.root["enhance"]
    emb = np.asarray(g["S0/embedding"][...])
    # every superpixel within one pitch of a spot: the lattice covers the image, so nearly all of it
    assert 0.9 * emb.shape[1] * emb.shape[2] <= len(df) <= emb.shape[1] * emb.shape[2]
    assert list(df.columns[:4]) == ["section", "x", "y", "z"] and "atlas_x" not in df  # not aligned
    names = [str(x) for x in g["model/gene"][...]]
    H = np.asarray(g["model/loadings"][...])
    A = np.asarray(g["S0"].attrs["grid_to_section"])
    col = np.floor((df.x.to_numpy() - A[0, 2]) / A[0, 0]).astype(int)
    row = np.floor((df.y.to_numpy() - A[1, 2]) / A[1, 1]).astype(int)
    np.testing.assert_allclose(
        df.G05, (H[:, names.index("G05")] @ emb.reshape(len(H), -1))[row * emb.shape[2] + col], atol=1e-4
    )
    assert main(["export", atlas.path, "--format", "anndata", "--enhanced", "--out", str(tmp_path / "sp.h5ad")]) == 0
    adata = ad.read_h5ad(tmp_path / "sp.h5ad")
    assert adata.n_obs == len(df) and adata.obsm["X_enhance"].shape[1] == g.attrs["rank"]
    assert adata.obsm["spatial"].shape[1] == 3 and adata.n_vars == len(names)
    assert main(["export", atlas.path, "--format", "csv", "--enhanced"]) == 2
    assert not (tmp_path / "sp.parquet.partial").exists()


def test_bad_images_are_refused_before_the_store_changes(tmp_path):
    ph, atlas = _store(tmp_path)
    before = atlas.root["images/S0"].attrs["written"]
    with pytest.raises(lamina.InputError, match="nope.png does not exist"):
        lamina.add_image(atlas, "S0", tmp_path / "nope.png", pixel_size_um=2.0)
    with pytest.raises(lamina.InputError, match="S0.png"):
        lamina.add_image(atlas, "S0", ph.images["S0"], pixel_size_um=0.0)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(lamina.InputError, match="broken.png: not a readable image"):
        lamina.add_image(atlas, "S0", broken, pixel_size_um=2.0)
    assert atlas.root["images/S0"].attrs["written"] == before


def test_a_small_second_section_is_enhanced_with_the_shared_model(tmp_path):
    from lamina.datasets.histology import histology_phantom

    ph = histology_phantom(seed=2, folder=tmp_path / "img")
    two = ph.table.copy()
    two.loc[two.index[:12], "section"] = "S1"  # a second section of 12 spots (ingest refuses fewer than 10)
    two["not_s1"] = (two["section"] != "S1").astype(np.int8)
    images = {"S0": ph.images["S0"], "S1": ph.images["S0"]}
    atlas = bench.build_store(tmp_path / "two.lamina.zarr", two, ph.genes, images, ph.pixel_size_um, obs=["not_s1"])
    lamina.enhance(atlas)  # one model across the sections, an offset per section
    scores = np.asarray(atlas.root["enhance/cells/scores"][...])
    assert np.isfinite(scores).all() and scores.shape[0] == len(two)
    assert atlas.root["enhance/model/offsets"].shape[0] == 2
    # a section with no fitted spot has no neighbours to read: the image-only head (version 2's, without the
    # residuals it would not have either) predicts it, and the sections with spots keep the joint head
    lamina.enhance(atlas, fit_column="not_s1")
    g = atlas.root["enhance"]
    assert g.attrs["image_only_sections"] == ["S1"] and "image_only_coef" in g["model"]
    s1 = np.asarray(atlas.root["cells/not_s1"][...]) == 0
    assert s1.sum() == 12
    joint = np.asarray(g["cells/scores"][...])
    lamina.enhance(atlas, fit_column="not_s1", neighbour_pitches=[], residual_sigma_um=0.0)
    assert atlas.root["enhance"].attrs["image_only_sections"] == []
    image_only = np.asarray(atlas.root["enhance/cells/scores"][...])
    np.testing.assert_allclose(joint[s1], image_only[s1], rtol=1e-5, atol=1e-6)
    assert np.abs(joint[~s1] - image_only[~s1]).max() > 1e-3


def test_the_her2st_enhance_example_builds(tmp_path, data_dir):
    """examples/her2st_enhance.yaml through `lamina build` (two of its sections, to stay short)."""
    import yaml

    from lamina.cli import main

    if not (data_dir / "her2st" / "images").exists():
        pytest.skip(f"{data_dir / 'her2st'} not present (see ../shared/data/README.md)")
    root = Path(__file__).resolve().parent.parent
    cfg = yaml.safe_load((root / "examples" / "her2st_enhance.yaml").read_text())
    cfg["input"]["path"] = str(data_dir / "her2st" / "her2st_all_sections.h5ad")
    cfg["input"]["sections"]["only"] = ["C2", "C3"]
    cfg["input"]["images"] = {
        s: {**v, "path": str((root / "examples" / v["path"]).resolve())}
        for s, v in cfg["input"]["images"].items()
        if s in ("C2", "C3")
    }
    cfg["store"] = str(tmp_path / "c.lamina.zarr")
    cfg["report"] = {"out": str(tmp_path / "report")}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["build", str(path)]) == 0
    atlas = lamina.Atlas.open(tmp_path / "c.lamina.zarr")
    g = atlas.root["enhance"]
    assert g.attrs["sections"] == ["C2", "C3"] and [str(x) for x in g["C2/gene"][...]] == [
        "ERBB2",
        "GRB7",
        "CD74",
        "KRT19",
    ]
    assert (tmp_path / "report" / "enhance.png").exists()
    # projected: each spot's footprint mean of the ERBB2 map is its measurement
    from lamina.kernels.enhance import footprint_means

    grid = g["C2"]
    A = np.asarray(grid.attrs["grid_to_section"])
    secs = atlas.sections
    a, b = int(secs.cell_start.iloc[0]), int(secs.cell_stop.iloc[0])
    xy = np.c_[atlas.root["cells/x"][a:b], atlas.root["cells/y"][a:b]].astype(float)
    c = (np.c_[xy, np.ones(len(xy))] @ np.linalg.inv(A).T)[:, :2]
    means, _ = footprint_means(
        np.asarray(grid["genes"][...], np.float64)[:1],
        c,
        float(grid.attrs["spot_radius_um"]) / float(grid.attrs["superpixel_um"]),
    )
    measured = np.asarray(atlas.root["X"][a:b])[:, list(atlas.genes).index("ERBB2")]
    np.testing.assert_allclose(means[:, 0], measured, atol=1e-3)


def test_residual_loo_error_matches_the_dense_leave_one_out(monkeypatch):
    rng = np.random.default_rng(5)
    spots, res = rng.uniform(0, 600, (70, 2)), rng.normal(size=(70, 2))
    monkeypatch.setattr(K, "BLOCK_POINTS", 16)  # several blocks
    got = K.residual_loo_error(spots, res, [0.0, 50.0, 120.0], 0.1)
    d = np.sqrt(((spots[:, None] - spots[None]) ** 2).sum(-1))
    want = [float((res**2).sum())]
    for s in (50.0, 120.0):
        k = np.where(d <= 4 * s, np.exp(-(d**2) / (2 * s * s)), 0.0)
        np.fill_diagonal(k, 0.0)
        want.append(float(((res - k @ res / (k.sum(1) + 0.1)[:, None]) ** 2).sum()))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_a_local_foundation_model_adds_its_tokens_to_the_features(tmp_path, monkeypatch):
    """An encoder given by path (here a small random ViT in timm's layout) adds encoder_dims features per
    superpixel; the maps stay the same under another tiling; other weights re-run the features."""
    import importlib

    from test_encoders import _tiny

    stage = importlib.import_module("lamina.stages.histology")
    weights, _ = _tiny(tmp_path)
    ph, atlas = _store(tmp_path)
    with pytest.raises(lamina.InputError, match="do not exist"):
        lamina.enhance(atlas, encoder=str(tmp_path / "none.safetensors"))
    assert "histology" not in atlas.root  # refused before anything is written
    lamina.enhance(atlas, fit_column="visible", encoder=str(weights), encoder_heads=2, encoder_dims=5)
    hist = atlas.root["histology"]
    names = list(hist.attrs["feature_names"])
    assert hist["S0/features"].shape[0] == len(names) == 3 * (K.N_FEATURES + 5)
    assert names[K.N_FEATURES : K.N_FEATURES + 5] == [f"encoder_pc{i}" for i in range(5)]
    record = atlas.stage_records()["histology"]
    assert 0 < record["encoder_variance_kept"] <= 1
    feats = np.asarray(hist["S0/features"][...])
    tokens = feats[K.N_FEATURES : K.N_FEATURES + 5]
    assert np.isfinite(feats).all() and tokens.std(axis=(1, 2)).min() > 1e-3  # the tokens vary over the image
    emb = np.asarray(atlas.root["enhance/S0/embedding"][...])
    monkeypatch.setattr(stage, "TILE", 24)
    lamina.enhance(atlas, fit_column="visible", encoder=str(weights), encoder_heads=2, encoder_dims=5, force=True)
    assert atlas.root["histology/S0/features"].chunks[1] == 24
    np.testing.assert_allclose(np.asarray(atlas.root["histology/S0/features"][...]), feats, atol=1e-4)
    np.testing.assert_allclose(np.asarray(atlas.root["enhance/S0/embedding"][...]), emb, atol=1e-4)
    # new weights at the same path: the features are computed again
    first = atlas.stage_records()["histology"]["finished"]
    (tmp_path / "r").mkdir()
    other, _ = _tiny(tmp_path / "r", seed=1)
    weights.write_bytes(other.read_bytes())
    os.utime(weights, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    lamina.enhance(atlas, fit_column="visible", encoder=str(weights), encoder_heads=2, encoder_dims=5)
    assert atlas.stage_records()["histology"]["finished"] != first
