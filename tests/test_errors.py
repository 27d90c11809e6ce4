"""Faults a user can cause are LaminaErrors that say what, where and the fix; the CLI exits 2 without a
traceback and leaves no half-written output."""

import subprocess
import sys

import pytest

import lamina
from lamina.cli import main


def test_unknown_section_and_gene_name_the_store_and_what_exists(phantom_store):
    with pytest.raises(lamina.UnknownSectionError, match="no section 'NOPE' in .*; its sections are S000, S001"):
        phantom_store.section("NOPE")
    with pytest.raises(lamina.UnknownSectionError, match="position 9 is out of range \\[0, 5\\)"):
        phantom_store.section_index(9)
    with pytest.raises(lamina.UnknownGeneError, match="genes not in .*\\['Xist'\\]; it has 24 genes"):
        phantom_store.to_anndata(genes=["Xist"])
    assert issubclass(lamina.UnknownSectionError, KeyError) and issubclass(lamina.UnknownGeneError, KeyError)
    with pytest.raises(lamina.UnknownSectionError, match="unknown section|no section"):
        lamina.to_atlas(phantom_store, "NOPE", [[0.0, 0.0]])


def test_unknown_and_mistyped_options_are_config_errors(phantom_store, tmp_path):
    with pytest.raises(
        lamina.UnknownOptionError, match="unknown option 'sigm' \\(did you mean 'sigma_px'\\?\\)|unknown option 'sigm'"
    ):
        lamina.rasterize(phantom_store, sigm=2)
    assert issubclass(lamina.UnknownOptionError, TypeError)
    with pytest.raises(lamina.ConfigError, match="'batch' .* must be >= 1, got 0"):
        lamina.register(phantom_store, batch=0)
    with pytest.raises(lamina.ConfigError, match="'reflect' must be true/false, got 'yes'"):
        lamina.register(phantom_store, reflect="yes")
    with pytest.raises(lamina.UnknownOptionError, match="lamina.align\\(\\): unknown option 'alpha'; the stages"):
        lamina.align(phantom_store, alpha=3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sections", "NOPE"], "no section 'NOPE'"),
        (["--genes", "Xist"], "genes not in"),
    ],
)
def test_export_of_unknown_sections_or_genes_exits_2_and_writes_nothing(phantom_store, tmp_path, args, message):
    out = tmp_path / "e.csv.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "lamina.cli", "export", phantom_store.path, "--format", "csv", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_a_failed_export_leaves_no_partial_file(phantom_store, tmp_path, monkeypatch):
    from lamina import export as export_module

    def broken(*a, **k):
        yield from ()
        raise lamina.InputError("disk went away")

    monkeypatch.setattr(export_module, "iter_frames", broken)
    out = tmp_path / "e.parquet"
    with pytest.raises(lamina.InputError, match="disk went away"):
        export_module.export(phantom_store, "parquet", out)
    assert not out.exists() and not (tmp_path / "e.parquet.partial").exists()


def test_stages_missing_their_inputs_name_what_to_run(phantom_store, capsys):
    with pytest.raises(
        lamina.MissingInputError,
        match="stage 'register' needs the output of rasterize .* run lamina.rasterize\\(\\) first",
    ):
        lamina.register(phantom_store)
    assert main(["info", phantom_store.path]) == 0
    assert "not run" in capsys.readouterr().out


def test_impossible_phantom_requests_exit_2(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "p"), "--cells", "10", "--sections", "0"]) == 2
    assert "phantom needs n_sections >= 1" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
