"""`lamina build` through a real multi-process cluster started with the standard `dask` CLI on loopback."""
import json
import os
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
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    """One scheduler and two single-threaded worker processes, all bound to 127.0.0.1."""
    folder = tmp_path_factory.mktemp("loopback")
    sched_file = folder / "scheduler.json"
    procs = [_dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                   str(sched_file), log=folder / "scheduler.log")]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            procs.append(_dask("worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                               "--name", f"w{i}", log=folder / f"worker{i}.log"))
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def _build(folder: Path, table, scheduler: str | None, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "cells.csv.gz"
    if not src.exists():
        table.to_csv(src, index=False)
    cfg = {"store": f"{name}.lamina.zarr",
           "input": {"path": "cells.csv.gz", "columns": {"cell_type": "cell_type", "cell_id": "cell_id"},
                     "genes": "rest", "sections": {"spacing": 35}},
           "cluster": {"n_workers": 2, "threads_per_worker": 1}, "report": {"enabled": False}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "lamina.cli", "build", str(folder / f"{name}.yaml")]
    if scheduler:
        cmd += ["--scheduler", scheduler]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / f"{name}.lamina.zarr"


def test_build_through_a_dask_cli_cluster_equals_the_in_process_build(loopback, tmp_path, phantom_table):
    table, _ = phantom_table
    remote = lamina.Atlas.open(_build(tmp_path, table, loopback, "remote"))
    local = lamina.Atlas.open(_build(tmp_path, table, None, "local"))
    assert remote.completed_stages() == local.completed_stages()
    assert "refine" in remote.completed_stages() and "warp" in remote.completed_stages()
    a, b = remote.to_xarray(), local.to_xarray()
    for var in ("x", "y", "X", "cell_type", "cell_section"):
        np.testing.assert_array_equal(a[var].values, b[var].values)
    # every kernel is seeded and runs single-threaded torch on either cluster: the results are bit-identical
    for name in ("transforms/affine", "deformation/affine", "deformation/displacement", "aligned/x", "aligned/y"):
        np.testing.assert_array_equal(remote.root[name][...], local.root[name][...], err_msg=name)
    hashes = {k: v["hash"] for k, v in remote.stage_records().items()}
    assert hashes == {k: v["hash"] for k, v in local.stage_records().items()}
