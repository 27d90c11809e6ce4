"""Versioned elements: every group says what it is and which encoding wrote it; old stores open or say how
to upgrade; the image and embedding elements the coming stages write."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lamina
from lamina.store import elements
from lamina.store.elements import TYPE, VERSION, EmbeddingV1, ImageV1
from lamina.store.format import FORMAT_VERSION


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, phantom_store):
    path = tmp_path_factory.mktemp("el") / "a.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")
    lamina.align(atlas, fine=False)
    return atlas


def test_every_group_records_its_element_and_encoding(aligned):
    root = aligned.root
    assert root.attrs[TYPE] == "lamina.atlas" and root.attrs["format_version"] == FORMAT_VERSION
    expected = {
        "cells": "lamina.cells",
        "sections": "lamina.sections",
        "genes": "lamina.genes",
        "X": "lamina.matrix",
        "qc": "lamina.section-stats",
        "raster": "lamina.raster",
        "transforms": "lamina.transforms",
        "aligned": "lamina.aligned",
    }
    for name, kind in expected.items():
        version = elements.CURRENT[kind].version
        assert version == ("2" if name == "raster" else "1"), name  # raster 2: the check-half image
        assert root[name].attrs[TYPE] == kind and root[name].attrs[VERSION] == version, name
        assert elements.element_of(root[name], name) is elements.CURRENT[kind]
        elements.CURRENT[kind].validate(root[name], name)


def _as_format_1(src, dst):
    """A copy of ``src`` as lamina 0.1 wrote it: no encoding attrs, format_version 1, no algorithm versions."""
    import json

    shutil.copytree(src, dst)
    for meta in dst.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        attrs = doc.get("attributes", {})
        for key in (TYPE, VERSION):
            attrs.pop(key, None)
        if meta.parent == dst:
            attrs["format_version"] = 1
            attrs["stages"] = {
                k: {kk: vv for kk, vv in v.items() if kk not in ("algorithm_version", "inputs")}
                for k, v in attrs["stages"].items()
            }
        meta.write_text(json.dumps(doc))


def test_a_format_1_store_opens_for_reading_and_upgrades_with_one_command(aligned, tmp_path, capsys):
    old = tmp_path / "old.lamina.zarr"
    _as_format_1(Path(aligned.path), old)
    atlas = lamina.Atlas.open(old)
    assert atlas.n_cells == aligned.n_cells and len(atlas.obs(columns=["x"])) == aligned.n_cells
    assert "lamina.matrix" not in str(atlas.root["X"].attrs.asdict())
    with pytest.raises(lamina.FormatVersionError, match=f"Run `lamina upgrade {old}` once"):
        lamina.section_stats(atlas)
    proc = subprocess.run(
        [sys.executable, "-m", "lamina.cli", "info", str(old)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "format 1" in proc.stdout
    from lamina.cli import main

    assert main(["upgrade", str(old)]) == 0
    assert "root: format 1 -> 2" in capsys.readouterr().out
    upgraded = lamina.Atlas.open(old, mode="r+")
    assert upgraded.root["X"].attrs[TYPE] == "lamina.matrix" and upgraded.attrs["format_version"] == FORMAT_VERSION
    assert upgraded.stage_records()["register"]["algorithm_version"] == 1
    assert lamina.section_stats(upgraded, force=True).ran  # writing works again
    assert main(["upgrade", str(old)]) == 0 and "already in the current format" in capsys.readouterr().out


def test_an_element_of_an_unknown_encoding_is_refused_by_name(aligned, tmp_path):
    path = tmp_path / "new.lamina.zarr"
    shutil.copytree(aligned.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")
    atlas.root["transforms"].attrs[VERSION] = "7"
    with pytest.raises(
        lamina.FormatVersionError,
        match="transforms is a lamina.transforms element of encoding version 7, which this lamina does not read",
    ):
        elements.element_of(atlas.root["transforms"], f"{path}/transforms")


def test_image_pyramid_element_round_trips(tmp_path, aligned):
    path = tmp_path / "img.lamina.zarr"
    shutil.copytree(aligned.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (3, 700, 530), dtype=np.uint8)
    affine = np.array([[0.5, 0, -100.0], [0, 0.5, 40.0], [0, 0, 1]])
    parent = atlas.root.require_group("images")
    elements.ImagesV1.stamp(parent)
    ImageV1.write(
        parent, "S001", img, pixel_size_um=0.5, image_to_section=affine, source="he.tif", chunk=256, min_size=100
    )
    assert atlas.images() == ["S001"]
    im = atlas.image("S001")
    levels = im["levels"]
    assert [lv.shape for lv in levels] == [(3, 700, 530), (3, 350, 265), (3, 175, 132)]
    np.testing.assert_array_equal(levels[0].compute(), img)
    np.testing.assert_array_equal(
        levels[1].compute(),
        img[:, :700, :530].reshape(3, 350, 2, 265, 2).astype(np.float32).mean((2, 4)).astype(np.uint8),
    )
    assert atlas.root["images/S001/0"].chunks == (3, 256, 256)
    ms = atlas.root["images/S001"].attrs["multiscales"][0]
    assert [d["coordinateTransformations"][0]["scale"][1] for d in ms["datasets"]] == [0.5, 1.0, 2.0]
    assert ms["axes"][1] == {"name": "y", "type": "space", "unit": "micrometer"}
    # level 1 pixel (10, 20) is level 0 pixel (20, 40): section um via the stored affine
    np.testing.assert_allclose(
        ImageV1.pixel_to_section(atlas.root["images/S001"], 1) @ [10, 20, 1], affine @ [20, 40, 1]
    )
    with pytest.raises(lamina.UnknownSectionError, match="has no image"):
        atlas.image("S002")
    with pytest.raises(lamina.StoreError, match="pixel size must be a positive number"):
        ImageV1.write(parent, "S002", img, pixel_size_um=0.0, image_to_section=affine)


def test_embedding_element_round_trips(tmp_path, aligned):
    path = tmp_path / "emb.lamina.zarr"
    shutil.copytree(aligned.path, path)
    atlas = lamina.Atlas.open(path, mode="r+")
    parent = atlas.root.require_group("embeddings")
    elements.EmbeddingsV1.stamp(parent)
    values = EmbeddingV1.create(
        parent, "niche", atlas.n_cells, 8, atlas.cell_chunk, stage="test", inputs=["pca"], params={"radius_um": 30.0}
    )
    data = np.arange(atlas.n_cells * 8, dtype=np.float32).reshape(-1, 8)
    values[...] = data
    assert values.chunks == (atlas.cell_chunk, 8)
    lazy, meta = atlas.embedding("niche")
    np.testing.assert_array_equal(lazy.compute(), data)
    assert meta == {"stage": "test", "inputs": ["pca"], "params": {"radius_um": 30.0}}
    EmbeddingV1.validate(parent["niche"], "niche")
    with pytest.raises(lamina.StoreError, match="has no embedding 'x'"):
        atlas.embedding("x")
