"""Every kind of bad input gives an InputError that names what and where, and leaves an existing store intact."""

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tree_digest

import lamina


def _table(n=60, sections=("A", "B", "C"), seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "section": np.repeat(sections, n // len(sections)),
            "x": rng.uniform(0, 500, n),
            "y": rng.uniform(0, 500, n),
            "g1": rng.random(n),
            "g2": rng.random(n),
        }
    )


def case_missing_column(tmp):
    _table().rename(columns={"x": "X_um"}).to_csv(tmp / "t.csv", index=False)
    return tmp / "t.csv", {"genes": ["g1", "g2"]}, r"t\.csv: column 'x' \(the x column\) not found"


def case_nan_coordinates(tmp):
    t = _table()
    t.loc[7, "y"] = np.nan
    t.loc[9, "y"] = np.inf
    t.to_parquet(tmp / "t.parquet")
    return tmp / "t.parquet", {}, r"t\.parquet: column 'y' has NaN/inf at data rows \[7, 9\]"


def case_non_numeric_coordinates(tmp):
    t = _table().astype({"x": object})
    t.loc[4, "x"] = "12,5um"
    t.to_csv(tmp / "t.csv", index=False)
    return tmp / "t.csv", {}, r"t\.csv: column 'x' has a non-numeric value '12,5um' at data row 4"


def case_empty_file_in_folder(tmp):
    (tmp / "in").mkdir()
    for sid in "AB":
        _table(30, (sid,)).drop(columns="section").to_csv(tmp / "in" / f"{sid}.csv", index=False)
    _table(30, ("C",)).drop(columns="section").iloc[:0].to_csv(tmp / "in" / "C.csv", index=False)
    return tmp / "in", {}, r"C\.csv has no cells"


def case_listed_section_without_cells(tmp):
    _table().to_csv(tmp / "t.csv", index=False)
    return tmp / "t.csv", {"section_order": ["A", "B", "C", "D"]}, r"lists \['D'\] but no cells belong"


def case_one_cell_section(tmp):
    t = pd.concat([_table(), _table(3, ("Z",)).iloc[:1]])
    t.to_csv(tmp / "t.csv", index=False)
    return tmp / "t.csv", {}, r"section 'Z' \(.*t\.csv\) has only 1 cell\(s\).*min_cells_per_section"


def case_duplicate_section_ids(tmp):
    (tmp / "in").mkdir()
    _table(30, ("A",)).to_csv(tmp / "in" / "one.csv", index=False)
    _table(30, ("A",)).to_csv(tmp / "in" / "two.csv", index=False)
    return tmp / "in", {}, r"duplicate section id 'A': in .*one\.csv and in .*two\.csv"


def case_mismatched_genes(tmp):
    (tmp / "in").mkdir()
    _table(30, ("A",)).drop(columns="section").to_csv(tmp / "in" / "A.csv", index=False)
    _table(30, ("B",)).drop(columns="section").rename(columns={"g2": "g3"}).to_csv(tmp / "in" / "B.csv", index=False)
    return (
        tmp / "in",
        {"genes": "rest"},
        r"B\.csv has different genes from .*A\.csv: 1 missing \(e\.g\. \['g2'\]\).*gene_join",
    )


def case_truncated_gzip(tmp):
    _table(3000).to_csv(tmp / "full.csv.gz", index=False)
    blob = (tmp / "full.csv.gz").read_bytes()
    (tmp / "t.csv.gz").write_bytes(blob[: len(blob) // 2])
    return tmp / "t.csv.gz", {"read_rows": 500}, r"t\.csv\.gz: cannot read past data row ~\d+.*truncated or corrupt"


def case_corrupt_parquet(tmp):
    _table().to_parquet(tmp / "ok.parquet")
    blob = bytearray((tmp / "ok.parquet").read_bytes())
    blob[10:200] = b"\x00" * 190
    (tmp / "t.parquet").write_bytes(bytes(blob))
    return tmp / "t.parquet", {}, r"t\.parquet: .*(truncated or corrupt|cannot read the header)"


def case_corrupt_h5ad(tmp):
    (tmp / "t.h5ad").write_bytes(b"not an hdf5 file at all" * 100)
    return tmp / "t.h5ad", {"spatial_key": "spatial"}, r"t\.h5ad: not a readable HDF5/h5ad file.*truncated or corrupt"


def case_wrong_units(tmp):
    t = _table()
    t[["x", "y"]] *= 1e4  # nanometres read as micrometres: sections "5 metres" wide
    t.to_csv(tmp / "t.csv", index=False)
    return tmp / "t.csv", {}, r"section 'A' .* spans [\d.]+e\+06 um after applying units='um'.*set units"


def case_z_varies_within_section(tmp):
    t = _table()
    t["z"] = np.arange(len(t)) * 1.0
    t.to_csv(tmp / "t.csv", index=False)
    return tmp / "t.csv", {"z": "z"}, r"section 'A' .* column 'z' varies from 0 to 19 within the section"


def case_same_z_twice(tmp):
    _table().to_csv(tmp / "t.csv", index=False)
    return tmp / "t.csv", {"section_z": {"A": 0, "B": 10, "C": 10}}, r"sections 'B' and 'C' have the same z"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.fixture(scope="module")
def existing_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    _table(90, ("P", "Q", "R"), seed=9).to_csv(folder / "good.csv", index=False)
    lamina.ingest(folder / "good.csv", folder / "keep.lamina.zarr", genes=["g1", "g2"])
    return folder / "keep.lamina.zarr"


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_named_and_store_left_intact(tmp_path, case, existing_store):
    source, opts, pattern = case(tmp_path)
    store = tmp_path / "keep.lamina.zarr"
    shutil.copytree(existing_store, store)
    before = tree_digest(store)
    with pytest.raises(lamina.InputError, match=pattern):
        lamina.ingest(source, store, overwrite=True, **opts)
    assert tree_digest(store) == before
    assert not list(tmp_path.glob("keep.lamina.zarr.tmp-*"))
    assert lamina.Atlas.open(store).n_cells == 90


def test_cli_build_exits_nonzero_and_names_the_problem(tmp_path):
    source, _, _ = case_nan_coordinates(tmp_path)
    cfg = tmp_path / "build.yaml"
    cfg.write_text(yaml.safe_dump({"store": "out.lamina.zarr", "input": {"path": source.name}}))
    proc = subprocess.run(
        [sys.executable, "-m", "lamina.cli", "build", str(cfg), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "t.parquet: column 'y' has NaN/inf" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.lamina.zarr").exists()


def test_ingest_into_a_store_of_a_newer_format_is_refused(tmp_path, existing_store):
    import json

    store = tmp_path / "keep.lamina.zarr"
    shutil.copytree(existing_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (store / "zarr.json").write_text(json.dumps(meta))
    before = tree_digest(store)
    _table().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(lamina.FormatVersionError, match="format version 99"):
        lamina.ingest(tmp_path / "t.csv", store, overwrite=True)
    assert tree_digest(store) == before
