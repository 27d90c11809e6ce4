"""Histology-guided expression (stage ``enhance``) on her2st's six sections with H&E (B4, C2-C6).

    python benchmarks/enhance.py --write        # hidden spots (checkerboard, 5 random halves), super-resolution
    python benchmarks/enhance.py --smoke        # a synthetic section (seconds; used by the tests)

Genes, fixed before any fit: log1p(10^4 counts / total) over all 18,758 genes; among the genes detected in >= 10%
of the six sections' spots, the 250 of highest variance ("hvg") and the 50 of highest mean ("top50"). Metric:
per-gene Pearson r between prediction and measurement over a section's scored spots, averaged over the genes
(NaN for a gene constant there is skipped), then over the six sections.

Hidden spots: the model is fitted on the visible spots only (``fit_column``); scored on the hidden ones only.
Checkerboard: (array_x + array_y) odd hidden; random: half of the spots, 5 seeds. Side by side in one run:
inverse-distance interpolation of the visible spots (k = 4, the issue's baseline), Gaussian smoothing of the
visible spots (sigma = the spot pitch), lamina enhance with defaults, and three ablations of it: the image alone
(``neighbour_pitches=[]``, ``residual_sigma_um=0``), the spots alone (``alpha=1e9``: the image features leave the
head, so what is left is the low-rank smoothing of the spots: its neighbour block and residual field), and
version 2 (``neighbour_pitches=[]``: the image head and the spread residuals, without the neighbour block).

Super-resolution: 2 x 2 blocks of array positions pooled into pseudo-spots (mean log expression, at the block's
centroid, footprint diameter pitch * sqrt(2) + spot diameter); lamina is fitted on the pseudo-spots only and
predicts the original spots (footprint means of its embedding at their positions). r over spots, and the
within-block deviation r: prediction minus its block mean against measurement minus its block mean (copying
the block value scores 0 there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ingest import write_results  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data" / "her2st"
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
PX_UM = 0.688  # her2st pixel_x / pixel_y are H&E pixels; 200 um spot pitch (examples/her2st.yaml)


# ------------------------------------------------------------------------------------------- data
def her2st_hne():
    """(obs, lognorm [spot, gene], gene names, {'hvg': idx, 'top50': idx}, {section: image path})."""
    import anndata as ad

    a = ad.read_h5ad(DATA / "her2st_all_sections.h5ad")
    a = a[a.obs.section.isin(SECTIONS)]
    X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    logn = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)
    detected = (X > 0).mean(0) >= 0.10
    hvg = np.argsort(np.where(detected, logn.var(0), -1))[::-1][:250]
    top = np.argsort(np.where(detected, logn.mean(0), -1))[::-1][:50]
    keep = np.union1d(hvg, top)
    sets = {"hvg": np.searchsorted(keep, hvg), "top50": np.searchsorted(keep, top)}
    images = {s: next((DATA / "images").glob(f"*/{s}/*.jpg")) for s in SECTIONS}
    return a.obs.copy(), logn[:, keep].astype(np.float32), np.asarray(a.var_names[keep]), sets, images


def per_gene_r(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    a, b = pred - pred.mean(0), truth - truth.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(0) / den, np.nan)


def score(pred, truth, section, scored, genes) -> float:
    out = []
    for s in np.unique(section):
        m = scored & (section == s)
        if m.sum() >= 3:
            out.append(np.nanmean(per_gene_r(pred[m][:, genes], truth[m][:, genes])))
    return float(np.mean(out))


# -------------------------------------------------------------------------------------- baselines
def idw(Y, xy, section, visible, k=4):
    from scipy.spatial import cKDTree

    P = np.zeros_like(Y)
    for s in np.unique(section):
        v, h = visible & (section == s), ~visible & (section == s)
        d, i = cKDTree(xy[v]).query(xy[h], k=k)
        w = 1 / np.maximum(d, 1e-6)
        w /= w.sum(1, keepdims=True)
        P[h] = np.einsum("nk,nkg->ng", w, Y[v][i])
    return P


def gauss(Y, xy, section, visible, sigma):
    P = np.zeros_like(Y)
    for s in np.unique(section):
        v, h = visible & (section == s), ~visible & (section == s)
        d2 = ((xy[h][:, None] - xy[v][None]) ** 2).sum(-1)
        w = np.exp(-d2 / (2 * sigma**2))
        P[h] = (w / np.maximum(w.sum(1, keepdims=True), 1e-12)) @ Y[v]
    return P


# ------------------------------------------------------------------------------------------ lamina
def lamina_predict(atlas, options: dict) -> np.ndarray:
    """Run histology -> enhance with ``options`` (the features are computed once per store); every input row's
    predicted expression (scores @ loadings), in the input's row order."""
    import lamina

    lamina.enhance(atlas, **options)
    g = atlas.root["enhance"]
    genes = [str(x) for x in g["model/gene"][...]]
    order = [genes.index(x) for x in atlas.genes]
    pred = np.asarray(g["cells/scores"][...], np.float64) @ np.asarray(g["model/loadings"][...])[:, order]
    out = np.empty_like(pred)
    out[np.asarray(atlas.root["cells/input_row"][...])] = pred
    return out


def build_store(path: Path, table: pd.DataFrame, genes, images: dict, pixel_size: float, obs=()):
    import lamina

    if path.exists():
        shutil.rmtree(path)
    return lamina.ingest(
        table,
        str(path),
        section="section",
        x="x",
        y="y",
        genes=list(genes),
        obs=list(obs),
        units="px",
        pixel_size=pixel_size,
        images={s: {"path": str(p), "pixel_size_um": pixel_size} for s, p in images.items()},
    )


def peer_predict(
    python: str, script: str, work: Path, obs, Y, images, visible, args=()
) -> tuple[np.ndarray, float, float]:
    """A peer in its own environment (``script`` in benchmarks/, run by ``python`` with ``args``): it reads the
    job (per section: image, visible spots' pixels and expression, hidden spots' pixels) and writes predictions at
    the hidden spots; returns them, wall seconds and peak RSS (GiB) of its process."""
    from _measure import run_measured

    section = obs.section.astype(str).values
    px = np.c_[obs.pixel_x.values, obs.pixel_y.values]
    job = {"sections": np.array(SECTIONS), "radius_px": 50.0 / PX_UM, "pitch_px": 200.0 / PX_UM}
    for s in SECTIONS:
        m = section == s
        job[f"{s}/image"] = np.array(str(images[s]))
        job[f"{s}/visible_px"] = px[m & visible]
        job[f"{s}/visible_y"] = Y[m & visible]
        job[f"{s}/hidden_px"] = px[m & ~visible]
    name = Path(script).stem
    np.savez(work / f"{name}-job.npz", **job)
    m = run_measured([python, str(HERE / script), str(work / f"{name}-job.npz"), str(work / f"{name}.npz"), *args])
    out = np.load(work / f"{name}.npz")
    P = np.zeros_like(Y, dtype=np.float64)
    for s in SECTIONS:
        P[(section == s) & ~visible] = out[s]
    return P, m["seconds"], m["peak_rss"] / 2**30


def tesla_predict(peers_python: str, work: Path, obs, Y, images, visible) -> tuple[np.ndarray, float, float]:
    """TESLA in its own environment (benchmarks/enhance_peers.py)."""
    return peer_predict(peers_python, "enhance_peers.py", work, obs, Y, images, visible)


def hidden_spots(
    work: Path,
    seeds: int,
    peers_python: str | None = None,
    encoder: dict | None = None,
    spahdmap: dict | None = None,
) -> tuple[list, dict]:
    """``encoder``: histology options of a local foundation model (``encoder``, ``encoder_heads``, ...), run on a
    copy of the store so that its features and the weight-free ones are each computed once. ``spahdmap``:
    ``python`` of SpaHDmap's environment and its ``args`` (benchmarks/enhance_spahdmap.py), on ``splits`` of
    them (its CPU cost allows few)."""
    obs, Y, genes, sets, images = her2st_hne()
    section = obs.section.astype(str).values
    xy = np.c_[obs.pixel_x.values, obs.pixel_y.values] * PX_UM
    masks = {"checkerboard": ((obs.array_x.values + obs.array_y.values) % 2) == 0}
    for s in range(seeds):
        masks[f"random 50% seed {s}"] = np.random.default_rng(s).random(len(obs)) >= 0.5
    table = pd.DataFrame(Y, columns=genes)
    table.insert(0, "section", section)
    table.insert(1, "x", obs.pixel_x.values)
    table.insert(2, "y", obs.pixel_y.values)
    for k, vis in enumerate(masks.values()):
        table[f"visible{k}"] = vis.astype(np.int8)
    t0 = time.perf_counter()
    atlas = build_store(
        work / "her2st-hne.lamina.zarr", table, genes, images, PX_UM, obs=[f"visible{k}" for k in range(len(masks))]
    )
    ingest_s = time.perf_counter() - t0
    enc_atlas = None
    if encoder:
        import lamina

        shutil.rmtree(work / "her2st-hne-encoder.lamina.zarr", ignore_errors=True)
        shutil.copytree(atlas.path, work / "her2st-hne-encoder.lamina.zarr")
        enc_atlas = lamina.Atlas.open(work / "her2st-hne-encoder.lamina.zarr", mode="r+")
    rows = []
    for k, (name, vis) in enumerate(masks.items()):
        hidden = ~vis
        methods = {
            "IDW k=4 (visible spots)": lambda v=vis: idw(Y, xy, section, v),
            "Gaussian smoothing, sigma = pitch (200 um)": lambda v=vis: gauss(Y, xy, section, v, 200.0),
            "lamina enhance (defaults)": lambda k=k: lamina_predict(atlas, {"fit_column": f"visible{k}"}),
            "lamina: image only (neighbour_pitches=[], residual_sigma_um=0)": lambda k=k: lamina_predict(
                atlas, {"fit_column": f"visible{k}", "residual_sigma_um": 0.0, "neighbour_pitches": []}
            ),
            "lamina: spots only (alpha=1e9)": lambda k=k: lamina_predict(
                atlas, {"fit_column": f"visible{k}", "alpha": 1e9}
            ),
            "lamina version 2 (neighbour_pitches=[])": lambda k=k: lamina_predict(
                atlas, {"fit_column": f"visible{k}", "neighbour_pitches": []}
            ),
        }
        if enc_atlas is not None:
            label = f"lamina enhance + encoder {Path(encoder['encoder']).name} ({encoder.get('encoder_dims', 16)} dims)"
            methods[label] = lambda k=k: lamina_predict(enc_atlas, {"fit_column": f"visible{k}", **encoder})
        if spahdmap and k < spahdmap["splits"]:
            methods[spahdmap["label"]] = lambda v=vis: peer_predict(
                spahdmap["python"], "enhance_spahdmap.py", work, obs, Y, images, v, spahdmap["args"]
            )
        if peers_python:
            methods["TESLA 1.2.2 (res 50 px, k 2, 10 neighbours)"] = lambda v=vis: tesla_predict(
                peers_python, work, obs, Y, images, v
            )
        for method, fn in methods.items():
            t = time.perf_counter()
            P = fn()
            sec, peak = time.perf_counter() - t, float("nan")
            if isinstance(P, tuple):  # a peer in its own process: its wall time and peak RSS
                P, sec, peak = P
            rows.append(
                {
                    "split": name,
                    "method": method,
                    "hvg": score(P, Y, section, hidden, sets["hvg"]),
                    "top50": score(P, Y, section, hidden, sets["top50"]),
                    "seconds": sec,
                    "peak_gib": peak,
                    "hidden": int(hidden.sum()),
                }
            )
            print(f"{name:22s} {method:48s} {rows[-1]['hvg']:.3f} {rows[-1]['top50']:.3f} {sec:6.1f} s", flush=True)
    return rows, {"ingest_s": ingest_s, "spots": len(obs), "genes": len(genes)}


def pooled(section, x, y, bx, by, Y):
    """2 x 2 blocks of array positions pooled into pseudo-spots: (codes [spot], count [block], pseudo [block, G],
    px, py [block] (mean position), psec [block])."""
    key = pd.Series([f"{s}:{a}:{b}" for s, a, b in zip(section, bx // 2, by // 2)])
    codes, uniq = pd.factorize(key)
    n = len(uniq)
    count = np.bincount(codes, minlength=n).astype(float)
    pseudo = np.stack([np.bincount(codes, Y[:, j], n) for j in range(Y.shape[1])], 1) / count[:, None]
    px, py = np.bincount(codes, x, n) / count, np.bincount(codes, y, n) / count
    psec = np.array([u.rsplit(":", 2)[0] for u in uniq])
    return codes, count, pseudo, px, py, psec


def super_resolution_case(work, name, section, x, y, bx, by, Y, truth, genes, sets, images, px_um, pitch, spot):
    """Fit on pseudo-spots only, predict the original spots (footprint means of the embedding at their positions);
    r over spots and within-block deviation r against ``truth`` (the measurement, or a phantom's noise-free
    truth), next to copying the block value."""
    import lamina

    codes, count, pseudo, px, py, psec = pooled(section, x, y, bx, by, Y)
    table = pd.DataFrame(pseudo.astype(np.float32), columns=genes)
    table.insert(0, "section", psec)
    table.insert(1, "x", px)
    table.insert(2, "y", py)
    atlas = build_store(work / f"{name}-pseudo.lamina.zarr", table, genes, images, px_um)
    xy = np.c_[x, y] * px_um

    # the original spots are the cells inside the pseudo-spots: lamina.enhance_cells averages the embedding over
    # each one's disc and shifts the cells of each pseudo-spot so that their mean is its measurement
    cells = pd.DataFrame({"section": section, "x": xy[:, 0], "y": xy[:, 1]})

    def predict(options: dict) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        lamina.enhance(atlas, spot_diameter_um=pitch * np.sqrt(2) + spot, project=True, **options)
        out = lamina.enhance_cells(atlas, cells, radius_um=spot / 2, genes=list(genes), project=True)
        return out[list(genes)].to_numpy(np.float64), time.perf_counter() - t

    copy = pseudo[codes]
    n = len(count)
    multi = count[codes] > 1
    every = np.ones(len(truth), bool)
    block_mean = np.stack([np.bincount(codes, truth[:, j], n) for j in range(truth.shape[1])], 1) / count[:, None]
    dev_t = truth - block_mean[codes]
    rows = []
    methods = {
        "copy the block value": (copy, 0.0),
        "lamina: spots only (alpha=1e9)": predict({"alpha": 1e9}),
        "lamina version 2 (neighbour_pitches=[], project=true)": predict({"neighbour_pitches": []}),
        "lamina enhance (project=true)": predict({}),
    }
    for method, (pred, seconds) in methods.items():
        mean = np.stack([np.bincount(codes, pred[:, j], n) for j in range(pred.shape[1])], 1) / count[:, None]
        dev = pred - mean[codes]
        rows.append(
            {
                "data": name,
                "method": method,
                **{f"r {k}": score(pred, truth, section, every, v) for k, v in sets.items()},
                # copying has no deviation at all: its r is 0 by definition (NaN as computed)
                **{f"dev r {k}": np.nan_to_num(score(dev, dev_t, section, multi, v)) for k, v in sets.items()},
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
    return rows


def super_resolution(work: Path) -> list:
    obs, Y, genes, sets, images = her2st_hne()
    section = obs.section.astype(str).values
    return super_resolution_case(
        work,
        "her2st",
        section,
        obs.pixel_x.values,
        obs.pixel_y.values,
        obs.array_x.values,
        obs.array_y.values,
        Y,
        Y,
        genes,
        sets,
        images,
        PX_UM,
        200.0,
        100.0,
    )


def no_hallucination(work: Path, infos=(0.0, 0.5, 1.0)) -> list:
    """The histology phantom with an image that carries none, half or all of the expression fields: the same
    super-resolution, scored against the phantom's noise-free truth at the original spots."""
    from lamina.datasets.histology import histology_phantom

    rows = []
    for info in infos:
        ph = histology_phantom(seed=0, info=info, folder=work / f"phantom-{info:g}")
        t = ph.table
        pitch = 100.0
        col = np.round(t.x.to_numpy() * ph.pixel_size_um / pitch - 0.5).astype(int)
        row = np.round(t.y.to_numpy() * ph.pixel_size_um / pitch - 0.5).astype(int)
        Y = t[ph.genes].to_numpy(np.float64)
        rows += super_resolution_case(
            work,
            f"phantom info {info:g}",
            t.section.to_numpy().astype(str),
            t.x.to_numpy(),
            t.y.to_numpy(),
            col,
            row,
            Y,
            ph.truth,
            ph.genes,
            {"all": np.arange(len(ph.genes))},
            ph.images,
            ph.pixel_size_um,
            pitch,
            55.0,
        )
    return rows


def histology_alone(work: Path) -> list:
    """Leave one section out: fit on the other five, predict the sixth from its image alone (no spot of it is
    seen: no residuals, the mean section offset); r per gene over its spots."""
    obs, Y, genes, sets, images = her2st_hne()
    section = obs.section.astype(str).values
    table = pd.DataFrame(Y, columns=genes)
    table.insert(0, "section", section)
    table.insert(1, "x", obs.pixel_x.values)
    table.insert(2, "y", obs.pixel_y.values)
    for s in SECTIONS:
        table[f"not_{s}"] = (section != s).astype(np.int8)
    atlas = build_store(
        work / "her2st-alone.lamina.zarr", table, genes, images, PX_UM, obs=[f"not_{s}" for s in SECTIONS]
    )
    rows = []
    for s in SECTIONS:
        t = time.perf_counter()
        P = lamina_predict(atlas, {"fit_column": f"not_{s}"})
        held = section == s
        rows.append(
            {
                "held-out section": s,
                **{k: score(P, Y, section, held, v) for k, v in sets.items()},
                "seconds": time.perf_counter() - t,
            }
        )
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------- scale
SLIDE_PX_UM = 0.5
SLIDE_PITCH_UM = 100.0
SLIDE_GENES = 50


def _slide_fields(size_px: int, seed: int = 0):
    """Two smooth fields on a coarse grid (one value per 64 px) and a function giving them at any pixel."""
    rng = np.random.default_rng(seed)
    coarse = max(2, size_px // 64)
    from scipy import ndimage as ndi

    fields = np.stack([ndi.gaussian_filter(rng.normal(size=(coarse, coarse)), 3) for _ in range(2)])
    fields = (fields - fields.min()) / (np.ptp(fields) + 1e-9)

    def at(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.stack([ndi.map_coordinates(f, [rows / 64.0, cols / 64.0], order=1, mode="nearest") for f in fields])

    return at


def make_slide(path: Path, size_px: int) -> None:
    """A synthetic RGB slide of ``size_px`` square (tiled TIFF, 512 px tiles, written tile by tile)."""
    import tifffile

    at = _slide_fields(size_px)
    tile = 512
    rng = np.random.default_rng(1)

    def tiles():
        for y0 in range(0, size_px, tile):
            for x0 in range(0, size_px, tile):
                rr, cc = np.mgrid[y0 : y0 + tile, x0 : x0 + tile]
                f = at(rr.ravel().astype(float), cc.ravel().astype(float)).reshape(2, tile, tile)
                od = 1.2 * f[0, ..., None] * np.array([0.65, 0.70, 0.29]) + 0.8 * f[1, ..., None] * np.array(
                    [0.07, 0.99, 0.11]
                )
                od += rng.normal(0, 0.03, od.shape)
                yield np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)

    tifffile.imwrite(
        path, tiles(), shape=(size_px, size_px, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", bigtiff=True
    )


def slide_spots(size_px: int) -> pd.DataFrame:
    """Spots on a square lattice over the slide, expression = non-negative mixes of the two fields + noise."""
    at = _slide_fields(size_px)
    k = int(size_px * SLIDE_PX_UM // SLIDE_PITCH_UM)
    rows, cols = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    py = (rows.ravel() + 0.5) * SLIDE_PITCH_UM / SLIDE_PX_UM
    px = (cols.ravel() + 0.5) * SLIDE_PITCH_UM / SLIDE_PX_UM
    f = at(py, px)
    rng = np.random.default_rng(2)
    mix = rng.uniform(0, 1, (SLIDE_GENES, 2))
    Y = np.log1p(3 * (mix @ f).T) + rng.normal(0, 0.1, (len(px), SLIDE_GENES))
    table = pd.DataFrame(np.maximum(Y, 0).astype(np.float32), columns=[f"G{i}" for i in range(SLIDE_GENES)])
    table.insert(0, "section", "slide")
    table.insert(1, "x", px)
    table.insert(2, "y", py)
    return table


def scale_child(size_px: int, work: Path) -> None:
    import json

    import lamina

    tif = work / f"slide-{size_px}.tif"
    table = slide_spots(size_px)
    t0 = time.perf_counter()
    atlas = build_store(work / f"slide-{size_px}.lamina.zarr", table, table.columns[3:], {"slide": tif}, SLIDE_PX_UM)
    ingest = time.perf_counter() - t0
    seconds = lamina.enhance(atlas, genes=["G0", "G1"])
    out = {"ingest": ingest, **seconds, "spots": len(table)}
    print("RESULT " + json.dumps(out), flush=True)


def scale(work: Path, sizes) -> list:
    from _measure import child_result, run_measured

    rows = []
    for size in sizes:
        tif = work / f"slide-{size}.tif"
        t = time.perf_counter()
        make_slide(tif, size)
        make = time.perf_counter() - t
        m = run_measured([sys.executable, "-W", "ignore", __file__, "--scale-child", str(size), "--work", str(work)])
        res = child_result(m)
        rows.append({"px": size, "make_tiff_s": make, **res, "wall": m["seconds"], "peak_gib": m["peak_rss"] / 2**30})
        print(rows[-1], flush=True)
        shutil.rmtree(work / f"slide-{size}.lamina.zarr", ignore_errors=True)
        tif.unlink(missing_ok=True)
    return rows


# ------------------------------------------------------------------------------------------- smoke
def smoke(work: Path) -> None:
    """A synthetic section whose image carries the expression (seconds): enhance must beat IDW on hidden spots."""
    from lamina.datasets.histology import histology_phantom

    ph = histology_phantom(seed=0)
    vis = ph.table["visible"].to_numpy().astype(bool)
    Y = ph.table[ph.genes].to_numpy(np.float64)
    xy = ph.table[["x", "y"]].to_numpy(np.float64)
    section = ph.table["section"].to_numpy().astype(str)
    atlas = build_store(work / "smoke.lamina.zarr", ph.table, ph.genes, ph.images, ph.pixel_size_um, obs=["visible"])
    P = lamina_predict(atlas, {"fit_column": "visible"})
    genes = np.arange(len(ph.genes))
    r_lamina = score(P, ph.truth, section, ~vis, genes)
    r_idw = score(idw(Y, xy, section, vis), ph.truth, section, ~vis, genes)
    print(f"RESULT smoke lamina_r={r_lamina:.3f} idw_r={r_idw:.3f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/lamina-enhance-bench")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--peers-python", help="python of TESLA's environment (benchmarks/enhance_peers.requirements.txt)")
    ap.add_argument("--make-peers-env", metavar="DIR", help="create TESLA's environment in DIR, then exit")
    ap.add_argument("--make-spahdmap-env", metavar="DIR", help="create SpaHDmap's environment in DIR, then exit")
    ap.add_argument("--scale", type=int, nargs="*", help="slide sizes (px) for the scale table only, e.g. 20000 40000")
    ap.add_argument("--scale-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--spahdmap-python", help="python of SpaHDmap's environment (enhance_spahdmap.requirements.txt)")
    ap.add_argument(
        "--spahdmap-iters", type=int, nargs=3, default=[5000, 5000, 2000], help="its pretrain, GCN, train iterations"
    )
    ap.add_argument("--spahdmap-scale", type=float, default=1.0, help="its scale_rate (image downsampling)")
    ap.add_argument("--spahdmap-splits", type=int, default=1, help="splits it runs on (checkerboard first)")
    ap.add_argument("--spahdmap-pseudo", type=int, default=5, help="its pseudo-spots per spot (ratio_pseudo_spots)")
    ap.add_argument("--encoder", help="local weights of a pathology ViT (timm layout, e.g. UNI): adds a row per split")
    ap.add_argument("--encoder-heads", type=int, help="its attention heads (default: dim / 64)")
    ap.add_argument("--encoder-dims", type=int, default=16, help="its principal components kept as features")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        smoke(work)
        return
    if args.make_peers_env:
        import subprocess

        env = Path(args.make_peers_env)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "--no-deps", "teslaforst==1.2.2"], check=True)
        subprocess.run([*pip, "-r", str(HERE / "enhance_peers.requirements.txt")], check=True)
        print(f"peers environment ready: --peers-python {env / 'bin' / 'python'}")
        return
    if args.make_spahdmap_env:
        import subprocess

        env = Path(args.make_spahdmap_env)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "-r", str(HERE / "enhance_spahdmap.requirements.txt")], check=True)
        print(f"SpaHDmap environment ready: --spahdmap-python {env / 'bin' / 'python'}")
        return
    if args.scale_child:
        scale_child(args.scale_child, work)
        return
    if args.scale:
        rows = scale(work, args.scale)
        lines = [
            "## Enhance at scale (benchmarks/enhance.py --scale)",
            "",
            f"{dt.date.today()} · {platform.machine()}, 2 cores, no GPU · Python {platform.python_version()} · "
            f"command: `python benchmarks/enhance.py --scale {' '.join(map(str, args.scale))} --write`",
            "",
            f"A synthetic RGB slide (tiled TIFF, {SLIDE_PX_UM} um per pixel, written tile by tile before the run and "
            f"not timed), spots on a {SLIDE_PITCH_UM:g} um lattice over it with {SLIDE_GENES} genes; one child process "
            "(threads, no client): ingest (the image read tile by tile into the store's pyramid), then "
            "histology -> enhance with defaults and 2 gene maps. Peak RSS of the child.",
            "",
            "| slide (px) | spots | ingest (s) | histology (s) | enhance (s) | s per 100 M px (histology) | wall (s) | "
            "peak RSS (GiB) |",
            "|---|---|---|---|---|---|---|---|",
            *[
                f"| {r['px']:,} x {r['px']:,} | {r['spots']:,} | {r['ingest']:.1f} | {r['histology']:.1f} | "
                f"{r['enhance']:.1f} | {r['histology'] / (r['px'] ** 2 / 1e8):.2f} | {r['wall']:.1f} | "
                f"{r['peak_gib']:.2f} |"
                for r in rows
            ],
        ]
        text = "\n".join(lines)
        print(text)
        if args.write:
            write_results(text, "enhance-scale")
        return
    if not (DATA / "her2st_all_sections.h5ad").exists():
        print(f"skip: {DATA} not present (see ../shared/data/README.md)")
        return
    t0 = time.perf_counter()
    encoder = None
    if args.encoder:
        encoder = {"encoder": args.encoder, "encoder_heads": args.encoder_heads, "encoder_dims": args.encoder_dims}
    spahdmap = None
    if args.spahdmap_python:
        it, shrink, pseudo = args.spahdmap_iters, args.spahdmap_scale, args.spahdmap_pseudo
        spahdmap = {
            "python": args.spahdmap_python,
            "splits": args.spahdmap_splits,
            "args": ["--iters", *map(str, it), "--scale", str(shrink), "--pseudo", str(pseudo)],
            "label": f"SpaHDmap 0.1.7 (rank 20; iterations {it[0]} / {it[1]} / {it[2]}, at least one epoch each; "
            f"image scale 1/{shrink:g}; {pseudo} pseudo-spots per spot)",
        }
    rows, meta = hidden_spots(work, args.seeds, args.peers_python, encoder, spahdmap)
    sr = super_resolution(work)
    halluc = no_hallucination(work)
    alone = histology_alone(work)
    df = pd.DataFrame(rows)
    checker = df[df.split == "checkerboard"].drop(columns=["split"])
    rand = (
        df[df.split != "checkerboard"].groupby("method", sort=False)[["hvg", "top50", "seconds"]].agg(["mean", "std"])
    )
    lines = [
        "## Enhance: histology-guided expression (benchmarks/enhance.py)",
        "",
        f"{dt.date.today()} · {platform.machine()}, 2 cores, no GPU · Python {platform.python_version()} · "
        f"command: `python benchmarks/enhance.py {' '.join(argv if argv is not None else sys.argv[1:])}` · "
        f"{meta['spots']} spots of her2st B4, C2-C6 "
        f"({meta['genes']} genes: 250 hvg + 50 most expressed), ingest with images {meta['ingest_s']:.1f} s, "
        f"whole run {time.perf_counter() - t0:.0f} s",
        "",
        "Hidden spots, checkerboard (scored on the hidden spots only; mean per-gene Pearson r per section, then "
        "over the 6 sections):",
        "",
        "| method | r, 250 hvg | r, top-50 | seconds | peak RSS of its process (GiB) |",
        "|---|---|---|---|---|",
        *[
            f"| {r.method} | {r.hvg:.3f} | {r.top50:.3f} | {r.seconds:.1f} | "
            f"{'in-process' if np.isnan(r.peak_gib) else f'{r.peak_gib:.2f}'} |"
            for r in checker.itertuples()
        ],
        "",
        f"Hidden spots, random 50% ({args.seeds} seeds; mean ± sd over the seeds):",
        "",
        "| method | r, 250 hvg | r, top-50 | seconds |",
        "|---|---|---|---|",
        *[
            f"| {m} | {v[('hvg', 'mean')]:.3f} ± {v[('hvg', 'std')]:.3f} | {v[('top50', 'mean')]:.3f} ± "
            f"{v[('top50', 'std')]:.3f} | {v[('seconds', 'mean')]:.1f} |"
            for m, v in rand.iterrows()
        ],
        "",
        "Super-resolution (fit on 2 x 2 pseudo-spots only, predict the original spots):",
        "",
        "| method | r over spots, hvg | top-50 | within-block deviation r, hvg | top-50 | seconds |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['method']} | {r['r hvg']:.3f} | {r['r top50']:.3f} | {r['dev r hvg']:.3f} | "
            f"{r['dev r top50']:.3f} | {r['seconds']:.1f} |"
            for r in sr
        ],
        "",
        "No hallucination: the histology phantom (one 1.6 mm section, 256 spots of 55 um at 100 um, 12 genes mixed "
        "from 3 fields of 25-70 um bumps), its image stained by the expression fields with weight `info` (0: an "
        "unrelated field); the same super-resolution, scored against the noise-free truth at the original spots:",
        "",
        "| image information | method | r over spots | within-block deviation r |",
        "|---|---|---|---|",
        *[f"| {r['data'].split()[-1]} | {r['method']} | {r['r all']:.3f} | {r['dev r all']:.3f} |" for r in halluc],
        "",
        "Histology alone: fitted on five sections, the sixth predicted from its image only (mean per-gene r over its "
        "spots; any spatial baseline scores 0 here, it has no spot to start from):",
        "",
        "| held-out section | r, 250 hvg | r, top-50 | seconds |",
        "|---|---|---|---|",
        *[f"| {r['held-out section']} | {r['hvg']:.3f} | {r['top50']:.3f} | {r['seconds']:.1f} |" for r in alone],
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_results(text, "enhance")


if __name__ == "__main__":
    main()
