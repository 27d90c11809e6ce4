"""Platform readers (Xenium, MERSCOPE, CosMx, Visium / HD) on folders written in each documented layout, and
section images in /images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import lamina
from lamina.cli import main
from lamina.datasets.layouts import write_layout

GENES = ["Actb", "Gfap", "Snap25"]


def _cells(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "x": rng.uniform(20, 700, n),
            "y": rng.uniform(20, 500, n),
            "cell_id": [f"cell{seed}-{i}" for i in range(n)],
        }
    )
    for g in GENES:
        frame[g] = rng.poisson(4, n).astype(float)
    return frame


def _folders(tmp_path, layout: str, shuffle: bool, n: int = 200, **kw) -> tuple[dict, pd.DataFrame]:
    from lamina.datasets.layouts import visium_lattice

    folders, frames = {}, []
    for s in range(2):
        frame = _cells(n, s).assign(section=f"s{s}")
        if layout in ("visium", "visium_sr1"):  # spots of a Visium slide lie on its lattice
            frame[["x", "y"]] = visium_lattice(n, 3000, 2500, seed=s)
        folders[f"s{s}"] = write_layout(
            layout, tmp_path / layout / f"s{s}", frame, GENES, shuffle=shuffle, seed=s, **kw
        )
        frames.append(frame)
    return folders, pd.concat(frames, ignore_index=True)


def _match(atlas, truth: pd.DataFrame) -> pd.DataFrame:
    """The atlas's cells beside the table's, matched by position (every position is distinct)."""
    cells = atlas.cells().reset_index()
    X = np.asarray(atlas.root["X"][:])
    cells[[f"X_{g}" for g in atlas.genes]] = X
    from scipy.spatial import cKDTree

    def points(f):
        return np.stack([f["x"], f["y"] + 1e6 * f["section"].astype(str).str[1:].astype(int)], 1)

    dist, nearest = cKDTree(points(cells)).query(points(truth))
    assert len(set(nearest)) == len(truth) and dist.max() < 1e-3
    matched = cells.iloc[nearest].reset_index(drop=True)
    return pd.concat([truth.add_suffix("_in").reset_index(drop=True), matched], axis=1)


@pytest.mark.parametrize("shuffle", [False, True], ids=["same-order", "other-order"])
@pytest.mark.parametrize("layout", ["xenium", "merscope", "cosmx", "visium", "visium_hd", "visium_sr1"])
def test_platform_folder_gives_the_cells_written(tmp_path, layout, shuffle):
    folders, truth = _folders(tmp_path, layout, shuffle)
    platform = "visium" if layout == "visium_sr1" else layout
    atlas = lamina.ingest(list(folders.values()), tmp_path / "a.lamina.zarr", platform=platform)
    assert atlas.n_cells == len(truth) == 400
    assert list(atlas.genes) == GENES  # control probes, blanks and codewords are no genes
    both = _match(atlas, truth)
    assert len(both) == len(truth)
    # Visium slides are scanned at different resolutions (0.5 and 0.6 um/px): um come back from the scale factors
    assert np.abs(both["x"] - both["x_in"]).max() < 1e-3 and np.abs(both["y"] - both["y_in"]).max() < 1e-3
    for g in GENES:
        assert np.array_equal(both[f"X_{g}"].to_numpy(), np.round(both[f"{g}_in"].to_numpy()))
    assert not atlas.cells()[["section", "cell_id"]].duplicated().any()
    if layout == "xenium":
        assert (both["cell_id"] == both["cell_id_in"]).all()
        assert {"transcript_counts", "cell_area", "nucleus_area"} <= set(atlas.cell_columns)
    if layout == "cosmx":  # fov_cellID; cell 0 (transcripts outside cells) is no cell
        assert atlas.cells()["cell_id"].str.fullmatch(r"\d+_[1-9]\d*").all()
    if layout != "cosmx":
        assert atlas.images() == ["s0", "s1"]
        image = atlas.image("s1")
        s1 = both[both["section"] == "s1"]
        px = np.linalg.inv(image["image_to_section"]) @ np.stack([s1.x, s1.y, np.ones(len(s1))])
        level = image["levels"][0].compute().astype(float).mean(0)
        col, row = np.clip(px[0].astype(int), 0, level.shape[1] - 1), np.clip(px[1].astype(int), 0, level.shape[0] - 1)
        at_cells = level[row, col]
        if layout.startswith("visium"):  # H&E-like: cells are dark
            assert at_cells.mean() < level.mean() - 20
        else:  # DAPI: cells are bright
            assert at_cells.mean() > level.mean() + 20


def test_platform_options_can_be_overridden_and_images_left_out(tmp_path):
    folders, truth = _folders(tmp_path, "cosmx", False, n=60)
    atlas = lamina.ingest(folders, tmp_path / "a.zarr", platform="cosmx", pixel_size=0.18, obs=["Area"], images=False)
    cells = atlas.cells()
    # the layout wrote pixels of 0.12028 um: read as 0.18 um they are 0.18 / 0.12028 times as far
    assert np.isclose(cells["x"].max() / truth["x"].max(), 0.18 / 0.12028, rtol=1e-4)
    assert "Area" in atlas.cell_columns and "fov" not in atlas.cell_columns
    assert atlas.images() == []


def test_platform_errors_name_the_file_and_the_fix(tmp_path):
    folders, _ = _folders(tmp_path, "xenium", False, n=40)
    (folders["s1"] / "cell_feature_matrix.h5").rename(folders["s1"] / "elsewhere.h5")
    with pytest.raises(lamina.InputError, match=r"s1: no cell_feature_matrix\.h5"):
        lamina.ingest(folders, tmp_path / "a.zarr", platform="xenium")
    (folders["s1"] / "elsewhere.h5").write_bytes(b"not hdf5 at all")
    (folders["s1"] / "elsewhere.h5").rename(folders["s1"] / "cell_feature_matrix.h5")
    with pytest.raises(lamina.InputError, match="not a readable HDF5 file"):
        lamina.ingest(folders, tmp_path / "a.zarr", platform="xenium")
    with pytest.raises(lamina.ConfigError, match="platform 'xenum' is not one of"):
        lamina.ingest(folders, tmp_path / "a.zarr", platform="xenum")
    # a matrix cell without a position: the two files are from different runs
    folders, _ = _folders(tmp_path / "b", "visium", True, n=40)
    pos = folders["s0"] / "spatial" / "tissue_positions.csv"
    table = pd.read_csv(pos)
    table[table.barcode != "AAAC0000000007-1"].to_csv(pos, index=False)
    with pytest.raises(
        lamina.InputError, match=r"1 cell\(s\) of the matrix have no position, e\.g\. key 'AAAC0000000007-1'"
    ):
        lamina.ingest(folders, tmp_path / "b.zarr", platform="visium")
    assert not (tmp_path / "b.zarr").exists()
    with pytest.raises(lamina.InputError, match="is not a folder"):
        lamina.ingest(tmp_path / "nope", tmp_path / "c.zarr", platform="merscope")


def test_build_config_names_the_platform(tmp_path, capsys):
    folders, _ = _folders(tmp_path, "merscope", False, n=80)
    cfg = tmp_path / "merscope.yaml"
    cfg.write_text(
        "store: m.lamina.zarr\n"
        f"input: {{path: [{folders['s0']}, {folders['s1']}], platform: merscope, sections: {{spacing: 15}}}}\n"
        "run: []\nreport: {enabled: false}\n"
    )
    assert main(["build", str(cfg)]) == 0
    atlas = lamina.Atlas.open(tmp_path / "m.lamina.zarr")
    assert atlas.n_cells == 160 and atlas.images() == ["s0", "s1"]
    assert np.allclose(atlas.sections.z, [0, 15])
    cfg.write_text(cfg.read_text().replace("platform: merscope", "platform: mersco"))
    assert main(["build", str(cfg)]) == 2
    assert "input.platform 'mersco' is not one of" in capsys.readouterr().err


def test_add_image_stores_a_pyramid_in_the_section_frame(tmp_path):
    import tifffile

    ph = lamina.datasets.phantom(n_cells=2_000, n_sections=2, n_genes=5, seed=1)
    atlas = lamina.ingest(ph, tmp_path / "p.zarr")
    rgb = (np.random.default_rng(0).random((700, 600, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "he.tif", rgb, tile=(256, 256), photometric="rgb")
    affine = [[0.5, 0, 100.0], [0, 0.5, -20.0], [0, 0, 1]]
    sid = atlas.sections.id.iloc[1]
    atlas = lamina.add_image(atlas, sid, tmp_path / "he.tif", image_to_section=affine)
    image = atlas.image(sid)
    assert [lv.shape for lv in image["levels"]] == [(3, 700, 600), (3, 350, 300)]
    assert np.array_equal(image["levels"][0].compute(), np.moveaxis(rgb, -1, 0))
    assert image["pixel_size_um"] == pytest.approx(0.5)
    assert np.allclose(image["image_to_section"] @ [10, 20, 1], [105, -10, 1])
    with pytest.raises(lamina.InputError, match="pixel size is not in the file"):
        lamina.add_image(atlas, sid, tmp_path / "he.tif")
    assert atlas.image(sid)["pixel_size_um"] == pytest.approx(0.5)  # the failed call left it intact


@pytest.mark.parametrize("form", ["h5ad", "anndata"])
def test_a_subset_of_genes_is_read_by_name(tmp_path, form):
    anndata = pytest.importorskip("anndata")
    n = 40
    obs = pd.DataFrame(
        {"x": np.arange(n, dtype=float), "y": np.arange(n, dtype=float), "section": ["a"] * 20 + ["b"] * 20},
        index=[f"c{i}" for i in range(n)],
    )
    adata = anndata.AnnData(np.tile(np.float32([0, 1, 2]), (n, 1)), obs=obs, var=pd.DataFrame(index=["u", "v", "w"]))
    source = adata
    if form == "h5ad":
        adata.write_h5ad(tmp_path / "t.h5ad")
        source = tmp_path / "t.h5ad"
    atlas = lamina.ingest(source, tmp_path / "t.zarr", genes=["w", "u"], min_cells_per_section=1)
    assert list(atlas.genes) == ["w", "u"]
    assert np.array_equal(np.asarray(atlas.root["X"][:]), np.tile(np.float32([2, 0]), (n, 1)))


def test_the_shipped_platform_example_builds(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "xenium.yaml"
    for k in (1, 2, 3):
        write_layout("xenium", tmp_path / "xenium" / f"section-0{k}", _cells(150, k), GENES, seed=k)
    cfg = tmp_path / "xenium.yaml"
    cfg.write_text(example.read_text().replace("run: [align]", "run: []\nreport: {enabled: false}"))
    assert main(["build", str(cfg)]) == 0
    atlas = lamina.Atlas.open(tmp_path / "xenium.lamina.zarr")
    assert atlas.sections.id.tolist() == ["section-01", "section-02", "section-03"]
    assert np.allclose(atlas.sections.z, [0, 10, 20]) and atlas.images() == atlas.sections.id.tolist()


def test_tiff_axes_become_c_y_x_read_by_tile(tmp_path):
    import tifffile

    from lamina.ingest.images import open_image

    rng = np.random.default_rng(0)
    stack = (rng.random((3, 200, 300)) * 1000).astype(np.uint16)  # Xenium's morphology.ome.tif is a z stack
    meta = {"axes": "ZYX", "PhysicalSizeX": 0.2125, "PhysicalSizeY": 0.2125}
    tifffile.imwrite(tmp_path / "z.ome.tif", stack, tile=(64, 64), metadata=meta)
    image, size = open_image(tmp_path / "z.ome.tif", chunk=128)
    assert image.shape == (1, 200, 300) and size == pytest.approx(0.2125) and image.numblocks == (1, 2, 3)
    assert np.array_equal(image[:, 100:180, 50:250].compute()[0], stack[:, 100:180, 50:250].max(0))
    channels = stack[:2]
    tifffile.imwrite(tmp_path / "c.ome.tif", channels, tile=(64, 64), metadata={"axes": "CYX"})
    image, size = open_image(tmp_path / "c.ome.tif")
    assert size is None and np.array_equal(image.compute(), channels)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(lamina.InputError, match="not a readable TIFF"):
        open_image(tmp_path / "bad.tif")


def test_orders_that_part_midway_switch_to_lookup(tmp_path, caplog):
    import logging

    folders, truth = _folders(tmp_path, "xenium", False, n=300)
    for folder in folders.values():  # the last 100 positions in reverse: the files agree for 200 rows only
        cells = pd.read_parquet(folder / "cells.parquet")
        pd.concat([cells.iloc[:200], cells.iloc[200:][::-1]]).to_parquet(folder / "cells.parquet", index=False)
    with caplog.at_level(logging.INFO, logger="lamina"):
        atlas = lamina.ingest(folders, tmp_path / "a.zarr", platform="xenium", read_rows=64)
    assert "from matrix row 200 on the positions list the cells in another order" in caplog.text
    both = _match(atlas, truth)
    assert (both["cell_id"] == both["cell_id_in"]).all()
    assert np.array_equal(both["X_Actb"].to_numpy(), np.round(both["Actb_in"].to_numpy()))
