import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

import lamina
from lamina.cli import main


def run(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "lamina.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def test_demo_end_to_end(tmp_path):
    proc = run(
        "demo",
        "--out",
        tmp_path / "d",
        "--cells",
        8000,
        "--sections",
        4,
        "--genes",
        10,
        "--workers",
        2,
        "--flow-steps",
        4,
        "--dz",
        20,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cells 8,000" in proc.stdout and "section_stats" in proc.stdout
    atlas = lamina.Atlas.open(tmp_path / "d" / "demo.lamina.zarr")
    assert atlas.completed_stages() == [
        "ingest",
        "section_stats",
        "rasterize",
        "register",
        "refine",
        "warp",
        "pca",
        "train_flow",
        "interpolate",
        "voxelize",
        "invert",
    ]
    assert atlas.root["expression/values"].shape[0] == 10 and float(atlas.root["volume"].attrs["voxel_um"]) == 20.0
    assert "reconstruction:" in proc.stdout
    assert (tmp_path / "d" / "volume_slices.png").stat().st_size > 10_000
    line = [x for x in proc.stdout.splitlines() if x.startswith("registration error against ground truth")][0]
    median = float(line.split("median ")[1].split(" um")[0])
    assert 1.0 < median < 50.0  # 4 sections of 2,000 cells: the gauge bound alone is ~11 um here
    assert (tmp_path / "d" / "sections.png").stat().st_size > 10_000
    assert (tmp_path / "d" / "registration_pairs.png").stat().st_size > 10_000
    assert (tmp_path / "d" / "stack_views.png").stat().st_size > 10_000
    assert (tmp_path / "d" / "deformation.png").stat().st_size > 10_000
    html = (tmp_path / "d" / "stack3d.html").read_text()
    assert "plotly" in html and "scatter3d" in html
    assert (tmp_path / "d" / "demo.truth.zarr" / "zarr.json").exists()
    # not a terminal: no bars, but one line per stage start and end (with what it wrote) and training progress
    for stage in atlas.completed_stages():
        assert f"lamina {stage}: started" in proc.stderr and f"lamina {stage}: done in " in proc.stderr, stage
    assert "lamina train_flow: step 4 of 4, fit excess " in proc.stderr  # the fit beyond its noise floor
    assert (tmp_path / "d" / "flow_training.png").stat().st_size > 10_000
    assert "lamina register: done in" in proc.stderr and "MiB" in proc.stderr


def test_demo_without_reconstruction_stops_after_the_registration(tmp_path):
    proc = run(
        "demo",
        "--out",
        tmp_path / "d",
        "--cells",
        3000,
        "--sections",
        3,
        "--genes",
        5,
        "--workers",
        1,
        "--no-reconstruct",
    )
    assert proc.returncode == 0, proc.stderr
    atlas = lamina.Atlas.open(tmp_path / "d" / "demo.lamina.zarr")
    assert atlas.completed_stages() == ["ingest", "section_stats", "rasterize", "register", "refine", "warp"]
    assert "registration error against ground truth" in proc.stdout and "reconstruction:" not in proc.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory, phantom_table):
    table, _ = phantom_table
    folder = tmp_path_factory.mktemp("build")
    table.to_csv(folder / "cells.csv.gz", index=False)
    cfg = {
        "store": "out/atlas.lamina.zarr",
        "input": {
            "path": "cells.csv.gz",
            "columns": {"cell_type": "cell_type", "cell_id": "cell_id"},
            "genes": "rest",
            "sections": {"spacing": 35},
        },
        "cluster": {"n_workers": 1},
    }
    (folder / "build.yaml").write_text(yaml.safe_dump(cfg))
    proc = run("build", folder / "build.yaml")
    assert proc.returncode == 0, proc.stderr
    return folder


def test_build_from_config(built, phantom_table):
    table, _ = phantom_table
    atlas = lamina.Atlas.open(built / "out" / "atlas.lamina.zarr")
    assert atlas.n_cells == len(table) and atlas.n_genes == 24
    assert list(atlas.sections.z) == [0, 35, 70, 105, 140]
    assert atlas.group_is_complete("aligned") and atlas.group_is_complete("transforms")
    assert (built / "out" / "atlas.lamina-report" / "sections.png").exists()
    again = run("build", built / "build.yaml")  # unchanged: both stages skipped
    assert again.returncode == 0
    assert lamina.Atlas.open(built / "out" / "atlas.lamina.zarr").stage_records() == atlas.stage_records()


def test_info(built, capsys):
    assert main(["info", str(built / "out" / "atlas.lamina.zarr")]) == 0
    out = capsys.readouterr().out
    assert "cells 6,000" in out and "section_stats" in out and "register" in out and "complete" in out


@pytest.mark.parametrize("fmt", ["csv", "parquet", "anndata"])
def test_export_round_trip(built, phantom_table, tmp_path, fmt):
    table, _ = phantom_table
    store = built / "out" / "atlas.lamina.zarr"
    out = tmp_path / {"csv": "e.csv.gz", "parquet": "e.parquet", "anndata": "e.h5ad"}[fmt]
    assert main(["export", str(store), "--format", fmt, "--out", str(out), "--sections", "S001,S002"]) == 0
    m = table.section.isin(["S001", "S002"]).to_numpy()
    if fmt == "anndata":
        a = ad.read_h5ad(out)
        assert a.shape == (int(m.sum()), 24)
        np.testing.assert_allclose(a.X[:, 3], table.loc[m, "g0003"], rtol=1e-6)
        return
    df = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out)
    assert len(df) == m.sum() and set(df.section.astype(str)) == {"S001", "S002"}
    np.testing.assert_allclose(df.g0005.to_numpy(), table.loc[m, "g0005"].to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(df.z.unique(), [35.0, 70.0])
    assert list(df.columns[:5]) == ["cell", "section", "x", "y", "z"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["input"].update(colums={}), "unknown key 'input.colums' (did you mean 'input.columns'?)"),
        (lambda c: c["input"]["columns"].update(x=3), "'input.columns.x' must be a string, got 3 (int)"),
        (lambda c: c["input"].update(path="nope.csv"), "nope.csv does not exist"),
        (lambda c: c.pop("store"), "required key 'store' is missing"),
        (lambda c: c["input"].update(units="inch"), "'input.units' must be one of um, mm, nm, px, got 'inch'"),
        (
            lambda c: c.setdefault("stages", {}).setdefault("rasterize", {}).update(channels="genes"),
            "'stages.rasterize.channels' must be one of auto, types, pcs, types+pcs, density, got 'genes'",
        ),
        (
            lambda c: c.setdefault("stages", {}).setdefault("register", {}).update(batch=0),
            "'stages.register.batch' (pairs fitted as one batch per task (16-32 on GPU workers)) must be >= 1, got 0",
        ),
        (
            lambda c: c.setdefault("stages", {}).setdefault("refine", {}).update(alpha_px="wide"),
            "'stages.refine.alpha_px' must be a number, got 'wide' (str)",
        ),
        (
            lambda c: c.setdefault("stages", {}).update(regster={}),
            "unknown key 'stages.regster' (did you mean 'stages.register'?)",
        ),
        (
            lambda c: c.setdefault("stages", {}).setdefault("register", {}).update(bach=2),
            "unknown option 'stages.register.bach' (did you mean 'stages.register.batch'?)",
        ),
        (
            lambda c: c.setdefault("stages", {}).update(reconstruct={"enabled": True}),
            "'stages.reconstruct' is no longer a key: list 'reconstruct' under run:",
        ),
        (
            lambda c: c.update(run=["align", "recontruct"]),
            "'run' names 'recontruct', which is no pipeline or stage (did you mean 'reconstruct'?)",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path, built, mutate, message, capsys):
    cfg = yaml.safe_load((built / "build.yaml").read_text())
    cfg["input"]["path"] = str(built / "cells.csv.gz")
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["build", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_info_on_a_missing_store_exits_nonzero(tmp_path, capsys):
    assert main(["info", str(tmp_path / "none.lamina.zarr")]) == 2
    assert "no atlas store" in capsys.readouterr().err


def test_phantom_command_writes_parquet_and_truth(tmp_path):
    assert (
        main(
            [
                "phantom",
                str(tmp_path / "p"),
                "--cells",
                "2000",
                "--sections",
                "3",
                "--genes",
                "5",
                "--truth",
                str(tmp_path / "p.truth.zarr"),
            ]
        )
        == 0
    )
    files = sorted((tmp_path / "p").glob("*.parquet"))
    assert [f.name for f in files] == ["S000.parquet", "S001.parquet", "S002.parquet"]
    assert sum(len(pd.read_parquet(f)) for f in files) == 2000
