"""The stage contract: one declaration per stage, from which config validation, plans, `build`, `info`,
the docs and the completion hashes derive."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import lamina
from lamina.cli import main
from lamina.stages import Options, Stage, option, registry
from lamina.stages.docs import BEGIN, END, readme_block
from lamina.stages.pipeline import plan
from lamina.stages.runner import stage_state
from lamina.store import arrays
from lamina.store.elements import Element

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class ToyOptions(Options):
    scale: float = option(2.0, "factor on the cell counts", gt=0)
    label: str = option("toy", "a name written into the output")


def _toy_build(ctx):
    n = np.asarray(ctx.atlas.root["qc/n_cells"][...], np.float64)
    arrays.write_small(ctx.group, "scaled", n * ctx.options.scale, ("section",))
    ctx.group.attrs["label"] = ctx.options.label
    return {"sections": len(n)}


class ToyV1(Element):
    encoding_type = "test.toy"
    members = ("scaled",)
    attrs = ("label",)


TOY = Stage(
    name="toy",
    output="toy",
    inputs=("section_stats",),
    options=ToyOptions,
    version=1,
    summary="A toy stage: cells per section times a factor.",
    build=_toy_build,
    element=ToyV1,
)


@pytest.fixture
def store(tmp_path, phantom_store):
    path = tmp_path / "s.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    return lamina.Atlas.open(path, mode="r+")


@pytest.fixture
def toy():
    with registry.added(TOY) as stage:
        yield stage


def test_a_toy_stage_appears_in_config_validation_build_info_and_docs(toy, tmp_path, phantom_table, capsys):
    table, _ = phantom_table
    table.to_parquet(tmp_path / "cells.parquet")
    cfg = {
        "store": "t.lamina.zarr",
        "input": {"path": "cells.parquet", "columns": {"cell_type": "cell_type"}},
        "run": ["toy"],
        "stages": {"toy": {"scale": 3}},
        "cluster": {"n_workers": 1},
        "report": {"enabled": False},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = lamina.config.load_config(path)
    assert loaded["stages"]["toy"] == {"scale": 3.0} and isinstance(loaded["stages"]["toy"]["scale"], float)
    bad = dict(cfg, stages={"toy": {"scale": -1}})
    path.write_text(yaml.safe_dump(bad))
    assert main(["build", str(path)]) == 2
    assert "'stages.toy.scale' (factor on the cell counts) must be > 0, got -1" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(cfg))
    assert main(["build", str(path)]) == 0  # toy needs section_stats: the plan pulls it in
    atlas = lamina.Atlas.open(tmp_path / "t.lamina.zarr")
    assert atlas.completed_stages() == ["ingest", "section_stats", "toy"]
    np.testing.assert_array_equal(atlas.root["toy/scaled"][...], 3.0 * atlas.sections.n_cells.to_numpy())
    assert main(["info", str(tmp_path / "t.lamina.zarr")]) == 0
    out = capsys.readouterr().out
    toy_line = [line for line in out.splitlines() if line.strip().startswith("toy ")][0]
    assert "complete" in toy_line and "/toy" in toy_line
    assert main(["stages"]) == 0
    assert "toy -> /toy" in capsys.readouterr().out
    assert "#### `toy` -> `/toy`" in readme_block()
    with pytest.raises(lamina.ConfigError, match="unknown option 'scal' \\(did you mean 'scale'\\?\\)"):
        lamina.stages.run(toy, atlas.writable(), options={"scal": 1})


def test_bumping_a_stage_version_reruns_it_and_skips_the_others(store, monkeypatch):
    lamina.align(store, fine=False)
    before = store.stage_records()
    real = registry._builtin_and_plugins()
    bumped = tuple(dataclasses.replace(s, version=s.version + 1) if s.name == "warp" else s for s in real)
    monkeypatch.setattr(registry, "_builtin_and_plugins", lambda: bumped)
    warp = registry.get_stage("warp")
    assert stage_state(store, warp) == "stale (algorithm version 1 -> 2)"
    seconds = lamina.align(store, fine=False)
    after = store.stage_records()
    assert set(seconds) == {"section_stats", "rasterize", "register", "warp"}
    for name in ("section_stats", "rasterize", "register"):
        assert after[name] == before[name]  # skipped: the same record, not recomputed
    assert after["warp"]["algorithm_version"] == 2 and after["warp"]["hash"] != before["warp"]["hash"]
    assert after["warp"]["started"] >= before["warp"]["finished"]
    assert stage_state(store, warp) == "complete"


def test_options_are_normalised_through_their_types_before_hashing(store):
    lamina.section_stats(store)
    first = lamina.rasterize(store, sigma_px=2)  # an int for a float option, as YAML gives it
    again = lamina.rasterize(store, sigma_px=2.0)
    assert first.ran and not again.ran and again.hash == first.hash
    assert store.stage_records()["rasterize"]["params"]["sigma_px"] == 2.0
    opts = lamina.stages.refine.stage.options.parse({"alpha_px": 8, "lddmm_iterations": [100, 50]})
    assert opts == lamina.stages.refine.stage.options() and isinstance(opts.alpha_px, float)


def test_a_plan_checks_every_stage_before_the_first_runs(tmp_path, phantom_table):
    table, _ = phantom_table
    cols = ["section", "x", "y", "cell_type"]
    table[cols].to_csv(tmp_path / "cells.csv", index=False)
    atlas = lamina.ingest(tmp_path / "cells.csv", tmp_path / "n.lamina.zarr", cell_type="cell_type")
    with pytest.raises(lamina.MissingInputError, match="pca needs expression: .* has no expression matrix /X"):
        plan(atlas, ["align", "reconstruct"])
    assert atlas.completed_stages() == ["ingest"]  # nothing ran
    steps = plan(atlas, ["align"])
    assert [s.stage.name for s in steps] == ["section_stats", "rasterize", "register", "refine", "warp"]
    # PC channels pull the pca stage in before rasterize; fine=False leaves refine out and warps the affine
    ph = lamina.datasets.phantom(n_cells=2_000, n_sections=3, n_genes=6, seed=1)
    with_genes = lamina.ingest(ph, tmp_path / "g.lamina.zarr", cell_type=None, genes=[f"g{i:04d}" for i in range(6)])
    steps = plan(with_genes, ["align"], {"warp": {}}, disabled=["refine"])
    assert [s.stage.name for s in steps] == ["section_stats", "pca", "rasterize", "register", "warp"]
    assert steps[-1].options.source == "affine"
    with pytest.raises(lamina.ConfigError, match="stage 'warp' needs 'refine', which is switched off"):
        plan(with_genes, ["warp"], {"warp": {"source": "refined"}}, disabled=["refine"])


def test_readme_option_tables_are_the_registry(capsys):
    text = (ROOT / "README.md").read_text()
    block = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert block == readme_block(), "README option tables are stale: run python -m lamina.stages.docs README.md"
    for name, stage in registry.all_stages().items():
        for f in stage.options.fields():
            assert f"| `{f.name}` |" in block, (name, f.name)


def test_every_builtin_stage_declares_what_it_reads_and_writes():
    stages = registry.all_stages()
    outputs = [s.output for s in stages.values()]
    assert len(set(outputs)) == len(outputs)
    from lamina.store.elements import CURRENT

    for name, stage in stages.items():
        assert stage.element in CURRENT, name  # built-in stages write built-in elements
        assert all(i == registry.ROOT or i in stages for i in stage.inputs), name
        assert stage.summary and stage.version >= 1
        for f in stage.options.fields():
            assert f.metadata.get("doc"), (name, f.name)
        defaults = stage.options()  # every option has a default, and it is a value of the option's own type
        assert stage.options.parse(defaults.to_dict()) == defaults, name
        assert lamina.stages.__dict__[name].stage is stage  # the public function is the declared stage
