"""map_tiles and map_neighbourhoods equal the untiled / all-cells computation bit for bit."""

import shutil

import numpy as np
import pytest
import zarr

import lamina
from lamina.kernels.neighbours import neighbour_mean, required_radius, ring_means
from lamina.kernels.raster import smooth, smooth_halo
from lamina.maps import Neighbourhood, map_neighbourhoods, map_tiles, neighbours
from lamina.stages.warp import mark_aligned
from lamina.store import arrays


@pytest.fixture
def image_store(tmp_path):
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    img = np.random.default_rng(0).random((3, 2, 101, 77)).astype(np.float32)
    arrays.create(root, "src", img.shape, np.float32, (1, 2, 40, 30), ("section", "channel", "y", "x"))[...] = img
    return str(tmp_path / "img.zarr"), root, img


@pytest.mark.parametrize("tile", [(32, 25), (17, 77), (101, 13)])
def test_tiled_blur_equals_the_untiled_one_including_the_borders(image_store, tile):
    store, root, img = image_store
    sigma = 2.0
    dst = arrays.create(root, "dst", img.shape, np.float32, (1, 2, *tile), ("section", "channel", "y", "x"))
    n = map_tiles(smooth, store, "src", "dst", halo=smooth_halo(sigma), kwargs={"sigma_px": sigma})
    assert n == 3 * -(-101 // tile[0]) * -(-77 // tile[1])
    whole = smooth(img, sigma)
    np.testing.assert_array_equal(dst[...], whole)  # bit for bit, the image borders included
    assert smooth_halo(sigma) == 8  # scipy's radius int(4 sigma + 0.5): the kernel states its halo
    # a halo smaller than the kernel's is visibly wrong inside (this is what the halo is for)
    short = arrays.create(root, "short", img.shape, np.float32, (1, 2, *tile), ("section", "channel", "y", "x"))
    map_tiles(smooth, store, "src", "short", halo=2, kwargs={"sigma_px": sigma})
    assert np.abs(short[...] - whole).max() > 1e-4


def _pool2(block, sigma_px):
    """Blur, then 2 x 2 means (a halo-dependent kernel that changes the grid)."""
    b = smooth(block, sigma_px)
    h, w = b.shape[-2:]
    b = np.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, h % 2), (0, w % 2)], mode="edge")
    return b.reshape(*b.shape[:-2], b.shape[-2] // 2, 2, b.shape[-1] // 2, 2).mean(axis=(-3, -1))


_pool2.required_halo = lambda sigma_px: smooth_halo(sigma_px)  # the kernel states its halo


def test_tiles_at_a_coarser_grid_and_the_kernels_own_halo(image_store):
    store, root, img = image_store
    dst = arrays.create(root, "pooled", (3, 2, 51, 39), np.float32, (1, 2, 16, 16), ("section", "channel", "y", "x"))
    map_tiles(_pool2, store, "src", "pooled", factor=2, kwargs={"sigma_px": 1.5})
    np.testing.assert_array_equal(dst[...], _pool2(img, 1.5)[..., :51, :39])
    with pytest.raises(lamina.InputError, match="pass halo="):
        map_tiles(smooth, store, "src", "pooled", factor=2, kwargs={"sigma_px": 1.5})


def _mix(block, mixing, channels=None):
    """Output channels = a linear mix of the input's, ``channels`` (g0, g1) of them only."""
    m = mixing if channels is None else mixing[channels[0] : channels[1]]
    return np.einsum("gc,cyx->gyx", m, block)


def test_split_channels_writes_a_few_output_channels_per_task(tmp_path):
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    img = np.random.default_rng(1).random((2, 45, 38)).astype(np.float32)
    arrays.create(root, "src", img.shape, np.float32, (2, 20, 20), ("channel", "y", "x"))[...] = img
    mixing = np.random.default_rng(2).random((7, 2)).astype(np.float32)
    whole = arrays.create(root, "whole", (7, 45, 38), np.float32, (7, 20, 20), ("gene", "y", "x"))
    split = arrays.create(root, "split", (7, 45, 38), np.float32, (3, 20, 20), ("gene", "y", "x"))
    store = str(tmp_path / "c.zarr")
    assert map_tiles(_mix, store, "src", "whole", halo=0, batch_dims=0, kwargs={"mixing": mixing}) == 3 * 2
    with pytest.raises(lamina.InputError, match="one chunk"):
        map_tiles(_mix, store, "src", "split", halo=0, batch_dims=0, kwargs={"mixing": mixing})
    n = map_tiles(_mix, store, "src", "split", halo=0, batch_dims=0, split_channels=True, kwargs={"mixing": mixing})
    assert n == 3 * 3 * 2  # gene chunks x tile rows x tile columns
    np.testing.assert_array_equal(split[...], whole[...])
    np.testing.assert_allclose(whole[...], _mix(img, mixing), rtol=1e-6)


@pytest.fixture(scope="module")
def cells(tmp_path_factory, phantom_store):
    path = tmp_path_factory.mktemp("nb") / "n.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")
    lamina.pca(atlas, n_pcs=4)
    mark_aligned(atlas)
    root = atlas.root
    xyz = np.stack([root[f"aligned/{c}"][...] for c in "xyz"], 1).astype(np.float64)
    return atlas, xyz, np.asarray(root["cells/section"][...]), np.asarray(root["pca/pcs"][...])


def _brute(xyz, sec, core_of, radius=None, k=None, band=0):
    """Neighbours over all cells, restricted to sections within ``band``, without any tiling."""
    out_ptr, out_idx, out_d = [0], [], []
    for i in core_of:
        ok = np.flatnonzero(np.abs(sec.astype(int) - int(sec[i])) <= band)
        d = np.sqrt(((xyz[ok] - xyz[i]) ** 2).sum(1))
        pick = ok[d <= radius] if radius is not None else ok[np.argsort(d, kind="stable")[:k]]
        pick = np.sort(pick)
        out_idx.append(pick)
        out_d.append(np.sqrt(((xyz[pick] - xyz[i]) ** 2).sum(1)))
        out_ptr.append(out_ptr[-1] + len(pick))
    return np.array(out_ptr), np.concatenate(out_idx), np.concatenate(out_d)


def test_ring_means_over_3d_neighbourhoods_equal_the_all_cells_computation(cells):
    atlas, xyz, sec, pcs = cells
    radii = [30.0, 60.0]
    calls = []

    def fn(nb: Neighbourhood, radii):
        calls.append((len(nb.rows), len(nb.core), set(np.unique(nb.section).tolist())))
        return ring_means(nb.columns["pca/pcs"], nb.indptr, nb.indices, nb.distances, radii)

    arrays.create(atlas.root, "rings", (atlas.n_cells, 8), np.float64, (atlas.cell_chunk, 8), ("cell", "f"))
    n = map_neighbourhoods(
        fn,
        atlas,
        "rings",
        radius=required_radius(radii),
        columns=["pca/pcs"],
        z_sections=1,
        tile_um=250.0,
        kwargs={"radii": radii},
    )
    assert n == atlas.n_cells
    sample = np.random.default_rng(1).choice(atlas.n_cells, 400, replace=False)
    ptr, idx, dist = _brute(xyz, sec, sample, radius=60.0, band=1)
    np.testing.assert_array_equal(
        atlas.root["rings"].oindex[np.sort(sample)], ring_means(pcs, ptr, idx, dist, radii)[np.argsort(sample)]
    )
    # memory follows the tile: no task read a whole section, and each read at most its section and neighbours
    per_section = atlas.sections.n_cells.max()
    assert len(calls) > atlas.n_sections and max(c[1] for c in calls) < per_section
    assert all(max(s) - min(s) <= 2 for _, _, s in calls)
    assert np.isfinite(atlas.root["rings"][...][:, :4]).all()  # ring 0 holds the cell itself


def test_k_nearest_within_sections_are_exact_whatever_the_tiles(cells, monkeypatch):
    import lamina.maps

    atlas, xyz, sec, pcs = cells
    monkeypatch.setattr(lamina.maps, "KNN_START", 0.0)  # a halo of one tile, which must grow to be exact
    for tile in (150.0, None):
        arrays.create(atlas.root, "knn", (atlas.n_cells, 4), np.float64, (atlas.cell_chunk, 4), ("cell", "f"))
        map_neighbourhoods(
            lambda nb: neighbour_mean(nb.columns["pca/pcs"], nb.indptr, nb.indices),
            atlas,
            "knn",
            k=15,
            columns=["pca/pcs"],
            coords="raw",
            tile_um=tile,
        )
        raw = np.stack([atlas.root[f"cells/{c}"][...] for c in "xy"] + [atlas.sections.z.to_numpy()[sec]], 1)
        sample = np.sort(np.random.default_rng(2).choice(atlas.n_cells, 300, replace=False))
        ptr, idx, _ = _brute(raw.astype(np.float64), sec, sample, k=15)
        np.testing.assert_array_equal(atlas.root["knn"].oindex[sample], neighbour_mean(pcs, ptr, idx))


def test_neighbour_lists_are_sorted_and_hold_the_cell_itself():
    xyz = np.array([[0, 0, 0], [1, 0, 0], [5, 0, 0], [0.5, 0.2, 0]], float)
    ptr, idx, d = neighbours(xyz, np.array([0, 2]), radius=1.2)
    assert ptr.tolist() == [0, 3, 4] and idx.tolist() == [0, 1, 3, 2]
    np.testing.assert_allclose(d, [0, 1, np.hypot(0.5, 0.2), 0])
    ptr, idx, _ = neighbours(xyz, np.array([2]), k=2)
    assert idx.tolist() == [1, 2]


def test_bad_neighbourhood_requests_are_named(cells, tmp_path, phantom_store):
    atlas = cells[0]
    with pytest.raises(lamina.InputError, match="either radius"):
        map_neighbourhoods(lambda nb: None, atlas, "rings", radius=10.0, k=3)
    with pytest.raises(lamina.InputError, match="need coords='aligned'"):
        map_neighbourhoods(lambda nb: None, atlas, "rings", radius=10.0, coords="raw", z_sections=1)
    with pytest.raises(lamina.InputError, match="must be \\[cell, ...\\]"):
        map_neighbourhoods(lambda nb: None, atlas, "pca/components", radius=10.0)
    path = tmp_path / "u.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    with pytest.raises(lamina.MissingInputError, match="not aligned yet"):
        map_neighbourhoods(lambda nb: None, lamina.Atlas.open(path), "x", radius=10.0)


def test_a_tile_in_small_blocks_gives_the_same_bits_and_holds_fewer_pairs(cells, monkeypatch):
    import lamina.maps

    atlas, xyz, sec, pcs = cells
    pairs = []

    def fn(nb: Neighbourhood):
        pairs.append(len(nb.indices))
        return neighbour_mean(nb.columns["pca/pcs"], nb.indptr, nb.indices)

    results = {}
    for budget in (lamina.maps.PAIRS_PER_BLOCK, 2_000):
        monkeypatch.setattr(lamina.maps, "PAIRS_PER_BLOCK", budget)
        pairs.clear()
        arrays.create(atlas.root, "blocked", (atlas.n_cells, 4), np.float64, (atlas.cell_chunk, 4), ("cell", "f"))
        map_neighbourhoods(fn, atlas, "blocked", radius=40.0, columns=["pca/pcs"], z_sections=1)
        results[budget] = (np.asarray(atlas.root["blocked"][...]), max(pairs), len(pairs))
    (big, big_max, big_calls), (small, small_max, small_calls) = results.values()
    np.testing.assert_array_equal(small, big)
    assert small_calls > 3 * big_calls and small_max < 4_000 < big_max  # a block overshoots by one cell's list
