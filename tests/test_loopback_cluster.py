"""`lamina build` through a real multi-process cluster started with the standard `dask` CLI on loopback."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import lamina


def _dask(*args, log: Path):
    exe = Path(sys.executable).with_name("dask")
    cmd = [str(exe) if exe.exists() else "dask", *args]
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )


@contextlib.contextmanager
def dask_cli_cluster(folder: Path, n_workers: int = 2):
    """One scheduler and ``n_workers`` single-threaded worker processes, all bound to 127.0.0.1; yields
    (address, worker processes)."""
    folder.mkdir(parents=True, exist_ok=True)
    sched_file = folder / "scheduler.json"
    procs = [
        _dask(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(sched_file),
            log=folder / "scheduler.log",
        )
    ]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for i in range(n_workers):
            procs.append(
                _dask(
                    "worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--name",
                    f"w{i}",
                    log=folder / f"worker{i}.log",
                )
            )
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(n_workers, timeout=60)
        yield address, procs[1:]
    finally:
        for p in procs[::-1]:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    with dask_cli_cluster(tmp_path_factory.mktemp("loopback")) as (address, _):
        yield address


@pytest.fixture(scope="module")
def local_build(tmp_path_factory, phantom_table):
    return lamina.Atlas.open(_build(tmp_path_factory.mktemp("local"), phantom_table[0], None, "local"))


def _same_result(a: lamina.Atlas, b: lamina.Atlas) -> None:
    for name in ("transforms/affine", "deformation/affine", "deformation/displacement", "aligned/x", "aligned/y"):
        np.testing.assert_array_equal(a.root[name][...], b.root[name][...], err_msg=name)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _stage_started(store: Path, stage: str) -> bool:
    try:
        meta = json.loads((store / "zarr.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return stage in meta.get("attributes", {}).get("stages", {})


def _build(folder: Path, table, scheduler: str | None, name: str, background: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "cells.csv.gz"
    if not src.exists():
        table.to_csv(src, index=False)
    cfg = {
        "store": f"{name}.lamina.zarr",
        "input": {
            "path": "cells.csv.gz",
            "columns": {"cell_type": "cell_type", "cell_id": "cell_id"},
            "genes": "rest",
            "sections": {"spacing": 35},
        },
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
        "report": {"enabled": False},
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "lamina.cli", "build", str(folder / f"{name}.yaml")]
    if scheduler:
        cmd += ["--scheduler", scheduler]
    if background:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        return proc, folder / f"{name}.lamina.zarr"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / f"{name}.lamina.zarr"


def test_build_through_a_dask_cli_cluster_equals_the_in_process_build(loopback, local_build, tmp_path, phantom_table):
    table, _ = phantom_table
    remote = lamina.Atlas.open(_build(tmp_path, table, loopback, "remote"))
    local = local_build
    assert remote.completed_stages() == local.completed_stages()
    assert "refine" in remote.completed_stages() and "warp" in remote.completed_stages()
    a, b = remote.to_xarray(), local.to_xarray()
    for var in ("x", "y", "X", "cell_type", "cell_section"):
        np.testing.assert_array_equal(a[var].values, b[var].values)
    # every kernel is seeded and runs single-threaded torch on either cluster: the results are bit-identical
    _same_result(remote, local)


def test_a_worker_killed_mid_stage_costs_time_not_data(tmp_path, local_build, phantom_table):
    with dask_cli_cluster(tmp_path / "cluster", n_workers=2) as (address, workers):
        build, store = _build(tmp_path / "b", phantom_table[0], address, "killed", background=True)
        _wait_for(lambda: _stage_started(store, "register"), 300, "the register stage to start")
        workers[0].send_signal(signal.SIGKILL)  # no goodbye: the scheduler notices the lost worker
        out, err = build.communicate(timeout=600)
        assert build.returncode == 0, err[-3000:]
        assert workers[0].wait(timeout=30) != 0
    _same_result(lamina.Atlas.open(store), local_build)


def test_a_killed_client_resumes_from_the_completed_stages(tmp_path, local_build, phantom_table):
    build, store = _build(tmp_path, phantom_table[0], None, "resumed", background=True)
    _wait_for(lambda: _stage_started(store, "refine"), 300, "the refine stage to start")
    os.killpg(build.pid, signal.SIGKILL)  # the client and its local workers, at once, mid-stage
    build.communicate(timeout=60)
    before = lamina.Atlas.open(store).stage_records()
    assert before["register"]["complete"] and not before["refine"]["complete"]
    again = subprocess.run(
        [sys.executable, "-m", "lamina.cli", "build", str(tmp_path / "resumed.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    after = lamina.Atlas.open(store).stage_records()
    for stage in ("ingest", "section_stats", "rasterize", "register"):  # not recomputed
        assert after[stage]["finished"] == before[stage]["finished"], stage
    assert after["refine"]["complete"] and after["warp"]["complete"]
    _same_result(lamina.Atlas.open(store), local_build)
