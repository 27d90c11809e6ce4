"""Interpolation benchmark: leave one section out, predict it from its neighbours, compare with the truth.

    python benchmarks/interpolation.py             # phantom + her2st patients A-D
    python benchmarks/interpolation.py --write     # also update benchmarks/RESULTS.md
    python benchmarks/interpolation.py --smoke     # tiny phantom, one held-out section (seconds; used by tests)

For a held-out interior section k: the flow is trained on every other section (``sections=`` of
``lamina.train_flow``), the gap (k-1, k+1) is filled with layers every ``(z[k+1] - z[k-1]) / 4``, and the
layer at z_k is compared with section k. Scores, per method, on a grid of ``bin_um`` bins over section k's
aligned extent:

Every method is scored on the same bins (those where all methods and the truth have cells).

* ``r``: Pearson correlation across bins of the per-bin mean expression, per gene, then the mean over genes;
* ``comp``: cell-type composition agreement, the mean over bins of 1 - total-variation distance between the
  type fractions (predicted cells get types from a 15-NN classifier on PCs fitted on sections k-1 and k+1);
* phantom only: ``r_true`` and ``rmse_true`` against the noise-free field at section k's true positions.

Methods: ``copy`` (the nearer neighbour section, k-1 when equidistant), ``blend`` (the mean of the two
neighbours' bin maps, weighted by distance), ``lamina`` (the bin maps of the forward-flowed and the
backward-flowed cells at z_k, combined with the same weights as the blend: so with zero drift lamina *is*
the blend, and any difference is what the learned flows add). All three are scored from the same PCA
representation (PCs -> genes with the atlas's own inversion), so the comparison is about the interpolation,
not about PCA denoising. The held-out section takes part in registration and PCA (never in the flow).
"""

from __future__ import annotations

import argparse
import datetime as dt
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


def bin_maps(
    xy: np.ndarray, values: np.ndarray, origin, bin_um: float, shape, weights=None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin (weighted) mean of ``values [n, G]`` -> ``[G, nbins]`` (NaN where empty) and weights ``[nbins]``."""
    ij = np.floor((xy - np.asarray(origin)) / bin_um).astype(np.int64)
    ok = (ij >= 0).all(1) & (ij[:, 0] < shape[1]) & (ij[:, 1] < shape[0])
    flat = ij[ok, 1] * shape[1] + ij[ok, 0]
    nb = shape[0] * shape[1]
    w = np.ones(len(xy)) if weights is None else np.asarray(weights, np.float64)
    counts = np.bincount(flat, weights=w[ok], minlength=nb)
    sums = np.stack([np.bincount(flat, weights=w[ok] * values[ok, g], minlength=nb) for g in range(values.shape[1])])
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts, counts


def pearson_genes(A: np.ndarray, B: np.ndarray, ok: np.ndarray) -> float:
    """Mean over genes of the Pearson r across the bins ``ok`` of ``A``, ``B`` ``[G, nbins]``."""
    a, b = A[:, ok] - A[:, ok].mean(1, keepdims=True), B[:, ok] - B[:, ok].mean(1, keepdims=True)
    den = np.sqrt((a**2).sum(1) * (b**2).sum(1))
    r = np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), np.nan)
    return float(np.nanmean(r))


def composition_agreement(F: np.ndarray, T: np.ndarray, ok: np.ndarray) -> float:
    """Mean over the bins ``ok`` of ``1 - 0.5 * sum_t |F_t - T_t|`` for fraction maps ``[types, nbins]``."""
    return float((1 - 0.5 * np.abs(F[:, ok] - T[:, ok]).sum(0)).mean())


def _rows(atlas, s):
    sec = atlas.sections
    return int(sec.cell_start[s]), int(sec.cell_stop[s])


def _flowed(atlas, k: int, gap: float, options: dict, client) -> dict:
    """Train the flow without section ``k``, fill the gap, and return the layer at z_k with time, peak RSS and
    what train_flow recorded."""
    import os

    from _measure import PeakRSS

    import lamina

    root = atlas.root
    z = atlas.sections.z.to_numpy(np.float64)
    use = [s for s in range(len(z)) if s != k]
    t0 = time.perf_counter()
    with PeakRSS(os.getpid()) as rss:
        lamina.train_flow(atlas, client=client, sections=use, **{"dz_um": gap / 4, **options})
        lamina.interpolate(atlas, client=client, dz_um=gap / 4)
    g = root["interpolated"]
    layer = np.flatnonzero(np.isclose(np.asarray(g["z"][...]), z[k], atol=1e-3))
    return {
        "xy": np.stack([g["x"].oindex[layer], g["y"].oindex[layer]], 1).astype(np.float64),
        "pcs": np.asarray(g["pcs"].oindex[layer, :]),
        "dir": np.asarray(g["direction"].oindex[layer]),
        "seconds": time.perf_counter() - t0,
        "rss_gib": rss.peak / 2**30,
        "record": atlas.stage_records()["train_flow"],
    }


def tube_geometry(cells_xy: np.ndarray, weights: np.ndarray, center, radius: float, true_xy: np.ndarray) -> dict:
    """Where a prediction puts the tube, against the true disc (um).

    ``cells_xy [n, 2]``: cells the method calls tube (weights: their share of the prediction); ``true_xy``: the
    held-out section's true tube cells. ``centroid_um``: weighted centroid to the true centre; ``boundary_um``:
    the symmetric mean distance (predicted tube cells to the true disc, true tube cells to the nearest predicted
    one), 0 for a perfect prediction; ``ghost``: the weighted share of predicted tube cells more than 20 um
    outside the true disc (mass where the truth has none).
    """
    from scipy.spatial import cKDTree

    if len(cells_xy) == 0 or weights.sum() <= 0:
        return {"centroid_um": float("nan"), "boundary_um": float("nan"), "ghost": float("nan")}
    w = weights / weights.sum()
    outside = np.maximum(np.hypot(*(cells_xy - np.asarray(center)).T) - radius, 0.0)
    cover = cKDTree(cells_xy).query(true_xy)[0] if len(true_xy) else np.zeros(1)
    return {
        "centroid_um": float(np.hypot(*((w[:, None] * cells_xy).sum(0) - np.asarray(center)))),
        "boundary_um": float(0.5 * ((w * outside).sum() + cover.mean())),
        "ghost": float((w * (outside > 20.0)).sum()),
    }


#: the flows each fold compares: the untrained one (zero drift, the blend with the flow's noise) and the trained one
FLOWS = ("untrained", "lamina")


def loo(atlas, k: int, bin_um: float, flow_options: dict, client=None, truth=None, tube=None) -> dict:
    """Scores of copy / blend / untrained flow / lamina for held-out section ``k`` (see the module docstring).

    ``tube``: ``(center, radius, type code)`` of the phantom's tube at z_k, for the geometric scores."""
    from sklearn.neighbors import KNeighborsClassifier

    from lamina.kernels.pca import invert
    from lamina.stages.pca import read_pca

    root = atlas.root
    z = atlas.sections.z.to_numpy(np.float64)
    gap = z[k + 1] - z[k - 1]
    runs = {
        name: _flowed(atlas, k, gap, {**flow_options, "steps": 0} if name == "untrained" else flow_options, client)
        for name in FLOWS
    }
    p = read_pca(root)
    xy = lambda grp, a, b: np.stack([root[f"{grp}/x"][a:b], root[f"{grp}/y"][a:b]], 1).astype(np.float64)  # noqa: E731
    a, b = _rows(atlas, k)
    true_xy = xy("aligned", a, b)
    true_X = np.asarray(root["X"][a:b], np.float64)
    types = np.asarray(root["cells/cell_type"][...]) if "cell_type" in root["cells"] else None
    lo_mn = true_xy.min(0) - 1e-6
    shape = tuple((np.floor((true_xy.max(0) - lo_mn) / bin_um).astype(int) + 1)[::-1])
    neighbours = {}
    for s in (k - 1, k + 1):
        c, d = _rows(atlas, s)
        neighbours[s] = (
            xy("aligned", c, d),
            np.asarray(root["pca/pcs"][c:d]),
            types[c:d] if types is not None else None,
        )
    inv = lambda pcs: invert(pcs, p["mean"], p["scale"], p["components"]).astype(np.float64)  # noqa: E731
    maps = {s: bin_maps(v[0], inv(v[1]), lo_mn, bin_um, shape)[0] for s, v in neighbours.items()}
    w = (z[k + 1] - z[k]) / gap
    near = k - 1 if z[k] - z[k - 1] <= z[k + 1] - z[k] else k + 1

    def flowed_map(run, values):
        return sum(
            wd * bin_maps(run["xy"][run["dir"] == d], values[run["dir"] == d], lo_mn, bin_um, shape)[0]
            for d, wd in ((0, w), (1, 1 - w))
        )

    pred = {"copy": maps[near], "blend": w * maps[k - 1] + (1 - w) * maps[k + 1]}
    pred.update({name: flowed_map(run, inv(run["pcs"])) for name, run in runs.items()})
    obs_map = bin_maps(true_xy, true_X, lo_mn, bin_um, shape)[0]
    # every method is scored on the same bins: those where all of them and the truth have cells
    ok = np.isfinite(obs_map).all(0)
    for m in pred.values():
        ok &= np.isfinite(m).all(0)
    out = {
        "section": str(atlas.sections.id.iloc[k]),
        "cells_pred": len(runs["lamina"]["xy"]),
        "cells_true": b - a,
        "bins": int(ok.sum()),
    }
    for name, run in runs.items():
        out[f"seconds_{name}"] = run["seconds"]
        out[f"rss_gib_{name}"] = run["rss_gib"]
    rec = runs["lamina"]["record"]
    out["steps_run"] = rec.get("steps_run")
    out["kept"] = "trained" if rec.get("trained") else "untrained"
    out["heldout_gain"] = rec.get("heldout_gain", float("nan"))
    out["heldout_untrained"] = rec.get("heldout_untrained", float("nan"))
    for name, m in pred.items():
        out[f"r_{name}"] = pearson_genes(m, obs_map, ok)
    if types is not None:
        n_types = int(types.max()) + 1
        onehot = lambda lab: np.eye(n_types)[lab]  # noqa: E731
        clf = KNeighborsClassifier(15).fit(
            np.concatenate([neighbours[s][1] for s in neighbours]),
            np.concatenate([neighbours[s][2] for s in neighbours]),
        )
        frac = {s: bin_maps(v[0], onehot(clf.predict(v[1])), lo_mn, bin_um, shape)[0] for s, v in neighbours.items()}
        labels = {name: clf.predict(run["pcs"]) for name, run in runs.items()}
        comp = {"copy": frac[near], "blend": w * frac[k - 1] + (1 - w) * frac[k + 1]}
        comp.update({name: flowed_map(run, onehot(labels[name])) for name, run in runs.items()})
        true_comp = bin_maps(true_xy, onehot(types[a:b]), lo_mn, bin_um, shape)[0]
        for name, m in comp.items():
            out[f"comp_{name}"] = composition_agreement(m, true_comp, ok)
        if tube is not None:
            center, radius, code = tube
            own = {s: clf.predict(neighbours[s][1]) == code for s in neighbours}
            cells = {
                "copy": (neighbours[near][0][own[near]], np.ones(int(own[near].sum()))),
                "blend": (
                    np.concatenate([neighbours[s][0][own[s]] for s in (k - 1, k + 1)]),
                    np.concatenate([np.full(int(own[s].sum()), ws) for s, ws in ((k - 1, w), (k + 1, 1 - w))]),
                ),
            }
            for name, run in runs.items():
                sel = labels[name] == code
                cells[name] = (run["xy"][sel], np.where(run["dir"][sel] == 0, w, 1 - w))
            true_tube = true_xy[np.hypot(*(true_xy - np.asarray(center)).T) < radius]
            for name, (cxy, cw) in cells.items():
                for key, v in tube_geometry(cxy, cw, center, radius, true_tube).items():
                    out[f"{key}_{name}"] = v
    if truth is not None:
        field_map = bin_maps(true_xy, truth(k, a, b), lo_mn, bin_um, shape)[0]
        for name, m in pred.items():
            out[f"r_true_{name}"] = pearson_genes(m, field_map, ok)
            out[f"rmse_true_{name}"] = float(np.sqrt(np.mean((m[:, ok] - field_map[:, ok]) ** 2)))
    return out


#: the phantom that needs a flow (issue 21): no section transforms (so the scores are about interpolation, not
#: registration: cells are marked aligned), sections 100 um apart, a tube that travels 600 um over the depth
#: (~100 um per gap, ~200 um across a held-out section's gap) while its radius grows by 60%, and layer
#: boundaries whose wave moves 1/10 of a wavelength per gap
MOVING = {
    "section_spacing": 100.0,
    "tube_travel_um": 600.0,
    "tube_growth": 0.6,
    "layer_drift_um": 80.0,
    "layer_drift_period_um": 1000.0,
    "max_rotation_deg": 0.0,
    "max_translation_um": 0.0,
    "scale_range": 0.0,
    "warp_um": 0.0,
}


def phantom_rows(
    work: Path,
    client,
    n_cells: int,
    n_sections: int,
    n_genes: int,
    holdouts: list[int],
    flow_options: dict,
    bin_um: float,
    moving: bool = False,
) -> list[dict]:
    import lamina

    spec = MOVING if moving else {}
    ph = lamina.datasets.phantom(n_cells=n_cells, n_sections=n_sections, n_genes=n_genes, seed=5, **spec)
    atlas = lamina.ingest(ph, work / "phantom.lamina.zarr", overwrite=True, client=client)
    if moving:
        lamina.mark_aligned(atlas, client=client)
    else:
        lamina.align(atlas, client=client)
    lamina.pca(atlas, n_pcs=min(20, n_genes), client=client)
    true_xyz = {}

    def truth(s, a, b):
        if s not in true_xyz:
            true_xyz[s] = np.concatenate([xyz for _, xyz in ph.section_chunks(s)])
        return ph.field(true_xyz[s])

    rows = []
    code = ph.type_names.index("tube")
    for k in holdouts:
        zk = float(ph.z[k])
        tube = (np.array(ph.tube_center(zk)), float(ph.tube_radius(zk)), code) if moving else None
        r = loo(atlas, k, bin_um, flow_options, client, truth, tube)
        rows.append({"dataset": "moving" if moving else "phantom", **r})
        print(r, flush=True)
    return rows


def her2st_rows(work: Path, client, flow_options: dict, n_genes: int = 300, bin_um: float = 400.0) -> list[dict]:
    """Patients A-D (6 serial sections each, assumed equally spaced): log-normalised counts, the ``n_genes``
    most variable genes; expression clusters as types."""
    import anndata as ad
    from _her2st import her2st_patients

    import lamina

    rows = []
    for patient, obs, _, logn, var in her2st_patients(n_genes):
        a = ad.AnnData(X=logn.astype(np.float32), obs=obs[["array_x", "array_y", "section", "cluster"]].copy(), var=var)
        a.obs["cluster"] = a.obs["cluster"].astype("Int64").astype(str).astype("category")
        a.obs["section"] = a.obs["section"].astype(str)
        src = work / f"her2st_{patient}.h5ad"
        a.write_h5ad(src)
        atlas = lamina.ingest(
            src,
            work / f"her2st_{patient}.lamina.zarr",
            x="array_x",
            y="array_y",
            section="section",
            cell_type="cluster",
            genes="rest",
            units="px",
            pixel_size=200.0,
            overwrite=True,
            client=client,
        )
        lamina.align(atlas, client=client)
        lamina.pca(atlas, n_pcs=20, client=client)
        for k in range(1, atlas.n_sections - 1):
            r = loo(atlas, k, bin_um, flow_options, client)
            rows.append({"dataset": f"her2st {patient}", **r})
            print(r, flush=True)
    return rows


METHODS = ("copy", "blend") + FLOWS
METRICS = ("r", "comp", "r_true", "rmse_true", "centroid_um", "boundary_um", "ghost", "seconds", "rss_gib")


def table(rows: list[dict]) -> str:
    """One line per (fold, method); the flows also state what train_flow kept and its held-out gain."""
    cols = [m for m in METRICS if any(f"{m}_{x}" in r for r in rows for x in METHODS)]
    lines = [
        "| dataset | section | method | " + " | ".join(cols) + " | train_flow |",
        "|" + "---|" * (len(cols) + 4),
    ]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    for r in rows:
        for m in METHODS:
            note = ""
            if m == "lamina":
                note = (
                    f"{r['kept']} after {r['steps_run']} steps, held-out gain {r['heldout_gain']:.4f} of "
                    f"{r['heldout_untrained']:.4f}"
                )
            lines.append(
                f"| {r['dataset']} | {r['section']} | {m} | "
                + " | ".join(fmt(r.get(f"{c}_{m}")) for c in cols)
                + f" | {note} |"
            )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    out = []
    for ds in dict.fromkeys(r["dataset"].split()[0] for r in rows):
        sub = [r for r in rows if r["dataset"].split()[0] == ds]
        key = "r_true" if all("r_true_lamina" in r for r in sub) else "r"
        mean = lambda m, c=key, sub=sub: float(np.mean([r[f"{c}_{m}"] for r in sub]))  # noqa: E731
        diff = [r[f"{key}_lamina"] - r[f"{key}_blend"] for r in sub]
        below = sum(d < -1e-4 for d in diff)  # the untrained flow is the blend up to float32 rounding
        line = (
            f"- {ds} ({len(sub)} folds), mean {key}: "
            + ", ".join(f"{m} {mean(m):.3f}" for m in METHODS)
            + f"; lamina - untrained {mean('lamina') - mean('untrained'):+.4f}; lamina below the blend (by > 1e-4) on "
            f"{below}/{len(sub)} (lamina - blend from {min(diff):+.4f} to {max(diff):+.4f})"
            + f"; flow kept trained on {sum(r['kept'] == 'trained' for r in sub)}/{len(sub)}"
            + f"; seconds per fold (train + interpolate) untrained {mean('untrained', 'seconds'):.0f}, "
            f"lamina {mean('lamina', 'seconds'):.0f}"
        )
        if all("boundary_um_lamina" in r for r in sub):
            line += "; tube boundary error (um) " + ", ".join(f"{m} {mean(m, 'boundary_um'):.1f}" for m in METHODS)
        out.append(line)
    return "\n".join(out)


def _flow_options(pairs: list[str]) -> dict:
    """``["action_weight=0.1", ...]`` -> ``{"action_weight": 0.1}`` (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--flow takes KEY=VALUE pairs, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv=None) -> int:
    import lamina

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=60_000)
    p.add_argument("--sections", type=int, default=12)
    p.add_argument("--genes", type=int, default=40)
    p.add_argument("--holdouts", type=int, nargs="+", default=[3, 6, 9])
    p.add_argument("--moving-sections", type=int, default=10)
    p.add_argument("--moving-holdouts", type=int, nargs="+", default=[2, 5, 7])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--datasets", nargs="+", default=["moving", "phantom", "her2st"])
    p.add_argument(
        "--flow", nargs="+", default=[], metavar="KEY=VALUE", help="train_flow options, e.g. action_weight=0.1"
    )
    p.add_argument("--write", action="store_true")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    flow = {"steps": args.steps, "subsample": 512, **_flow_options(args.flow)}
    if args.smoke:
        args.cells, args.sections, args.genes, args.holdouts, args.datasets = 6000, 5, 12, [2], ["moving"]
        args.moving_sections, args.moving_holdouts = 5, [2]
        flow = {"steps": 6, "subsample": 256, "steps_per_task": 3}
    work = Path(tempfile.mkdtemp(prefix="lamina-interp-"))
    client = lamina.connect()
    t0 = time.perf_counter()
    try:
        rows = []
        if "moving" in args.datasets:
            rows += phantom_rows(
                work, client, args.cells, args.moving_sections, args.genes, args.moving_holdouts, flow, 100.0, True
            )
        if "phantom" in args.datasets:
            rows += phantom_rows(work, client, args.cells, args.sections, args.genes, args.holdouts, flow, 100.0)
        if "her2st" in args.datasets:
            rows += her2st_rows(work, client, flow)
    finally:
        client.close()
        shutil.rmtree(work, ignore_errors=True)
    text = (
        f"Leave-one-section-out interpolation, {dt.date.today()}, {platform.processor() or platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores, lamina {lamina.__version__}; "
        f"`python benchmarks/interpolation.py{' --smoke' if args.smoke else ''}` "
        f"(flow: {flow}); total {time.perf_counter() - t0:.0f} s\n\n" + table(rows) + "\n\n" + summary(rows)
    )
    print(text)
    if args.write:
        write_results(text, "interpolation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
