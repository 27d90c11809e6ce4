"""Stages are atomic and resumable: killed or failed runs never leave a result that looks complete."""

import dataclasses
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_digest

import lamina
import lamina.stages.qc as stats_module
from lamina.stages import qc as qc_stage
from lamina.stages.runner import run


@pytest.fixture
def store(tmp_path, phantom_store):
    path = tmp_path / "s.lamina.zarr"
    shutil.copytree(phantom_store.path, path)
    return lamina.Atlas.open(path, mode="r+")


def test_rerun_is_skipped_and_force_recomputes(store):
    first = lamina.section_stats(store)
    assert first.ran and store.group_is_complete("qc")
    n = store.root["qc/n_cells"][...]
    np.testing.assert_array_equal(n, store.sections.n_cells.to_numpy())
    again = lamina.section_stats(store)
    assert not again.ran and again.hash == first.hash
    forced = lamina.section_stats(store, force=True)
    assert forced.ran and forced.hash == first.hash
    np.testing.assert_array_equal(store.root["qc/n_cells"][...], n)
    assert "_tmp" not in store.root


def test_failure_midway_keeps_the_old_result_and_marks_nothing_complete(store, monkeypatch):
    lamina.section_stats(store)
    before = tree_digest(Path(store.path) / "qc")

    def half_then_crash(ctx):
        ctx.group.create_array("partial", shape=(10,), dtype="f4")
        raise RuntimeError("worker died")

    crashing = dataclasses.replace(qc_stage.STAGE, build=half_then_crash, version=qc_stage.STAGE.version + 1)
    with pytest.raises(RuntimeError, match="worker died"):
        run(crashing, store)
    assert tree_digest(Path(store.path) / "qc") == before  # the previous result is untouched
    assert store.stage_records()["section_stats"]["complete"] is False
    assert "_tmp" not in store.root or not list(store.root["_tmp"].group_keys())

    # a kernel failing inside the real stage, with no previous result: nothing that looks complete
    shutil.rmtree(Path(store.path) / "qc")
    calls = {"n": 0}
    real = stats_module.group_moments

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("worker died")
        return real(*args, **kw)

    monkeypatch.setattr(stats_module, "group_moments", flaky)
    with pytest.raises(RuntimeError, match="worker died"):
        lamina.section_stats(store)
    assert "qc" not in store.root and not store.stage_records()["section_stats"]["complete"]
    monkeypatch.setattr(stats_module, "group_moments", real)
    assert lamina.section_stats(store).ran and store.group_is_complete("qc")


def _wait_for(pred, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


SLOW_STAGE = textwrap.dedent("""
    import sys, time
    import lamina, lamina.stages.qc as m
    real = m.group_moments
    def slow(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)
    m.group_moments = slow
    lamina.section_stats(lamina.Atlas.open(sys.argv[1], mode="r+"))
""")


def test_killed_stage_leaves_no_complete_group_and_rerun_resumes(store, tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_STAGE)
    proc = subprocess.Popen([sys.executable, str(script), store.path])
    scratch = Path(store.path) / "_tmp"
    assert _wait_for(lambda: scratch.exists() and any(scratch.iterdir()))
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reopened = lamina.Atlas.open(store.path, mode="r+")
    assert "qc" not in reopened.root
    assert reopened.stage_records()["section_stats"]["complete"] is False
    assert "INCOMPLETE" in reopened.info()
    res = lamina.section_stats(reopened)
    assert res.ran and reopened.group_is_complete("qc")
    assert not (scratch.exists() and any(scratch.iterdir()))
    assert reopened.stage_records()["ingest"]["complete"]  # earlier stages were not touched


INGEST = textwrap.dedent("""
    import sys, lamina
    ph = lamina.datasets.phantom(n_cells=200_000, n_sections=8, n_genes=40, seed=1, chunk_rows=10_000)
    lamina.ingest(ph, sys.argv[1], overwrite=True)
""")


def test_killed_ingest_leaves_the_old_store_and_rerun_completes(store, tmp_path):
    script = tmp_path / "ingest.py"
    script.write_text(INGEST)
    before = tree_digest(Path(store.path))
    proc = subprocess.Popen([sys.executable, str(script), store.path])
    parent = Path(store.path).parent
    assert _wait_for(
        lambda: any(
            p.joinpath("_staging").exists() and any(p.joinpath("_staging").iterdir())
            for p in parent.glob("s.lamina.zarr.tmp-*")
        )
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tree_digest(Path(store.path)) == before
    assert lamina.Atlas.open(store.path).n_cells == 6000
    done = subprocess.run([sys.executable, str(script), store.path], timeout=300)
    assert done.returncode == 0
    atlas = lamina.Atlas.open(store.path)
    assert atlas.n_cells == 200_000 and atlas.n_genes == 40
    assert not list(parent.glob("s.lamina.zarr.tmp-*"))  # the killed run's scratch was cleaned up
