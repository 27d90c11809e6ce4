"""Registration benchmark (affine stage and refinement): phantom accuracy against ground truth, real-data label
agreement, speed.

    python benchmarks/registration.py            # stacks (phantom, MERFISH, DLPFC pairs) + peers on all data sets
    python benchmarks/registration.py --no-stack --peers her2st   # only the peer comparison on her2st
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

DLPFC_PAIRS = [
    ("151507", "151508"),
    ("151509", "151510"),
    ("151669", "151670"),
    ("151671", "151672"),
    ("151673", "151674"),
    ("151675", "151676"),
]


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
    return {
        name: _agreement(atlas, P, labels)
        for name, P in [
            ("unaligned", raw),
            ("centroid", cen),
            ("lamina affine", affine),
            ("lamina refined", _aligned(atlas)),
        ]
    }


def phantom_rows(work: Path, client, n_cells: int, n_sections: int) -> tuple[str, dict]:
    import lamina
    from lamina.kernels.geometry import fourier_displacement
    from lamina.kernels.groupwise import smoothing_weights
    from lamina.kernels.ransac import fit_affine, rigid_residuals
    from lamina.stages.refine import RefineOptions

    def true_xy(phantom):
        return np.concatenate([xyz for s in range(n_sections) for _, xyz in phantom.section_chunks(s)])[:, :2]

    def affine_residuals(points):
        # what is left after one affine per section, fitted with the truth
        out = np.empty(len(points))
        for k in range(n_sections):
            m = sec == k
            A = fit_affine(points[m], truth[m])
            out[m] = np.linalg.norm(points[m] @ A[:2, :2].T + A[:2, 2] - truth[m], axis=1)
        return out

    ph = lamina.datasets.phantom(n_cells=n_cells, n_sections=n_sections, n_genes=8, seed=0)
    atlas = lamina.ingest(ph, work / "phantom.lamina.zarr", client=client)
    times = lamina.align(atlas, client, fine=False)
    truth = true_xy(ph)
    obs = atlas.obs(columns=["x", "y", "section"])
    sec = obs.section.cat.codes.to_numpy()
    affine_xy = _aligned(atlas)
    affine_err = rigid_residuals(affine_xy, truth)
    affine_slopes = drift_trend(affine_xy, truth, sec, n_sections)[0]
    times.update({k: v for k, v in lamina.align(atlas, client).items() if k in ("refine", "warp")})
    refined = _aligned(atlas)
    err = rigid_residuals(refined, truth)
    oracle = affine_residuals(obs[["x", "y"]].to_numpy(np.float64))
    # the gauge bound: even perfect pairwise knowledge cannot see a deformation shared by all sections; an
    # estimator that sets the mean deformation to zero is off by the mean of the sections' warps
    step = max(1, len(truth) // 50_000)
    sub, sub_sec = truth[::step], sec[::step]
    warps = np.stack(
        [fourier_displacement(sub, ph.warp_k[s], ph.warp_phase[s], ph.warp_amp[s]) for s in range(n_sections)]
    )
    shared = warps.mean(0)
    bound = rigid_residuals(sub + shared, sub)
    # the same bound for a template of neighbours (refine's z_sigma_sections): a warp shared by the sections
    # near k is invisible against them, so what is left is each section's Gaussian-in-z local mean of the warps
    sigma = RefineOptions().z_sigma_sections
    local = np.einsum("kj,jnd->knd", smoothing_weights(n_sections, sigma), warps)[sub_sec, np.arange(len(sub))]
    local_bound = rigid_residuals(sub + local, sub)

    def drift(e):
        per = np.array([np.median(e[sec == k]) for k in range(n_sections)])
        return max(per[0], per[-1]) / np.median(per[n_sections // 4 : 3 * n_sections // 4])

    rec = atlas.stage_records()["register"]
    n_refined = int(np.sum(atlas.root["deformation/sections/refined"][...]))
    slopes, detrended = drift_trend(refined, truth, sec, n_sections)
    nonlinear = affine_residuals(refined)
    # the same stack with expression channels next to the types (pca first; every stage after it re-runs)
    lamina.align(atlas, client, channels="types+pcs")
    both = rigid_residuals(_aligned(atlas), truth)
    # the same phantom with a tube that stays put: what the one structure moving through the stack costs
    still = lamina.datasets.phantom(n_cells=n_cells, n_sections=n_sections, n_genes=8, seed=0, tube_travel_um=0.0)
    still_atlas = lamina.ingest(still, work / "phantom_still.lamina.zarr", client=client)
    lamina.align(still_atlas, client)
    still_err = rigid_residuals(_aligned(still_atlas), true_xy(still))
    text = (
        f"### Phantom, {n_sections} sections, {n_cells:,} cells (default perturbations: rotation up to 180 deg, "
        f"translation up to 1 mm, scale +-10%, 3 warp modes of 30 um)\n\n"
        "| method | median error (um) | p95 (um) | first/last section vs middle (median) |\n|---|---|---|---|\n"
        f"| lamina affine stage (pairwise + joint solve) | {np.median(affine_err):.1f} | "
        f"{np.percentile(affine_err, 95):.1f} | {drift(affine_err):.2f}x |\n"
        f"| **lamina refined** (group-wise affine + LDDMM) | **{np.median(err):.1f}** | "
        f"**{np.percentile(err, 95):.1f}** | **{drift(err):.2f}x** |\n"
        f'| lamina refined, `channels="types+pcs"` (types + 8 expression PCs) | {np.median(both):.1f} | '
        f"{np.percentile(both, 95):.1f} | {drift(both):.2f}x |\n"
        f"| oracle per-section affine (fitted with the truth) | {np.median(oracle):.1f} | "
        f"{np.percentile(oracle, 95):.1f} | - |\n"
        f"| gauge bound: exact per-section warps, mean deformation set to zero | {np.median(bound):.1f} | "
        f"{np.percentile(bound, 95):.1f} | - |\n"
        f"| local gauge bound: exact per-section warps less their Gaussian-in-z local mean ({sigma:g} sections, "
        f"refine's template width) | {np.median(local_bound):.1f} | {np.percentile(local_bound, 95):.1f} | - |\n"
        f"| lamina refined, the same phantom with a tube that stays put (`tube_travel_um=0`) | "
        f"{np.median(still_err):.1f} | {np.percentile(still_err, 95):.1f} | {drift(still_err):.2f}x |\n\n"
        "Where the refined error comes from (the refined positions above, parts removed with the truth):\n\n"
        "| removed | median (um) | p95 (um) |\n|---|---|---|\n"
        f"| nothing | {np.median(err):.1f} | {np.percentile(err, 95):.1f} |\n"
        f"| a linear trend along z of the sections' rigid offsets (drift per section: x {slopes[1]:+.2f} um, "
        f"y {slopes[2]:+.2f} um, {slopes[0]:+.3f} deg) | {np.median(detrended):.1f} | "
        f"{np.percentile(detrended, 95):.1f} |\n"
        f"| one affine per section (what is left is non-linear) | {np.median(nonlinear):.1f} | "
        f"{np.percentile(nonlinear, 95):.1f} |\n\n"
        f"The same line through the affine stage's positions: x {affine_slopes[1]:+.2f} um, "
        f"y {affine_slopes[2]:+.2f} um, {affine_slopes[0]:+.3f} deg per section.\n\n"
        f"Time per step (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
        + f"; {rec['n_pairs']} pairs registered ({rec['n_pairs'] and times['register'] / rec['n_pairs']:.2f} s "
        f"per pair), {n_refined} sections refined ({times['refine'] / max(n_refined, 1):.2f} s per section), "
        f"on 2 workers.\n"
    )
    return text, {
        "median": float(np.median(err)),
        "affine": float(np.median(affine_err)),
        "oracle": float(np.median(oracle)),
        "bound": float(np.median(bound)),
        "local_bound": float(np.median(local_bound)),
        "detrended": float(np.median(detrended)),
        "nonlinear": float(np.median(nonlinear)),
        "still": float(np.median(still_err)),
    }


def drift_trend(
    points: np.ndarray, truth: np.ndarray, sec: np.ndarray, n_sections: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drift along z: after the one global rigid transform, each section's own rigid offset from the truth
    (rotation about the tissue centre, translation), and a straight line through those offsets over the
    section index. Returns the line's slopes ``[deg, um x, um y]`` per section and the per-point error left
    when each section is moved by the line's value at its index (its jitter around the line is kept)."""
    from lamina.kernels.ransac import fit_similarity, rigid_align

    c = truth.mean(0)
    P = rigid_align(points, truth)
    offsets = np.full((n_sections, 3), np.nan)
    for k in range(n_sections):
        m = sec == k
        if m.sum() < 3:
            continue
        Tk = fit_similarity(P[m], truth[m])
        Rk = Tk[:2, :2] / np.sqrt(abs(np.linalg.det(Tk[:2, :2])))
        # the rigid map about the centre: x -> Rk (x - c) + c + t
        t = truth[m].mean(0) - (Rk @ (P[m].mean(0) - c) + c)
        offsets[k] = np.arctan2(Rk[1, 0], Rk[0, 0]), *t
    z = np.arange(n_sections, dtype=np.float64)
    ok = np.isfinite(offsets[:, 0])
    fits = [np.polyfit(z[ok], offsets[ok, j], 1) for j in range(3)]
    out = P.copy()
    for k in range(n_sections):
        m = sec == k
        th, tx, ty = (np.polyval(f, k) for f in fits)
        Rk = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        out[m] = (P[m] - c) @ Rk.T + c + (tx, ty)
    slopes = np.array([np.degrees(fits[0][0]), fits[1][0], fits[2][0]])
    return slopes, np.linalg.norm(out - truth, axis=1)


def merfish_rows(work: Path, client) -> str:
    import lamina

    folder = DATA / "merfish_moffitt"
    if not folder.exists():
        return "### MERFISH: skipped (../shared/data/merfish_moffitt not present)\n"
    atlas = lamina.ingest(
        folder / "merFISH_3D_data_cell_locations.txt",
        work / "merfish.lamina.zarr",
        paste=[folder / "merFISH_3D_metadata.txt"],
        section="layer_ID",
        z="z",
        cell_type="orig_cell_types",
        client=client,
    )
    t0 = time.perf_counter()
    rows = _label_rows(atlas, client=client)
    seconds = time.perf_counter() - t0
    ids = atlas.sections.id.tolist()
    head = "| pair | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows) + "\n"
    body = "".join(
        f"| {ids[k]} -> {ids[k + 1]} | " + " | ".join(f"{rows[m][k]:.3f}" for m in rows) + " |\n"
        for k in range(len(ids) - 1)
    )
    mean = "| **mean** | " + " | ".join(f"**{np.mean(rows[m]):.3f}**" for m in rows) + " |\n"
    return (
        "### MERFISH (Moffitt 2018), 12 sections 50 um apart: nearest-neighbour class agreement (16 classes)\n\n"
        + head
        + body
        + mean
        + f"\nregistration (affine stage, then refined): {seconds:.1f} s.\n"
    )


def _dlpfc_columns(scale: dict) -> dict:
    """How the DLPFC table is read: full-resolution pixels, scaled by the 65 um spot diameter."""
    return {
        "x": "pxl_col_fullres",
        "y": "pxl_row_fullres",
        "section": "section",
        "units": "px",
        "pixel_size": 65.0 / scale["spot_diameter_fullres"],
    }


def dlpfc_rows(work: Path, client) -> str:
    import json

    import lamina

    path = DATA / "dlpfc" / "dlpfc_12_sections_spots_layers.csv.gz"
    if not path.exists():
        return "### DLPFC: skipped (../shared/data/dlpfc not present)\n"
    scale = json.loads((DATA / "dlpfc/raw/151507/scalefactors_json.json").read_text())
    import pandas as pd

    table = pd.read_csv(path)
    means = {"unaligned": [], "centroid": [], "lamina affine": [], "lamina refined": []}
    lines = ["| pair | " + " | ".join(means) + " |", "|---|" + "---|" * len(means)]
    for a, b in DLPFC_PAIRS:
        part = table[table.section.astype(str).isin([a, b])]
        src = work / f"dlpfc_{a}.csv"
        part.to_csv(src, index=False)
        atlas = lamina.ingest(
            src,
            work / f"dlpfc_{a}.lamina.zarr",
            **_dlpfc_columns(scale),
            cell_type="layer",
            section_order=[a, b],
            client=client,
        )
        rows = _label_rows(atlas, client=client)
        for m in means:
            means[m].append(rows[m][0])
        lines.append(f"| {a} -> {b} | " + " | ".join(f"{rows[m][0]:.3f}" for m in means) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{np.mean(means[m]):.3f}**" for m in means) + " |")
    return (
        "### DLPFC (Maynard 2021), adjacent pairs 10 um apart: nearest-neighbour layer agreement\n\n"
        + "\n".join(lines)
        + "\n"
    )


# ------------------------------------------------------------------------------- independent validation (issue 20)
#: phantom families with truth, next to the default one: what a fine stage may not straighten or invent
FAMILIES = {
    "default": {},
    "no non-linear warp (warp_um=0): nothing for the fine stage to find": {"warp_um": 0.0},
    "sections far apart (150 um) with layers that bend with depth": {
        "section_spacing": 150.0,
        "layer_drift_um": 80.0,
        "layer_drift_period_um": 1500.0,
    },
    "a tube that appears and vanishes (middle 40% of the depth)": {"tube_span": (0.3, 0.7)},
    "a strongly curved tube (900 um of travel)": {"tube_travel_um": 900.0},
    "20% of sections badly damaged (tears of 25-40% of the area)": {"damaged_fraction": 0.2},
}


#: the stages every validation set compares: the affine stage, the fine stage without and with its check
VARIANTS = (("affine", None), ("unchecked", {"heldout_check": False}), ("checked", {}))


def _variants(atlas, client):
    """Align ``atlas`` with the affine stage, then refine it as each of :data:`VARIANTS`; yields ``(key,
    aligned xy [cell, 2], sections warped, fine-stage seconds)`` after each (the last two None for affine)."""
    import lamina

    lamina.align(atlas, client, fine=False)
    for key, opts in VARIANTS:
        warped = seconds = None
        if opts is not None:
            t0 = time.perf_counter()
            lamina.refine(atlas, client, **opts)
            lamina.warp(atlas, client, source="refined")
            seconds = time.perf_counter() - t0
            warped = int(np.sum(atlas.root["deformation/sections/refined"][...]))
        yield key, _aligned(atlas), warped, seconds


def _tube_travel(xy: np.ndarray, truth: np.ndarray, sec: np.ndarray, tube: np.ndarray, S: int) -> tuple:
    """(true, aligned) distance between the tube's cell centroid in the first and the last section holding
    tube cells (aligned positions after one global rigid fit onto the truth), and the share of the tube's
    whole track that the aligned stack keeps: the regression slope of the aligned centroids on the true ones
    over every section holding tube cells, ``sum_k (a_k - mean a).(t_k - mean t) / sum_k |t_k - mean t|^2``
    (1: the track as it is; 0: straightened to a point). The end-to-end distance rests on two sections,
    each off by its own warp error (tens of um); the slope uses all of them and follows a curved track."""
    from lamina.kernels.ransac import rigid_align

    moved = rigid_align(xy, truth)
    have = [k for k in range(S) if ((sec == k) & tube).sum() > 20]
    if len(have) < 2:
        return float("nan"), float("nan"), float("nan")
    a = np.array([moved[(sec == k) & tube].mean(0) for k in have])
    t = np.array([truth[(sec == k) & tube].mean(0) for k in have])
    true = np.linalg.norm(t[-1] - t[0])
    kept = np.linalg.norm(a[-1] - a[0])
    dt, da = t - t.mean(0), a - a.mean(0)
    return float(true), float(kept), float(np.sum(da * dt) / np.sum(dt * dt))


def family_rows(work: Path, client, n_cells: int, n_sections: int, families=None) -> tuple[str, list[dict]]:
    """Each phantom family: the affine stage, the fine stage without its held-out check (refine version 1)
    and with it (the default), against the truth."""
    import lamina
    from lamina.kernels.ransac import rigid_residuals

    rows = []
    for name, extra in (families or FAMILIES).items():
        ph = lamina.datasets.phantom(n_cells=n_cells, n_sections=n_sections, n_genes=8, seed=0, **extra)
        atlas = lamina.ingest(ph, work / f"family_{len(rows)}.lamina.zarr", client=client)
        truth3 = np.concatenate([xyz for s in range(n_sections) for _, xyz in ph.section_chunks(s)])
        truth = truth3[:, :2]
        sec = atlas.obs(columns=["section"]).section.cat.codes.to_numpy()
        # the tube by the truth, not by the observed labels: their 3% random labels put "tube" cells in every
        # section, also where the tube does not exist
        tube = ph.memberships(truth3)[:, -1] > 0.5
        row: dict = {"family": name}
        for key, xy, warped, seconds in _variants(atlas, client):
            if warped is not None:
                row[f"{key}_s"], row[f"{key}_warped"] = seconds, warped
            err = rigid_residuals(xy, truth)
            row[key] = (float(np.median(err)), float(np.percentile(err, 95)))
            row["damaged_" + key] = (
                float(np.median(err[np.isin(sec, np.flatnonzero(ph.damaged))])) if ph.damaged.any() else float("nan")
            )
            row["travel"], row[f"travel_{key}"], row[f"track_{key}"] = _tube_travel(xy, truth, sec, tube, n_sections)
        rows.append(row)
        print(row, flush=True)
    head = (
        "| phantom family | affine median / p95 (um) | fine stage unchecked (v1) | **fine stage checked** | "
        "checked vs affine (median) | sections warped (v1 / checked) | tube travel: true / affine / v1 / checked (um) "
        "| tube track kept: affine / v1 / checked |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:

        def pair(key, r=r):
            return f"{r[key][0]:.1f} / {r[key][1]:.1f}"

        lines.append(
            f"| {r['family']} | {pair('affine')} | {pair('unchecked')} | **{pair('checked')}** | "
            f"{100 * (r['checked'][0] / r['affine'][0] - 1):+.0f}% | {r['unchecked_warped']} / {r['checked_warped']} "
            f"of {n_sections} | {r['travel']:.0f} / {r['travel_affine']:.0f} / {r['travel_unchecked']:.0f} / "
            f"{r['travel_checked']:.0f} | {r['track_affine']:.2f} / {r['track_unchecked']:.2f} / "
            f"{r['track_checked']:.2f} |"
        )
    damaged = [r for r in rows if np.isfinite(r["damaged_affine"])]
    text = (
        f"### Phantom families with truth ({n_sections} sections, {n_cells:,} cells; default perturbations)\n\n"
        + head
        + "\n".join(lines)
        + "\n"
    )
    for r in damaged:
        text += (
            f"\nDamaged sections alone ({r['family']}): median {r['damaged_affine']:.1f} um affine, "
            f"{r['damaged_unchecked']:.1f} unchecked, {r['damaged_checked']:.1f} checked.\n"
        )
    text += (
        "\nFine-stage time (refine + warp, s): "
        + "; ".join(f"{r['family'].split(' (')[0]} {r['unchecked_s']:.1f} / {r['checked_s']:.1f}" for r in rows)
        + " (unchecked / checked).\n"
    )
    return text, rows


def _hidden_scores(atlas, P: np.ndarray, labels: np.ndarray, hidden: list) -> tuple[list, list]:
    """Per adjacent pair, scored on the cells of the hidden labels only: the share whose nearest cell of the
    next section (any label) has the same label, and the correlation of the two sections' hidden-label
    density images (one channel per hidden label; pixel 1.5x the typical cell spacing, blur 1.5 px)."""
    from scipy.spatial import cKDTree

    from lamina.kernels.raster import smooth, splat

    sec = atlas.sections
    parts = [slice(int(sec.cell_start[k]), int(sec.cell_stop[k])) for k in range(len(sec))]
    code = {h: i for i, h in enumerate(hidden)}
    ch = np.array([code.get(v, -1) for v in labels])
    d, _ = cKDTree(P[parts[0]]).query(P[parts[0]], k=2)
    pixel = 1.5 * float(np.median(d[:, 1]))
    lo, hi = P.min(0) - 5 * pixel, P.max(0) + 5 * pixel
    shape = (int((hi[1] - lo[1]) / pixel) + 1, int((hi[0] - lo[0]) / pixel) + 1)
    agree, ncc = [], []
    for a, b in zip(parts[:-1], parts[1:]):
        ha = ch[a] >= 0
        # among all cells: a hidden-label cell matched across its band's edge counts as a miss
        _, j = cKDTree(P[b]).query(P[a][ha])
        agree.append(float((ch[a][ha] == ch[b][j]).mean()))
        imgs = [
            smooth(splat(P[s][:, 0], P[s][:, 1], ch[s], len(hidden), lo, pixel, shape), 1.5).ravel() for s in (a, b)
        ]
        ncc.append(float(np.corrcoef(imgs[0], imgs[1])[0, 1]))
    return agree, ncc


def _holdout(work: Path, client, table, label: str, name: str, **ingest) -> dict:
    """Every second label (sorted) hidden from the rasters (its cells count in the density only); affine,
    fine stage unchecked (v1) and checked, scored on the hidden labels."""
    import lamina

    labels = sorted(table[label].dropna().astype(str).unique())
    hidden = labels[1::2]
    table = table.assign(fit_type=table[label].where(~table[label].astype(str).isin(hidden)))
    src = work / f"{name}.parquet"
    table.to_parquet(src, index=False)
    atlas = lamina.ingest(src, work / f"{name}.lamina.zarr", cell_type="fit_type", client=client, **ingest)
    rows = atlas.obs(columns=["input_row"]).input_row.to_numpy()
    truth = table[label].astype(str).to_numpy()[rows]
    out = {"hidden": hidden, "n_labels": len(labels)}
    for key, xy, warped, _ in _variants(atlas, client):
        out[key] = _hidden_scores(atlas, xy, truth, hidden)
        if warped is not None:
            out[f"{key}_warped"] = warped
    out["sections"] = atlas.n_sections
    return out


def holdout_rows(work: Path, client) -> str:
    """Channel hold-out on DLPFC (6 pairs, layers) and MERFISH (12 sections, cell classes)."""
    import json

    import pandas as pd

    results = []
    path = DATA / "dlpfc" / "dlpfc_12_sections_spots_layers.csv.gz"
    if path.exists():
        scale = json.loads((DATA / "dlpfc/raw/151507/scalefactors_json.json").read_text())
        table = pd.read_csv(path)
        for a, b in DLPFC_PAIRS:
            part = table[table.section.astype(str).isin([a, b])].reset_index(drop=True)
            part = part.assign(section=part.section.astype(str))
            res = _holdout(
                work, client, part, "layer", f"dlpfc_holdout_{a}", **_dlpfc_columns(scale), section_order=[a, b]
            )
            results.append((f"DLPFC {a} -> {b}", res))
    folder = DATA / "merfish_moffitt"
    if folder.exists():
        cells = pd.read_csv(folder / "merFISH_3D_data_cell_locations.txt", sep="\t")
        meta = pd.read_csv(folder / "merFISH_3D_metadata.txt", sep="\t")
        both = pd.concat([cells.reset_index(drop=True), meta.reset_index(drop=True)], axis=1)
        both = both.loc[:, ~both.columns.duplicated()]
        res = _holdout(work, client, both, "orig_cell_types", "merfish_holdout", section="layer_ID", z="z")
        results.append(("MERFISH, 12 sections (mean of 11 pairs)", res))
    if not results:
        return "### Channel hold-out: skipped (../shared/data/dlpfc and merfish_moffitt not present)\n"
    lines = [
        "| data (hidden labels) | agreement affine / v1 / checked | NCC affine / v1 / checked | warped v1 / checked |",
        "|---|---|---|---|",
    ]
    for name, r in results:
        ag = [np.mean(r[k][0]) for k in ("affine", "unchecked", "checked")]
        nc = [np.mean(r[k][1]) for k in ("affine", "unchecked", "checked")]
        lines.append(
            f"| {name} ({', '.join(r['hidden'][:4])}{' ...' if len(r['hidden']) > 4 else ''}) | "
            + " / ".join(f"{v:.3f}" for v in ag)
            + " | "
            + " / ".join(f"{v:.3f}" for v in nc)
            + f" | {r['unchecked_warped']} / {r['checked_warped']} of {r['sections']} |"
        )
    return (
        "### Channel hold-out: every second label (sorted) hidden from the fit, scored on the hidden labels only\n\n"
        "The hidden labels' cells stay in the rasters' density (spread over the visible channels) but their identity "
        "is never seen. Agreement: share of hidden-label cells whose nearest cell in the next section (any label) "
        "has the same label; NCC: correlation of the two sections' hidden-label density images.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def her2st_stack_rows(work: Path, client, n_genes: int = 300) -> str:
    """her2st patients A-D as stacks (every section of a patient at once, lamina's defaults, expression
    only): median distance of the spots to the authors' alignment (one similarity fit of the whole stack onto
    it), after the affine stage, the fine stage unchecked (v1) and checked."""
    import pandas as pd
    from _her2st import her2st_patients
    from _peers import similarity_residuals

    import lamina

    lines = []
    for patient, obs, counts, _, _ in her2st_patients(n_genes):
        genes = [f"g{i}" for i in range(counts.shape[1])]
        xy = obs[["array_x", "array_y"]].to_numpy(np.float64) * 200.0
        table = pd.concat(
            [
                pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "section": obs.section.astype(str).to_numpy()}),
                pd.DataFrame(counts.astype(np.float32), columns=genes),
            ],
            axis=1,
        )
        src = work / f"her2st_{patient}.parquet"
        table.to_parquet(src, index=False)
        names = sorted(table.section.unique())
        atlas = lamina.ingest(
            src,
            work / f"her2st_{patient}.lamina.zarr",
            section="section",
            section_order=names,
            genes=genes,
            normalize="log1p",
            client=client,
        )
        rows = atlas.obs(columns=["input_row"]).input_row.to_numpy()
        ref = obs[["warped_x", "warped_y"]].to_numpy(np.float64)[rows]
        ok = np.isfinite(ref).all(1)
        dist, warped = {}, {}
        for key, xy, n_warped, _ in _variants(atlas, client):
            warped[key] = n_warped
            dist[key] = float(np.median(similarity_residuals(ref[ok], xy[ok])))
        lines.append(
            f"| {patient} ({len(names)} sections) | {dist['affine']:.1f} | {dist['unchecked']:.1f} | "
            f"**{dist['checked']:.1f}** | {100 * (dist['checked'] / dist['affine'] - 1):+.0f}% | "
            f"{warped['unchecked']} / {warped['checked']} |"
        )
        print(lines[-1], flush=True)
    if not lines:
        return "### her2st stacks: skipped (../shared/data/her2st not present)\n"
    return (
        "### her2st stacks: median distance of the spots to the authors' alignment (um)\n\n"
        "Every section of a patient registered at once with lamina's defaults from expression only (300 most "
        "variable genes, PC channels); the authors' warped_x/y are never seen. One similarity transform of the "
        "whole stack onto the reference is fitted before measuring.\n\n"
        "| patient | affine | fine stage unchecked (v1) | **fine stage checked** | checked vs affine | warped v1 / "
        "checked |\n|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )


# ---------------------------------------------------------------------------------------------- against the peers
PEERS = ("lamina", "PASTE", "STalign")


def _onehot(labels: np.ndarray) -> np.ndarray:
    classes, codes = np.unique(labels.astype(str), return_inverse=True)
    return np.eye(len(classes), dtype=np.float32)[codes]


def phantom_pairs(n_cells: int, n_sections: int, starts, n_genes: int = 20) -> list:
    """Pairs (k, k+1) of the phantom with default perturbations; tools get expression and cell types."""
    import pandas as pd
    from _peers import Pair

    import lamina

    ph = lamina.datasets.phantom(n_cells=n_cells, n_sections=n_sections, n_genes=n_genes, seed=0)
    out = []
    for k in starts:
        parts = []
        for s in (k, k + 1):
            frames = list(ph.section_chunks(s))
            table = pd.concat([f for f, _ in frames], ignore_index=True)
            truth = np.concatenate([t for _, t in frames])[:, :2]
            parts.append(
                (
                    table[["x", "y"]].to_numpy(np.float64),
                    table[ph.gene_names].to_numpy(np.float32),
                    table.cell_type.astype(str).to_numpy(),
                    truth,
                )
            )
        (xa, fa, la, _), (xb, fb, lb, tb) = parts
        out.append(
            Pair(
                "phantom",
                f"{ph.section_ids[k]}->{ph.section_ids[k + 1]}",
                xa,
                xb,
                f"expression ({n_genes} genes) + cell types",
                fa,
                fb,
                given_labels_a=la,
                given_labels_b=lb,
                labels_a=la,
                labels_b=lb,
                truth_a=xa,
                truth_b=ph.to_observed(k, tb),
            )
        )
    return out


def dlpfc_pairs() -> list:
    """The six 10-um pairs; spots without a layer are left out; tools get the layer labels (no expression)."""
    import json

    import pandas as pd
    from _peers import Pair

    path = DATA / "dlpfc" / "dlpfc_12_sections_spots_layers.csv.gz"
    if not path.exists():
        print(f"skip DLPFC: {path} not present")
        return []
    um = 65.0 / json.loads((DATA / "dlpfc/raw/151507/scalefactors_json.json").read_text())["spot_diameter_fullres"]
    table = pd.read_csv(path).dropna(subset=["layer"])
    table["section"] = table.section.astype(str)
    out = []
    for a, b in DLPFC_PAIRS:
        A, B = (table[table.section == s] for s in (a, b))
        xa, xb = (t[["pxl_col_fullres", "pxl_row_fullres"]].to_numpy(np.float64) * um for t in (A, B))
        la, lb = A.layer.astype(str).to_numpy(), B.layer.astype(str).to_numpy()
        fa, fb = np.split(_onehot(np.concatenate([la, lb])), [len(la)])
        out.append(
            Pair(
                "DLPFC",
                f"{a}->{b}",
                xa,
                xb,
                "layer labels (one-hot; no expression in this data)",
                fa,
                fb,
                given_labels_a=la,
                given_labels_b=lb,
                labels_a=la,
                labels_b=lb,
            )
        )
    return out


def her2st_pairs(n_genes: int = 300) -> list:
    """Consecutive sections of patients A-D (spot pitch 200 um); tools get counts of the patient's most variable
    genes; expression clusters and the authors' warped_x/y are for evaluation only."""
    from _her2st import her2st_patients
    from _peers import Pair

    out = []
    for _, obs, counts, _, _ in her2st_patients(n_genes):
        section = obs.section.astype(str).to_numpy()
        xy = obs[["array_x", "array_y"]].to_numpy(np.float64) * 200.0
        ref = obs[["warped_x", "warped_y"]].to_numpy(np.float64)
        lab = obs.cluster.astype("Int64").astype(str).to_numpy()
        names = sorted(set(section))
        for s, t in zip(names[:-1], names[1:]):
            ma, mb = section == s, section == t
            out.append(
                Pair(
                    "her2st",
                    f"{s}->{t}",
                    xy[ma],
                    xy[mb],
                    f"counts of {n_genes} most variable genes",
                    counts[ma],
                    counts[mb],
                    counts=True,
                    labels_a=lab[ma],
                    labels_b=lab[mb],
                    ref_a=ref[ma],
                    ref_b=ref[mb],
                )
            )
    return out


def merfish_pairs() -> list:
    """Consecutive sections (50 um apart); tools get the cell classes (no expression in this data)."""
    import pandas as pd
    from _peers import Pair

    folder = DATA / "merfish_moffitt"
    if not folder.exists():
        print(f"skip MERFISH: {folder} not present")
        return []
    loc = pd.read_csv(folder / "merFISH_3D_data_cell_locations.txt", sep="\t")
    meta = pd.read_csv(folder / "merFISH_3D_metadata.txt", sep="\t")
    cls = meta.orig_cell_types.astype(str).to_numpy()
    coarse_cls = np.array([c.rstrip(" 0123456789") for c in cls])
    z = sorted(loc.z.unique())
    out = []
    for s, t in zip(z[:-1], z[1:]):
        ma, mb = (loc.z == s).to_numpy(), (loc.z == t).to_numpy()
        xy = loc[["x", "y"]].to_numpy(np.float64)
        fa, fb = np.split(_onehot(np.concatenate([cls[ma], cls[mb]])), [int(ma.sum())])
        out.append(
            Pair(
                "MERFISH",
                f"{s}->{t}",
                xy[ma],
                xy[mb],
                "cell classes (one-hot; 16 classes)",
                fa,
                fb,
                given_labels_a=cls[ma],
                given_labels_b=cls[mb],
                labels_a=cls[ma],
                labels_b=cls[mb],
                extra={"coarse_a": coarse_cls[ma], "coarse_b": coarse_cls[mb]},
            )
        )
    return out


METRICS = {  # dataset -> (score key, column title, lower is better)
    "phantom": [("median_um", "median error of B's cells (um)", True), ("p95_um", "p95 error of B's cells (um)", True)],
    "DLPFC": [("agreement", "NN layer agreement", False)],
    "her2st": [("agreement", "NN cluster agreement", False), ("ref_um", "distance to authors' alignment (um)", True)],
    "MERFISH": [("agreement", "NN class agreement", False), ("agreement_coarse", "NN coarse-class agreement", False)],
}


def run_peers(pairs: list, work: Path, client, tools=PEERS, paste_cells: int = 1500, stalign_iter: int = 1000) -> list:
    """Every tool on every pair, scored by ``_peers.score``; a tool that raises gets a row saying why."""
    import _peers

    why_not = {"PASTE": _peers.paste_available(), "STalign": _peers.stalign_available(), "lamina": None}
    runners = {
        "lamina": lambda p: _peers.run_lamina(p, work, client),
        "PASTE": lambda p: _peers.run_paste(p, max_cells=paste_cells),
        "STalign": lambda p: _peers.run_stalign(p, niter=stalign_iter),
    }
    for tool in tools:
        if why_not[tool]:
            print(f"skip {tool}: {why_not[tool]}", flush=True)
    rows = []
    for pair in pairs:
        base = {"dataset": pair.dataset, "pair": pair.name, "cells": (len(pair.xy_a), len(pair.xy_b))}
        for name, (a, b) in _peers.baselines(pair).items():
            rows.append({**base, "method": name, **_peers.score(pair, a, b)})
        for tool in tools:
            if why_not[tool]:
                continue
            try:
                (a, b, info), seconds, peak = _peers.measured(runners[tool], pair)
            except Exception as e:  # reported in the table, never dropped
                rows.append({**base, "method": tool, "failed": f"{type(e).__name__}: {str(e)[:80]}"})
                print(f"{pair.dataset} {pair.name} {tool} FAILED: {e}", flush=True)
                continue
            rows.append(
                {
                    **base,
                    "method": tool,
                    "seconds": seconds,
                    "peak_mib": peak / 2**20,
                    **info,
                    **_peers.score(pair, a, b),
                }
            )
            print({k: v for k, v in rows[-1].items() if k not in ("objective",)}, flush=True)
    return rows


def peer_tables(rows: list) -> str:
    """Per dataset: one table of per-pair scores and a mean row; then times, memory and the targets."""
    import pandas as pd

    df = pd.DataFrame(rows)
    methods = [m for m in ("unaligned", "centroid", *PEERS) if m in set(df.method)]
    tools = [m for m in PEERS if m in set(df.method)]
    out = []
    for dataset, metrics in METRICS.items():
        d = df[df.dataset == dataset]
        if d.empty:
            continue
        for key, title, lower in metrics:
            if key not in d or d[key].isna().all():
                continue
            wide = d.pivot_table(index="pair", columns="method", values=key, aggfunc="first", sort=False)
            head = f"| pair ({title}) | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods) + "\n"
            body = "".join(
                f"| {pair} | " + " | ".join(_cell(wide, pair, m) for m in methods) + " |\n" for pair in wide.index
            )
            means = {m: wide[m].mean() for m in methods if m in wide}
            best = (min if lower else max)(means.values())
            mean = (
                "| **mean** | "
                + " | ".join(
                    (f"**{means[m]:.3f}**" if means[m] == best else f"{means[m]:.3f}") if m in means else "-"
                    for m in methods
                )
                + " |\n"
            )
            out.append(f"#### {dataset}: {title} ({'lower' if lower else 'higher'} is better)\n\n{head}{body}{mean}")
        if "paste_score" in d and d.paste_score.notna().any():
            out.append(
                f"PASTE's own score (share of transported mass between same-label cells), mean over pairs: "
                f"{d.paste_score.mean():.3f}.\n"
            )
        cost = d[d.method.isin(tools)].groupby("method").agg(seconds=("seconds", "median"), peak=("peak_mib", "max"))
        out.append(
            "Per pair: "
            + "; ".join(
                f"{m} median {cost.seconds[m]:.2f} s, peak +{cost.peak[m]:.0f} MiB" for m in tools if m in cost.index
            )
            + ".\n"
        )
        order = ["ingest", "section_stats", "pca", "rasterize", "register", "refine", "warp"]  # as they run
        steps = sorted(
            (c for c in d.columns if c.startswith("step_")),
            key=lambda c: order.index(c[5:]) if c[5:] in order else len(order),
        )
        mine = d[d.method == "lamina"][steps].dropna(axis=1, how="all")
        if not mine.empty:
            out.append(
                "lamina's steps, median s per pair: "
                + ", ".join(f"{c[5:]} {mine[c].median():.2f}" for c in mine.columns)
                + ".\n"
            )
        for _, r in (d[d.failed.notna()] if "failed" in d else d.iloc[:0]).iterrows():
            out.append(f"{r.method} failed on {r.pair}: {r.failed}\n")
    return "\n".join(out)


def _cell(wide, pair, method) -> str:
    import pandas as pd

    if method not in wide or pd.isna(wide.at[pair, method]):
        return "failed" if method in PEERS else "-"
    return f"{wide.at[pair, method]:.3f}"


def peer_targets(rows: list) -> str:
    """The issue's targets, checked against the measured rows."""
    import pandas as pd

    df = pd.DataFrame(rows)
    lines = []

    def mean(dataset, method, key):
        v = df[(df.dataset == dataset) & (df.method == method)]
        return float(v[key].mean()) if key in v and v[key].notna().any() else float("nan")

    peers = [m for m in ("PASTE", "STalign") if m in set(df.method)]
    if (df.dataset == "phantom").any() and peers:
        lam = mean("phantom", "lamina", "median_um")
        best = min(mean("phantom", m, "median_um") for m in peers)
        lines.append(
            f"- phantom: lamina median error {lam:.1f} um vs best peer {best:.1f} um: "
            f"{best / lam:.1f}x lower (target >= 2x): **{'met' if best >= 2 * lam else 'not met'}**"
        )
    for dataset in ("DLPFC", "her2st"):
        if (df.dataset == dataset).any() and peers:
            lam = mean(dataset, "lamina", "agreement")
            others = {m: mean(dataset, m, "agreement") for m in peers}
            ok = all(lam > v for v in others.values())
            lines.append(
                f"- {dataset}: mean agreement lamina {lam:.3f} vs "
                + ", ".join(f"{m} {v:.3f}" for m, v in others.items())
                + f" (target: higher than both): **{'met' if ok else 'not met'}**"
            )
    if "STalign" in peers:
        t = df[df.method.isin(["lamina", "STalign"])].groupby("method").seconds.median()
        lines.append(
            f"- speed: median per pair lamina {t['lamina']:.2f} s, STalign {t['STalign']:.2f} s: "
            f"{t['STalign'] / t['lamina']:.1f}x (target >= 10x at equal or better accuracy): "
            f"**{'met' if t['STalign'] >= 10 * t['lamina'] else 'not met'}**"
        )
    return "\n".join(lines) + "\n"


def peer_section(
    work: Path, client, datasets, n_cells: int, n_sections: int, paste_cells: int, stalign_iter: int
) -> str:
    loaders = {
        "phantom": lambda: phantom_pairs(n_cells, n_sections, range(0, n_sections - 1, 4)),
        "DLPFC": dlpfc_pairs,
        "her2st": her2st_pairs,
        "MERFISH": merfish_pairs,
    }
    pairs = [p for d in datasets for p in loaders[d]()]
    rows = run_peers(pairs, work, client, paste_cells=paste_cells, stalign_iter=stalign_iter)
    given = "; ".join(sorted({f"{p.dataset}: {p.features}" for p in pairs}))
    return (
        "Each pair is aligned by every tool on its own (section B onto A). What the tools were given besides "
        f"positions: {given}. Settings: PASTE on at most {paste_cells} cells per section, STalign "
        f"{stalign_iter} iterations; the rest as stated in `benchmarks/_peers.py`. Time: wall seconds per pair, "
        "lamina's including ingest of the pair into a store; peak: the largest rise of the RSS of this process "
        "and its Dask workers during a pair.\n\n" + peer_tables(rows) + "\n**Targets**\n\n" + peer_targets(rows)
    )


def main(argv=None) -> int:
    import lamina

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--sections", type=int, default=20)
    p.add_argument(
        "--stack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the stack benchmarks (phantom stack, MERFISH stack, DLPFC pairs with lamina only)",
    )
    p.add_argument(
        "--peers",
        nargs="*",
        default=list(METRICS),
        choices=list(METRICS),
        help="data sets for the comparison with PASTE and STalign (none: skip it)",
    )
    p.add_argument(
        "--validation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the independent validation: phantom families with truth, labels held out of the fit",
    )
    p.add_argument("--paste-cells", type=int, default=1500)
    p.add_argument("--stalign-iter", type=int, default=1000)
    p.add_argument("--write", action="store_true")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lamina-regbench-"))
    client = lamina.connect()
    sections = {}  # RESULTS.md block -> text
    try:
        if args.smoke:
            sections["registration"] = phantom_rows(work, client, 8_000, 4)[0]
            sections["registration_validation"] = family_rows(
                work, client, 4_000, 4, {k: v for k, v in FAMILIES.items() if k.startswith("no non-linear warp")}
            )[0]
            sections["registration_peers"] = peer_section(
                work, client, ["phantom"], 4_000, 2, paste_cells=300, stalign_iter=20
            )
        else:
            if args.stack:
                sections["registration"] = "\n".join(
                    [
                        phantom_rows(work, client, args.cells, args.sections)[0],
                        merfish_rows(work, client),
                        dlpfc_rows(work, client),
                    ]
                )
            if args.validation:
                sections["registration_validation"] = "\n".join(
                    [
                        family_rows(work, client, args.cells, args.sections)[0],
                        holdout_rows(work, client),
                        her2st_stack_rows(work, client),
                    ]
                )
            if args.peers:
                sections["registration_peers"] = peer_section(
                    work, client, args.peers, args.cells, args.sections, args.paste_cells, args.stalign_iter
                )
    finally:
        client.close()
        shutil.rmtree(work, ignore_errors=True)
    titles = {
        "registration": "Registration (benchmarks/registration.py)",
        "registration_peers": "Registration against the peers (benchmarks/registration.py)",
        "registration_validation": "Registration, validated by what it never fits (benchmarks/registration.py)",
    }
    for block, text in sections.items():
        header = (
            f"## {titles[block]}\n\n{dt.date.today()} · {os.cpu_count()} cores, no GPU · lamina "
            f"{lamina.__version__}, Python {platform.python_version()}{_versions()} · command: "
            f"`python benchmarks/registration.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        )
        print(header + text)
        if args.write and not args.smoke:
            write_results(header + text, section=block)
    return 0


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("torch", "paste-bio", "pot", "stalign-modern"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return "".join(f", {v}" for v in found)


if __name__ == "__main__":
    sys.exit(main())
