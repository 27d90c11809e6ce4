"""The shipped examples and benchmark scripts keep working (smoke sizes)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import need

import lamina

ROOT = Path(__file__).resolve().parents[1]


def test_example_configs_build(tmp_path, data_dir):
    from lamina.config import load_config

    need(data_dir / "merfish_moffitt")
    cfg = load_config(ROOT / "examples" / "merfish.yaml")
    spec = lamina.config.ingest_spec(cfg)
    atlas = lamina.ingest(cfg["input"]["path"], tmp_path / "e.lamina.zarr", spec, paste=cfg["input"]["paste"] or None)
    assert atlas.n_sections == 12 and atlas.n_cells > 40_000


def test_dlpfc_example_builds_one_stack_per_donor_with_its_spacings(tmp_path, data_dir):
    from lamina.config import load_config

    need(data_dir / "dlpfc")
    cfg = load_config(ROOT / "examples" / "dlpfc.yaml")
    spec = lamina.config.ingest_spec(cfg)
    atlases = lamina.ingest_blocks(cfg["input"]["path"], tmp_path / "dlpfc.lamina.zarr", spec)
    assert list(atlases) == ["Br5292", "Br5595", "Br8100"]
    first = {"Br5292": "151507", "Br5595": "151669", "Br8100": "151673"}
    for donor, atlas in atlases.items():
        assert atlas.path.endswith(f"dlpfc-{donor}.lamina.zarr") and atlas.attrs["block"]["value"] == donor
        assert atlas.sections.id.iloc[0] == first[donor] and atlas.n_sections == 4
        assert np.allclose(atlas.sections.z, [0, 10, 310, 320])
        assert set(atlas.obs().block.astype(str)) == {donor}
    assert sum(a.n_cells for a in atlases.values()) == 47_681


def test_her2st_example_builds_one_stack_per_patient(tmp_path, data_dir):
    import dataclasses

    from lamina.config import load_config

    need(data_dir / "her2st")
    cfg = load_config(ROOT / "examples" / "her2st.yaml")
    spec = dataclasses.replace(lamina.config.ingest_spec(cfg), only_blocks=["C", "G"], genes=None)  # a small cut
    atlases = lamina.ingest_blocks(
        cfg["input"]["path"], cfg["store"].replace(str(ROOT / "examples"), str(tmp_path)), spec
    )
    assert {p: a.sections.id.tolist() for p, a in atlases.items()} == {
        "C": ["C1", "C2", "C3", "C4", "C5", "C6"],
        "G": ["G1", "G2", "G3"],
    }
    assert np.allclose(atlases["C"].sections.z, np.arange(6) * 16.0)
    assert atlases["G"].path.endswith("her2st-G.lamina.zarr")


def test_the_readme_shows_the_shipped_merfish_config(data_dir):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Example, `examples/merfish.yaml`")[1].split("```yaml\n")[1].split("```")[0]
    assert block == (ROOT / "examples" / "merfish.yaml").read_text()
    if (data_dir / "merfish_moffitt").exists():  # the config validates where its input exists
        cfg = lamina.config.load_config(ROOT / "examples" / "merfish.yaml")
        assert cfg["run"] == ["align"] and cfg["stages"]["refine"] == {"z_sigma_sections": 3.0, "alpha_px": 8.0}


def test_ingest_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ingest.py"), "--smoke", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| 20,000 |")][0]
    cells = row.split("|")
    assert float(cells[-2]) < 4.0  # peak RSS (GiB) of the whole process tree
    assert not list(tmp_path.glob("*.lamina.zarr"))  # cleaned up


def test_registration_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "registration.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ")}
    affine = float(rows["lamina affine stage (pairwise + joint solve)"][2])
    refined = float(rows["**lamina refined** (group-wise affine + LDDMM)"][2].strip(" *"))
    bound = float(rows["gauge bound: exact per-section warps, mean deformation set to zero"][2])
    assert 1.0 < bound < refined < affine < 80.0, (bound, refined, affine)  # um
    parts = {
        line.split("|")[1].strip().split(" (")[0]: float(line.split("|")[2])
        for line in proc.stdout.splitlines()
        if line.startswith("| nothing") or line.startswith("| a linear trend") or line.startswith("| one affine")
    }
    assert parts["one affine per section"] <= parts["nothing"] == refined, parts
    assert parts["a linear trend along z of the sections' rigid offsets"] <= parts["nothing"] + 1.0, parts
    still = [line for line in proc.stdout.splitlines() if "tube that stays put" in line][0].split("|")
    assert 0.0 < float(still[2]) < affine
    # the peer comparison: the same phantom pair through every tool, scored by the same code
    peers = {
        line.split("|")[1].strip(): line.split("|")
        for line in proc.stdout.split("#### phantom: median")[1].split("####")[0].splitlines()
        if line.startswith("| S000")
    }
    row = [float(c) for c in peers["S000->S001"][2:-1]]  # unaligned, centroid, lamina, PASTE, STalign (um)
    assert len(row) == 5, proc.stdout[-3000:]
    unaligned, centroid, lamina, paste, stalign = row
    assert lamina < 0.3 * centroid and paste < 0.5 * centroid and stalign < unaligned
    assert "**Targets**" in proc.stdout and "PASTE's own score" in proc.stdout
    # the validation on a phantom family with truth: affine and both fine stages scored in um
    family = [line for line in proc.stdout.splitlines() if line.startswith("| no non-linear warp")][0].split("|")
    medians = [float(family[k].strip(" *").split(" / ")[0]) for k in (2, 3, 4)]  # affine, unchecked, checked
    assert all(0.0 < m < 120.0 for m in medians), family
    warped = [int(w) for w in family[6].split(" of ")[0].split(" / ")]  # unchecked, checked
    assert warped[1] <= warped[0] == 4, family  # measured 4 / 1 of 4: the check drops warps with nothing to find
    assert 0.0 < float(family[8].split(" / ")[2]) < 1.5, family  # the tube's track kept by the checked stage
    steps = proc.stdout.split("lamina's steps, median s per pair: ")[1].splitlines()[0]
    assert steps.startswith("ingest ") and " register " in steps and " refine " in steps, steps


def test_drift_trend_recovers_a_linear_twist_and_shift_along_z():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from registration import drift_trend

    rng = np.random.default_rng(3)
    S, n = 9, 400
    truth = rng.uniform(0, 1000, (S * n, 2))
    sec = np.repeat(np.arange(S), n)
    c = truth.mean(0)
    points = truth.copy()
    jitter = rng.normal(0, 4.0, (S, 2))  # um, per section: kept by the detrending
    for k in range(S):
        th = np.radians(0.3 * (k - 4))
        R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        m = sec == k
        points[m] = (truth[m] - c) @ R.T + c + np.array([2.5, -1.0]) * (k - 4) + jitter[k]
    slopes, left = drift_trend(points, truth, sec, S)
    # points carry the drift (and the jitter's own small trend), so the truth is reached by the opposite slopes
    z = np.arange(S)
    expect = [-0.3, -2.5 - np.polyfit(z, jitter[:, 0], 1)[0], 1.0 - np.polyfit(z, jitter[:, 1], 1)[0]]
    np.testing.assert_allclose(slopes, expect, atol=0.05)
    # what is left is the jitter around its own straight line
    around = jitter - np.stack([np.polyval(np.polyfit(z, jitter[:, j], 1), z) for j in range(2)], 1)
    np.testing.assert_allclose(np.median(left), np.median(np.linalg.norm(around, axis=1)), rtol=0.1)


def test_scaling_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--smoke", "--work", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| 12,000 |")][0].split("|")
    assert all(float(c) >= 0 for c in row[2:-1])  # seconds per stage, wall, s per M cells
    assert 0.2 < float(row[-2]) < 4.0  # peak RSS (GiB) of the process tree
    assert not (tmp_path / "s").exists()  # cleaned up


def test_wide_pca_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "wide_pca.py"), "--cells", "2048", "--genes", "700"]
        + ["--n-pcs", "10", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| this checkout | 2,048 | 700 |")][0]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[3] == "2,048 x 512"  # /X chunks: two gene chunks, so the products go block by block
    assert all(float(cells[i]) > 0 for i in (5, 7))  # ingest and pca seconds
    assert all(0.1 < float(cells[i]) < 2.0 for i in (6, 8))  # their peak RSS (GiB)


def test_interpolation_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "interpolation.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {
        cells[3].strip(): float(cells[4])
        for cells in (line.split("|") for line in proc.stdout.splitlines() if line.startswith("| moving |"))
    }
    assert set(rows) == {"copy", "blend", "untrained", "lamina"}
    # the untrained flow is the blend up to its noise; a few training steps leave the flow near it
    assert 0.8 < rows["copy"] < rows["blend"] and abs(rows["untrained"] - rows["blend"]) < 0.01, rows
    assert abs(rows["lamina"] - rows["blend"]) < 0.02, rows


def test_reconstruction_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reconstruction.py"), "--smoke", "--work", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| invert |" in out and "inversion / floor" in out and "train_flow ran 4 steps" in out
    rss = float(out.split("Peak RSS of the process tree: **")[1].split(" GiB")[0])
    assert rss < 4.0
    assert not (tmp_path / "w").exists()  # cleaned up


def test_maps_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "maps.py"), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [
        line.split("|")
        for line in proc.stdout.splitlines()
        if line.startswith("| 20,000 cells") or line.startswith("| 1,024 x 1,024")
    ]
    assert len(rows) == 2, proc.stdout[-2000:]
    assert "ring 0 finite in 100% of cells" in rows[0][6]  # every cell is in its own first ring
    assert "1 tiles of 2,048 px" in rows[1][6]
    assert all(0.0 < float(r[5]) < 4.0 for r in rows)  # peak RSS (GiB) of the child and its workers


def test_embed_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "embed.py"), "--smoke", "--work", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ")}
    own, flat, deep = rows["own PCs (10)"], rows["niche, z_sections=0 (2D)"], rows["niche, z_sections=2"]
    assert float(flat[5]) > float(own[5])  # the held-out-section probe: neighbourhoods beat the cell alone
    assert float(deep[5]) >= float(flat[5])  # and adjacent sections add to them
    ari_gain = float(deep[3].split()[0])  # ARI - 2D of the one smoke stack
    assert abs(ari_gain - (float(deep[2].split()[0]) - float(flat[2].split()[0]))) <= 0.0011
    scale = rows["20,000"]
    assert 0.0 < float(scale[5]) < 4.0  # peak RSS (GiB) of the child and its workers
    assert not (tmp_path / "w").exists()


def test_small_job_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "small_job.py"), "--no-peers", "--cells", "3000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| lamina |")]
    assert len(rows) == 2 and "killed" not in proc.stdout  # the cluster closed without killing workers
    for row in rows:
        cold, imports, job, warm = (float(v) for v in row[3:7])
        assert 0 < imports < cold and 0 < warm < cold and job < cold  # seconds


def test_quickstart_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "registration moved cells by" in proc.stdout and "obsm: 'spatial', 'spatial_raw'" in proc.stdout
    assert (tmp_path / "quickstart.lamina.zarr" / "aligned").is_dir()


def test_platforms_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "platforms.py"), "--smoke", "--platforms", "xenium"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| xenium |")]
    assert [r.split("|")[2].strip() for r in rows] == ["side by side", "lookup"]
