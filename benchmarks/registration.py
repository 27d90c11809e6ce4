"""Registration benchmark (affine stage and refinement): phantom accuracy against ground truth, real-data label agreement, speed.

    python benchmarks/registration.py            # phantom (20 sections) + MERFISH stack + DLPFC pairs
    python benchmarks/registration.py --write    # also update benchmarks/RESULTS.md
    python benchmarks/registration.py --smoke    # tiny phantom only (seconds; used by the tests)

Phantom: per-cell error (um) of the aligned x, y against the true x, y after removing one global rigid
transform; the oracle row is the best per-section affine fitted *with* the truth (what any affine method can
reach; the rest is the phantom's non-linear warps). Real data: for each cell of section k, the label of the
nearest cell of section k+1 in the aligned frame; the share that agree, against raw coordinates and against
centroid-matched sections. Labels are never used in fitting.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
sys.path.insert(0, str(HERE))
from ingest import write_results  # noqa: E402


def _agreement(atlas, P: np.ndarray, labels: np.ndarray) -> list[float]:
    from scipy.spatial import cKDTree

    sec = atlas.sections
    out = []
    for k in range(len(sec) - 1):
        a = slice(int(sec.cell_start[k]), int(sec.cell_stop[k]))
        b = slice(int(sec.cell_start[k + 1]), int(sec.cell_stop[k + 1]))
        ok_a, ok_b = labels[a] != "nan", labels[b] != "nan"
        _, j = cKDTree(P[b][ok_b]).query(P[a][ok_a])
        out.append(float((labels[a][ok_a] == labels[b][ok_b][j]).mean()))
    return out


def _aligned(atlas) -> np.ndarray:
    return np.stack([atlas.root[f"aligned/{k}"][...] for k in ("x", "y")], 1).astype(np.float64)


def _label_rows(atlas, labels_col: str = "cell_type", client=None) -> dict:
    """Agreement per adjacent pair: raw, centroid-matched, lamina affine stage, lamina refined (both run here)."""
    import lamina

    lamina.align(atlas, client, fine=False)
    affine = _aligned(atlas)
    lamina.align(atlas, client)
    obs = atlas.obs()
    raw = obs[["x", "y"]].to_numpy(np.float64)
    cen = raw.copy()
    sec = atlas.sections
    for k in range(len(sec)):
        s = slice(int(sec.cell_start[k]), int(sec.cell_stop[k]))
        cen[s] -= raw[s].mean(0)
    labels = obs[labels_col].astype(str).to_numpy()
    return {name: _agreement(atlas, P, labels) for name, P in [("unaligned", raw), ("centroid", cen),
                                                               ("lamina affine", affine), ("lamina refined", _aligned(atlas))]}


def phantom_rows(work: Path, client, n_cells: int, n_sections: int) -> tuple[str, dict]:
    import lamina
    from lamina.kernels.geometry import fourier_displacement
    from lamina.kernels.ransac import fit_affine, rigid_residuals

    ph = lamina.datasets.phantom(n_cells=n_cells, n_sections=n_sections, n_genes=8, seed=0)
    atlas = lamina.ingest(ph, work / "phantom.lamina.zarr", client=client)
    times = lamina.align(atlas, client, fine=False)
    affine_err = rigid_residuals(_aligned(atlas), truth := np.concatenate(
        [xyz for s in range(n_sections) for _, xyz in ph.section_chunks(s)])[:, :2])
    times.update({k: v for k, v in lamina.align(atlas, client).items() if k in ("refine", "warp")})
    obs = atlas.obs(columns=["x", "y", "section"])
    sec = obs.section.cat.codes.to_numpy()
    err = rigid_residuals(_aligned(atlas), truth)
    raw = obs[["x", "y"]].to_numpy(np.float64)
    oracle = np.empty(len(raw))
    for k in range(n_sections):
        m = sec == k
        A = fit_affine(raw[m], truth[m])
        oracle[m] = np.linalg.norm(raw[m] @ A[:2, :2].T + A[:2, 2] - truth[m], axis=1)
    # the gauge bound: even perfect pairwise knowledge cannot see a deformation shared by all sections; an
    # estimator that sets the mean deformation to zero is off by the mean of the sections' warps
    sub = truth[::max(1, len(truth) // 50_000)]
    shared = np.mean([fourier_displacement(sub, ph.warp_k[s], ph.warp_phase[s], ph.warp_amp[s])
                      for s in range(n_sections)], axis=0)
    bound = rigid_residuals(sub + shared, sub)

    def drift(e):
        per = np.array([np.median(e[sec == k]) for k in range(n_sections)])
        return max(per[0], per[-1]) / np.median(per[n_sections // 4: 3 * n_sections // 4])

    rec = atlas.stage_records()["register"]
    n_refined = int(np.sum(atlas.root["deformation/sections/refined"][...]))
    text = (f"### Phantom, {n_sections} sections, {n_cells:,} cells (default perturbations: rotation up to 180 deg, "
            f"translation up to 1 mm, scale +-10%, 3 warp modes of 30 um)\n\n"
            "| method | median error (um) | p95 (um) | first/last section vs middle (median) |\n|---|---|---|---|\n"
            f"| lamina affine stage (pairwise + joint solve) | {np.median(affine_err):.1f} | "
            f"{np.percentile(affine_err, 95):.1f} | {drift(affine_err):.2f}x |\n"
            f"| **lamina refined** (group-wise affine + LDDMM) | **{np.median(err):.1f}** | "
            f"**{np.percentile(err, 95):.1f}** | **{drift(err):.2f}x** |\n"
            f"| oracle per-section affine (fitted with the truth) | {np.median(oracle):.1f} | "
            f"{np.percentile(oracle, 95):.1f} | - |\n"
            f"| gauge bound: exact per-section warps, mean deformation set to zero | {np.median(bound):.1f} | "
            f"{np.percentile(bound, 95):.1f} | - |\n\n"
            f"Time per step (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
            + f"; {rec['n_pairs']} pairs registered ({rec['n_pairs'] and times['register'] / rec['n_pairs']:.2f} s "
              f"per pair), {n_refined} sections refined ({times['refine'] / max(n_refined, 1):.2f} s per section), "
              f"on 2 workers.\n")
    return text, {"median": float(np.median(err)), "affine": float(np.median(affine_err)),
                  "oracle": float(np.median(oracle)), "bound": float(np.median(bound))}


def merfish_rows(work: Path, client) -> str:
    import lamina

    folder = DATA / "merfish_moffitt"
    if not folder.exists():
        return "### MERFISH: skipped (../shared/data/merfish_moffitt not present)\n"
    atlas = lamina.ingest(folder / "merFISH_3D_data_cell_locations.txt", work / "merfish.lamina.zarr",
                          paste=[folder / "merFISH_3D_metadata.txt"], section="layer_ID", z="z",
                          cell_type="orig_cell_types", client=client)
    t0 = time.perf_counter()
    rows = _label_rows(atlas, client=client)
    seconds = time.perf_counter() - t0
    ids = atlas.sections.id.tolist()
    head = "| pair | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows) + "\n"
    body = "".join(f"| {ids[k]} -> {ids[k + 1]} | " + " | ".join(f"{rows[m][k]:.3f}" for m in rows) + " |\n"
                   for k in range(len(ids) - 1))
    mean = "| **mean** | " + " | ".join(f"**{np.mean(rows[m]):.3f}**" for m in rows) + " |\n"
    return ("### MERFISH (Moffitt 2018), 12 sections 50 um apart: nearest-neighbour class agreement (16 classes)\n\n"
            + head + body + mean + f"\nregistration (affine stage, then refined): {seconds:.1f} s.\n")


def dlpfc_rows(work: Path, client) -> str:
    import json

    import lamina

    path = DATA / "dlpfc" / "dlpfc_12_sections_spots_layers.csv.gz"
    if not path.exists():
        return "### DLPFC: skipped (../shared/data/dlpfc not present)\n"
    scale = json.loads((DATA / "dlpfc/raw/151507/scalefactors_json.json").read_text())
    pairs = [("151507", "151508"), ("151509", "151510"), ("151669", "151670"), ("151671", "151672"),
             ("151673", "151674"), ("151675", "151676")]
    import pandas as pd

    table = pd.read_csv(path)
    means = {"unaligned": [], "centroid": [], "lamina affine": [], "lamina refined": []}
    lines = ["| pair | " + " | ".join(means) + " |", "|---|" + "---|" * len(means)]
    for a, b in pairs:
        part = table[table.section.astype(str).isin([a, b])]
        src = work / f"dlpfc_{a}.csv"
        part.to_csv(src, index=False)
        atlas = lamina.ingest(src, work / f"dlpfc_{a}.lamina.zarr", x="pxl_col_fullres", y="pxl_row_fullres",
                              section="section", cell_type="layer", units="px",
                              pixel_size=65.0 / scale["spot_diameter_fullres"], section_order=[a, b], client=client)
        rows = _label_rows(atlas, client=client)
        for m in means:
            means[m].append(rows[m][0])
        lines.append(f"| {a} -> {b} | " + " | ".join(f"{rows[m][0]:.3f}" for m in means) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{np.mean(means[m]):.3f}**" for m in means) + " |")
    return ("### DLPFC (Maynard 2021), adjacent pairs 10 um apart: nearest-neighbour layer agreement\n\n"
            + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    import lamina

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--sections", type=int, default=20)
    p.add_argument("--write", action="store_true")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lamina-regbench-"))
    client = lamina.connect()
    try:
        if args.smoke:
            text, _ = phantom_rows(work, client, 8_000, 4)
        else:
            text = "\n".join([phantom_rows(work, client, args.cells, args.sections)[0], merfish_rows(work, client),
                              dlpfc_rows(work, client)])
    finally:
        client.close()
        shutil.rmtree(work, ignore_errors=True)
    header = (f"## Registration (benchmarks/registration.py)\n\n{dt.date.today()} · {os.cpu_count()} cores, "
              f"no GPU · lamina {lamina.__version__}, Python {platform.python_version()} · command: "
              f"`python benchmarks/registration.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
    print(header + text)
    if args.write and not args.smoke:
        write_results(header + text, section="registration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
