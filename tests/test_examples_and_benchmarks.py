"""The shipped examples and benchmark scripts keep working (smoke sizes)."""
import subprocess
import sys
from pathlib import Path

import pytest

import lamina
from conftest import need

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["merfish.yaml", "dlpfc.yaml"])
def test_example_configs_build(tmp_path, name, data_dir):
    from lamina.config import load_config

    need(data_dir)
    cfg = load_config(ROOT / "examples" / name)
    spec = lamina.config.ingest_spec(cfg)
    atlas = lamina.ingest(cfg["input"]["path"], tmp_path / "e.lamina.zarr", spec, paste=cfg["input"]["paste"] or None)
    assert atlas.n_sections == 12 and atlas.n_cells > 40_000


def test_ingest_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ingest.py"), "--smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| 20,000 |")][0]
    cells = row.split("|")
    assert float(cells[-2]) < 4.0  # peak RSS (GiB) of the whole process tree
    assert not list(tmp_path.glob("*.lamina.zarr"))  # cleaned up


def test_registration_benchmark_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "registration.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ")}
    affine = float(rows["lamina affine stage (pairwise + joint solve)"][2])
    refined = float(rows["**lamina refined** (group-wise affine + LDDMM)"][2].strip(" *"))
    bound = float(rows["gauge bound: exact per-section warps, mean deformation set to zero"][2])
    assert 1.0 < bound < refined < affine < 80.0, (bound, refined, affine)  # um
    # the peer comparison: the same phantom pair through every tool, scored by the same code
    peers = {line.split("|")[1].strip(): line.split("|") for line in proc.stdout.split("#### phantom: median")[1]
             .split("####")[0].splitlines() if line.startswith("| S000")}
    row = [float(c) for c in peers["S000->S001"][2:-1]]  # unaligned, centroid, lamina, PASTE, STalign (um)
    assert len(row) == 5, proc.stdout[-3000:]
    unaligned, centroid, lamina, paste, stalign = row
    assert lamina < 0.3 * centroid and paste < 0.5 * centroid and stalign < unaligned
    assert "**Targets**" in proc.stdout and "PASTE's own score" in proc.stdout


def test_scaling_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--smoke", "--work", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| 12,000 |")][0].split("|")
    assert all(float(c) >= 0 for c in row[2:-1])              # seconds per stage, wall, s per M cells
    assert 0.2 < float(row[-2]) < 4.0                          # peak RSS (GiB) of the process tree
    assert not (tmp_path / "s").exists()                       # cleaned up


def test_interpolation_benchmark_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "interpolation.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| phantom |")][0]
    r_copy, r_blend, r_lamina = (float(v) for v in row[3:6])
    # a few training steps leave the flow near the identity, i.e. near the blend of the two neighbours
    assert 0.8 < r_copy < r_blend and abs(r_lamina - r_blend) < 0.02, (r_copy, r_blend, r_lamina)


def test_reconstruction_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reconstruction.py"), "--smoke",
                           "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| invert |" in out and "inversion / floor" in out
    rss = float(out.split("Peak RSS of the process tree: **")[1].split(" GiB")[0])
    assert rss < 4.0
    assert not (tmp_path / "w").exists()  # cleaned up
