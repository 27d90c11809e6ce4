"""One registration pair, the tools that align it (lamina, PASTE, STalign), and the one scoring code for all.

Every tool gets the same :class:`Pair` and returns both sections' coordinates in one common frame
(every tool keeps section A fixed and moves B onto it; lamina with ``reference=A``). Scores depend only
on those coordinates, so every tool is measured by the same code:

* phantom: per-cell error (um) of B's cells against where they belong in A's observed frame (their true
  positions mapped through A's known affine and warp), after removing one similarity transform fitted over
  both sections (A's cells to where they are, B's to those targets): a pair fixes neither the frame nor its
  scale, and A's own warp is invisible to any pairwise method, so it is not counted. Only B's cells are
  summarised: A's cells sit at their own positions for a tool that keeps A fixed, and would dilute the
  median with zeros;
* labels: for each cell of A, the label of the nearest cell of B; the share that agree (also on coarse
  labels where the pair has them);
* reference coordinates (her2st ``warped_x/y``): per-spot distance (um) between the tool's coordinates and
  the reference after removing the best similarity transform from the reference to the tool's frame;
* PASTE's own score: the share of transported mass between cells of the same label (PASTE only).

Labels, truth and reference coordinates are never given to a tool.

Settings (stated in RESULTS.md with the table):

* PASTE (``paste-bio`` 1.4, ``pot`` 0.9.4): ``pairwise_align`` with alpha 0.1 on a seeded subsample of at
  most ``paste_cells`` cells per section. Both sections are divided by one common typical cell spacing (the
  median nearest-neighbour distance pooled over both subsamples), instead of its ``norm=True``, which divides
  each section by its own smallest distance. It runs twice, from the uniform coupling and from its spatial
  heuristic (``match_spots_using_spatial_heuristic``), and keeps the lower fused-GW objective. The rigid
  transform is the weighted Procrustes fit of the coupling, applied to every cell of B. Dissimilarity:
  ``kl`` on counts where the pair has counts, else ``euclidean`` on the features.
* STalign (``stalign-modern``): images from the rasteriser documented for it (cells drawn as Gaussians of
  width ``blur * dx`` on a grid of pitch ``dx``, one channel per given label, else density), normalised to
  [0, 1]; it starts from the centroid translation (it has no rotation search); ``dx`` = 1.5x the typical
  cell spacing, ``a`` = 16 dx, 1000 iterations, step sizes epL 2e-5, epT 20, epV 2e3 (its defaults epL 2e-8,
  epT 0.2 left the rotation of a phantom pair unchanged: median error 52 um, as centroid matching; these
  were chosen on one phantom pair (S016->S017, 6 degrees apart) from a small grid, 34 um there), torch
  threads = 1, float64.
* lamina: ``lamina.align(reference="A")`` (A held fixed, the rest defaults) on a two-section atlas:
  cell-type channels when the pair gives labels as features (phantom, DLPFC, MERFISH; the phantom's
  expression is not used), else the given expression (her2st: log1p of counts per 10k) drawn as
  principal-component channels (``rasterize`` with ``channels="auto"``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Pair:
    """Two sections to align: A (fixed) and B (moving), coordinates in um."""

    dataset: str
    name: str
    xy_a: np.ndarray
    xy_b: np.ndarray
    features: str  # what the tools were given besides positions (for the table)
    feat_a: np.ndarray | None = None  # [n, F] float features (expression or one-hot labels)
    feat_b: np.ndarray | None = None
    counts: bool = False  # features are counts (PASTE uses its KL dissimilarity)
    given_labels_a: np.ndarray | None = None  # labels given to the tools as features (DLPFC, MERFISH)
    given_labels_b: np.ndarray | None = None
    labels_a: np.ndarray | None = None  # evaluation only
    labels_b: np.ndarray | None = None
    truth_a: np.ndarray | None = None  # evaluation only (phantom): where the cells belong in A's frame
    truth_b: np.ndarray | None = None
    ref_a: np.ndarray | None = None  # evaluation only (authors' reference alignment)
    ref_b: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


def typical_spacing(*xys: np.ndarray) -> float:
    """Median nearest-neighbour distance pooled over the given point sets (um)."""
    from scipy.spatial import cKDTree

    d = [cKDTree(p).query(p, k=2)[0][:, 1] for p in xys if len(p) > 1]
    return float(np.median(np.concatenate(d)))


# ---------------------------------------------------------------------------------------------- scoring
def score(pair: Pair, a: np.ndarray, b: np.ndarray) -> dict:
    """Scores of one tool's output: ``a``, ``b`` are both sections' coordinates ``[n, 2]`` in one frame."""
    from scipy.spatial import cKDTree

    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{pair.name}: non-finite output coordinates")
    out = {}
    if pair.labels_a is not None:
        # cells without a label are neither queried nor candidates
        ok_a, ok_b = _labelled(pair.labels_a), _labelled(pair.labels_b)
        _, j = cKDTree(b[ok_b]).query(a[ok_a])
        out["agreement"] = float(np.mean(pair.labels_a[ok_a] == pair.labels_b[ok_b][j]))
        if "coarse_a" in pair.extra:
            coarse_b = pair.extra["coarse_b"][ok_b][j]
            out["agreement_coarse"] = float(np.mean(pair.extra["coarse_a"][ok_a] == coarse_b))
    if pair.truth_a is not None:
        err = similarity_residuals(np.vstack([a, b]), np.vstack([pair.truth_a, pair.truth_b]))[len(a) :]
        out["median_um"], out["p95_um"] = float(np.median(err)), float(np.percentile(err, 95))
    if pair.ref_a is not None:
        # the reference is mapped into the tool's frame, so the distance is in the tool's um; spots the
        # authors left without reference coordinates are not counted
        ref, got = np.vstack([pair.ref_a, pair.ref_b]), np.vstack([a, b])
        ok = np.isfinite(ref).all(1)
        out["ref_um"] = float(np.median(similarity_residuals(ref[ok], got[ok])))
    return out


def _labelled(labels: np.ndarray) -> np.ndarray:
    return ~np.isin(labels.astype(str), ["nan", "<NA>", "None", ""])


def similarity_residuals(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Per-point distance ``[n]`` between ``dst`` and ``src`` mapped by the least-squares similarity src -> dst."""
    from lamina.kernels.ransac import fit_similarity

    T = fit_similarity(src, dst)
    return np.linalg.norm(src @ T[:2, :2].T + T[:2, 2] - dst, axis=1)


def baselines(pair: Pair) -> dict:
    """The unaligned and centroid-matched coordinates."""
    return {
        "unaligned": (pair.xy_a, pair.xy_b),
        "centroid": (pair.xy_a, pair.xy_b - pair.xy_b.mean(0) + pair.xy_a.mean(0)),
    }


# ---------------------------------------------------------------------------------------------- measuring
def measured(fn, *args, interval: float = 0.02, **kwargs):
    """``fn(*args)`` -> (result, wall seconds, peak RSS increase in bytes of this process and its children
    over the RSS just before the call), sampled every ``interval`` s."""
    import os

    from _measure import PeakRSS, tree_rss

    base = tree_rss(os.getpid())
    t0 = time.perf_counter()
    with PeakRSS(os.getpid(), interval) as m:
        result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0, m.peak - base


# ---------------------------------------------------------------------------------------------- lamina
def run_lamina(pair: Pair, work: Path, client) -> tuple[np.ndarray, np.ndarray, dict]:
    """Both sections through ``lamina.ingest`` + ``lamina.align`` (A held as the reference, else defaults);
    the info holds the seconds of each step (``step_ingest``, ``step_register``, ...)."""
    import pandas as pd

    import lamina

    n_a = len(pair.xy_a)
    table = pd.DataFrame(
        {
            "x": np.concatenate([pair.xy_a[:, 0], pair.xy_b[:, 0]]),
            "y": np.concatenate([pair.xy_a[:, 1], pair.xy_b[:, 1]]),
            "section": ["A"] * n_a + ["B"] * len(pair.xy_b),
        }
    )
    typed = pair.given_labels_a is not None
    genes = None
    if typed:
        table["cell_type"] = np.concatenate([pair.given_labels_a, pair.given_labels_b]).astype(str)
    elif pair.feat_a is not None:  # expression only: lamina draws it as principal-component channels
        X = np.vstack([pair.feat_a, pair.feat_b]).astype(np.float32)
        genes = [f"g{i}" for i in range(X.shape[1])]
        table = pd.concat([table, pd.DataFrame(X, columns=genes)], axis=1)
    src = work / f"{_slug(pair.name)}.csv"
    table.to_csv(src, index=False)
    # counts get ingest's usual normalisation: log1p of counts per 10k
    t = time.perf_counter()
    atlas = lamina.ingest(
        src,
        work / f"{_slug(pair.name)}.lamina.zarr",
        section="section",
        section_order=["A", "B"],
        cell_type="cell_type" if typed else None,
        genes=genes,
        normalize="log1p" if genes and pair.counts else "none",
        overwrite=True,
        client=client,
    )
    steps = {"ingest": time.perf_counter() - t, **lamina.align(atlas, client, reference="A")}
    xy = np.stack([atlas.root[f"aligned/{k}"][...] for k in ("x", "y")], 1).astype(np.float64)
    return xy[:n_a], xy[n_a:], {f"step_{k}": v for k, v in steps.items()}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


# ---------------------------------------------------------------------------------------------- PASTE
def paste_available() -> str | None:
    """None when PASTE can run, else why not."""
    try:
        import ot  # noqa: F401
        import paste  # noqa: F401
    except ImportError as e:
        return f"PASTE not installed ({e}); pip install -e '.[bench]'"
    return None


def weighted_procrustes(a: np.ndarray, b: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Rigid 3x3 map of B onto A that minimises ``sum_ij pi_ij |R b_j + t - a_i|^2`` (rotation only, Kabsch)."""
    w = pi / pi.sum()
    ma, mb = w.sum(1) @ a, w.sum(0) @ b
    H = (b - mb).T @ w.T @ (a - ma)  # [2, 2] = sum_ij w_ij (b_j - mb)(a_i - ma)^T
    U, _, Vt = np.linalg.svd(H)
    D = np.diag([1.0, np.sign(np.linalg.det(Vt.T @ U.T)) or 1.0])
    R = Vt.T @ D @ U.T
    out = np.eye(3)
    out[:2, :2], out[:2, 2] = R, ma - R @ mb
    return out


def run_paste(
    pair: Pair, max_cells: int = 2000, seed: int = 0, alpha: float = 0.1
) -> tuple[np.ndarray, np.ndarray, dict]:
    """PASTE ``pairwise_align`` on a subsample (settings in the module docstring); B moved rigidly onto A."""
    import anndata as ad
    import ot
    from paste import pairwise_align
    from paste.helper import match_spots_using_spatial_heuristic

    rng = np.random.default_rng(seed)
    ia = np.sort(rng.choice(len(pair.xy_a), min(max_cells, len(pair.xy_a)), replace=False))
    ib = np.sort(rng.choice(len(pair.xy_b), min(max_cells, len(pair.xy_b)), replace=False))
    unit = typical_spacing(pair.xy_a[ia], pair.xy_b[ib])
    fa, fb = pair.feat_a[ia].astype(np.float64), pair.feat_b[ib].astype(np.float64)
    sa = ad.AnnData(X=fa, obsm={"spatial": pair.xy_a[ia] / unit})
    sb = ad.AnnData(X=fb, obsm={"spatial": pair.xy_b[ib] / unit})
    sa.var_names = sb.var_names = [f"f{i}" for i in range(fa.shape[1])]
    dissimilarity = "kl" if pair.counts else "euclidean"
    best = None
    for init in ("uniform", "spatial"):
        G = (
            None
            if init == "uniform"
            else match_spots_using_spatial_heuristic(sa.obsm["spatial"], sb.obsm["spatial"], use_ot=True)
        )
        pi, obj = pairwise_align(
            sa,
            sb,
            alpha=alpha,
            dissimilarity=dissimilarity,
            G_init=G,
            return_obj=True,
            backend=ot.backend.NumpyBackend(),
            gpu_verbose=False,
        )
        if best is None or float(obj) < best[1]:
            best = (pi, float(obj), init)
    pi, obj, init = best
    T = weighted_procrustes(pair.xy_a[ia], pair.xy_b[ib], pi)
    b = pair.xy_b @ T[:2, :2].T + T[:2, 2]
    info = {"init": init, "objective": obj, "fit_cells": (len(ia), len(ib))}
    if pair.labels_a is not None:
        same = pair.labels_a[ia][:, None] == pair.labels_b[ib][None, :]
        info["paste_score"] = float(pi[same].sum() / pi.sum())
    return pair.xy_a, b, info


# ---------------------------------------------------------------------------------------------- STalign
def stalign_available() -> str | None:
    try:
        from STalign import STalign  # noqa: F401
    except ImportError as e:
        return f"STalign not installed ({e}); pip install -e '.[bench]'"
    return None


def rasterize_for_stalign(
    xy: np.ndarray, labels: np.ndarray | None, classes, dx: float, blur: float = 1.0, expand: float = 1.1
) -> tuple[list[np.ndarray], np.ndarray]:
    """STalign's documented rasteriser: every cell drawn as a Gaussian of sd ``blur * dx`` (um) on a grid of
    pitch ``dx`` over the cells' bounding box grown by ``expand``; one channel per class (or density).

    Returns ``([rows, cols] pixel-centre coordinates in um, image [C, H, W] normalised to [0, 1])``; STalign
    orders axes (row, col) = (y, x).
    """
    from scipy.ndimage import gaussian_filter

    lo, hi = xy.min(0), xy.max(0)
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * expand + 3 * blur * dx
    cols = np.arange(mid[0] - half[0], mid[0] + half[0] + dx, dx)
    rows = np.arange(mid[1] - half[1], mid[1] + half[1] + dx, dx)
    c = np.clip(np.round((xy[:, 0] - cols[0]) / dx).astype(int), 0, len(cols) - 1)
    r = np.clip(np.round((xy[:, 1] - rows[0]) / dx).astype(int), 0, len(rows) - 1)
    if labels is None:
        ch = np.zeros(len(xy), int)
        n_ch = 1
    else:
        ch = np.searchsorted(classes, labels)
        n_ch = len(classes)
    img = np.zeros((n_ch, len(rows), len(cols)))
    np.add.at(img, (ch, r, c), 1.0)
    img = np.stack([gaussian_filter(i, blur) for i in img])
    img /= max(img.max(), 1e-12)
    return [rows, cols], img


def run_stalign(
    pair: Pair,
    niter: int = 1000,
    dx_cells: float = 1.5,
    a_dx: float = 16.0,
    ep_l: float = 2e-5,
    ep_t: float = 20.0,
    ep_v: float = 2e3,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """STalign ``LDDMM`` of B's image onto A's (settings in the module docstring); B's cells mapped by
    ``transform_points_source_to_target``."""
    import torch
    from STalign import STalign

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dx = dx_cells * typical_spacing(pair.xy_a, pair.xy_b)
        classes = None
        if pair.given_labels_a is not None:
            classes = np.unique(np.concatenate([pair.given_labels_a, pair.given_labels_b]).astype(str))
        la = None if classes is None else pair.given_labels_a.astype(str)
        lb = None if classes is None else pair.given_labels_b.astype(str)
        xJ, J = rasterize_for_stalign(pair.xy_a, la, classes, dx)
        xI, I = rasterize_for_stalign(pair.xy_b, lb, classes, dx)
        # start from the centroid translation: (row, col) = (y, x)
        shift = pair.xy_a.mean(0) - pair.xy_b.mean(0)
        A0 = torch.eye(3, dtype=torch.float64)
        A0[:2, 2] = torch.tensor([shift[1], shift[0]], dtype=torch.float64)
        out = STalign.LDDMM(
            xI,
            I,
            xJ,
            J,
            A=A0,
            a=a_dx * dx,
            niter=niter,
            epL=ep_l,
            epT=ep_t,
            epV=ep_v,
            device="cpu",
            dtype=torch.float64,
        )
        pts = torch.tensor(pair.xy_b[:, ::-1].copy(), dtype=torch.float64)
        moved = STalign.transform_points_source_to_target(out["xv"], out["v"], out["A"], pts).numpy()
    finally:
        torch.set_num_threads(threads)
    return pair.xy_a, moved[:, ::-1].copy(), {"dx_um": dx, "image_px": tuple(J.shape[1:])}
