"""Stage ``refine``: group-wise global consistency (affine) and the fine diffeomorphic stage (LDDMM).

Data flow (every arrow is one Dask task per section, or per batch of sections for the fits; between rounds
the driver handles only ``[S, 3, 3]`` matrices)::

    /raster/cells + /transforms/affine --> canvas_k: section k resampled onto the atlas canvas
    affine rounds:  template_k = mean of the other sections' current images (global)
                    channel weights w_kc from corr(current_kc, template_kc)
                    canvas_k --(refine_affine vs template_k, channel c scaled by w_kc)--> B_k,
                    a step (S-1)/S of the way;  gauge: mean(B) = I
    frame gauge:    the atlas frame loses the mean shear of the raw -> atlas maps (kernels.groupwise)
    LDDMM rounds:   template_k = Gaussian-in-z mean of the neighbours' current images (self excluded)
                    canvas_k --(lddmm.register, warm start)--> v_k, a step 1 - w_kk of the way --> flow_k (tiled)
                    gauge: flow_k composed with the inverse of the local mean flow
    --> /deformation: affine [S, 3, 3] (raw um -> atlas um), displacement / inverse [S, 2, y, x] (um)

Why the partial steps: all sections move at once, each towards a template that leaves itself out; a full move
overshoots the consensus (two sections would just swap places), see ``kernels.groupwise.consensus_step``.

Why two templates: the affine part is fixed against all sections, because a rotation or shear that grows
steadily along z is almost always accumulated error; the non-linear part only against nearby sections,
so that structures that really move through the stack (vessels, layers that fold) are not straightened.
Such a structure still pulls on the affine fit against all sections (it is smeared along its path in that
template), so each channel weighs there by how well the other sections predict it
(``kernels.groupwise.channel_weights``).
Sections too blank to register keep the identity and are left out of every template.

A reference section named at ``register`` is *held*: it is never moved, it serves in the others' templates,
and it replaces the gauge (the atlas frame is its own). A section whose template does not move (the held
reference alone, as in a pair) takes the full step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dask
import numpy as np

from ..cluster import even_batches, task_device
from ..errors import ensure
from ..kernels.geometry import affine_matrix
from ..kernels.raster import normalise_density
from ..store import arrays
from ..store.arrays import open_root
from .contract import Stage, StageContext
from .options import Options, option
from .rasterize import pixel_to_um

log = logging.getLogger("lamina")


@dataclass(frozen=True)
class RefineOptions(Options):
    affine_rounds: int = option(
        3, "group-wise affine rounds, each section against the mean of the others (0: none)", ge=0
    )
    lddmm_rounds: int = option(2, "LDDMM rounds, each section against its neighbours in z (0: affine only)", ge=0)
    z_sigma_sections: float | None = option(
        3.0, "width of the neighbours' template and of the local gauge (sections); null: all sections", gt=0
    )
    alpha_px: float = option(8.0, "smoothness length of the velocity fields (canvas pixels)", gt=0)
    power: float = option(2.0, "power of the smoothing operator (1 - alpha^2 Laplacian)^-power", gt=0)
    sigma: float = option(0.05, "weight of the image term against the deformation energy", gt=0)
    lddmm_grid_px: int = option(64, "pixels across the finest LDDMM grid", ge=4)
    lddmm_iterations: tuple[int, ...] = option((100, 50), "Adam steps of the LDDMM per scale (coarse, fine)", ge=0)
    time_steps: int = option(5, "time steps of the velocity fields", ge=1)
    affine_iterations: tuple[int, ...] = option((120, 60), "Adam steps of the group-wise affine per scale", ge=0)
    channel_weights: bool = option(
        True,
        "weight each raster channel of the group-wise affine fit by how well the other sections predict it "
        "(r^2 / (1 - r^2)), so a structure that moves through the stack does not drag every section along; "
        "false: channels weigh by their mass only (version 2)",
    )
    min_mass_ratio: float = option(
        0.02,
        "sections with fewer cells than this share of the largest keep the identity and stay out of every template",
        ge=0,
    )
    mass_preserving: bool = option(True, "carry rasters as densities (times the Jacobian) under the warp")
    heldout_check: bool = option(
        True,
        "fit each warp twice (half the cells each, towards the neighbours at odd / even distance) and keep it only "
        "where it brings the held-out half closer to the held-out neighbours; false: one fit of all cells, always "
        "kept (version 1)",
    )
    min_heldout_share: float = option(
        0.25,
        "share of the folds' own (in-sample) correlation gain that must carry over to the held-out halves for a "
        "warp to be kept; a warp fitted to noise or to anatomy that moves gains on its own cells and hardly on "
        "the held-out ones; 0: any positive held-out gain (version 3)",
        ge=0,
        le=1,
    )
    batch: int = option(4, "sections fitted as one batch per task (16-32 on GPU workers)", ge=1)


def _open(store: str):
    return open_root(store, "r+")


def _canvas_task(store: str, g: str, k: int, M: np.ndarray) -> float:
    """Section k's raster resampled onto the atlas canvas (``M``: section pixel -> atlas pixel)."""
    import torch

    from ..kernels.image_align import warp_image

    root = _open(store)
    cells = np.asarray(root["raster/cells"][k], np.float64)
    half = np.asarray(root["raster/half"][k], np.float64)
    # the two halves of the cells, each on the density scale of the whole (rasterize.check_half)
    images = np.stack([normalise_density(cells), normalise_density(cells - half), normalise_density(half)])
    out = warp_image(torch.from_numpy(images), torch.from_numpy(M)[None].expand(3, 3, 3))
    out = out.float().numpy()
    for name, img in zip(("canvas", "canvas_fit", "canvas_check"), out):
        root[f"{g}/{name}"][k] = img
    root[f"{g}/current"][k] = out[0]
    return float(out[0].sum())


def _weighted_sum(arr, weights: np.ndarray) -> np.ndarray:
    """``sum_j weights[..., j] * arr[j]`` in float64: one sum for weights ``[S]``, ``n`` sums for ``[n, S]``
    (the templates of a batch). Each section with a non-zero weight in any row is read once."""
    w = np.asarray(weights, np.float64)
    out = np.zeros(w.shape[:-1] + arr.shape[1:], np.float64)
    expand = w.shape[:-1] + (1,) * (len(arr.shape) - 1)
    for j in np.flatnonzero((w.reshape(-1, w.shape[-1]) != 0).any(0)):
        out += w[..., j].reshape(expand) * np.asarray(arr[int(j)], np.float64)
    return out


def _sum_task(store: str, g: str, usable: np.ndarray) -> int:
    root = _open(store)
    total = _weighted_sum(root[f"{g}/current"], np.asarray(usable, np.float64))
    root[f"{g}/template_sum"][...] = total.astype(np.float32)
    return int(usable.sum())


def _affine_task(
    store: str,
    g: str,
    ks: list[int],
    B: np.ndarray,
    n_usable: int,
    scales,
    iterations,
    rigid: bool = False,
    weighted: bool = True,
) -> tuple:
    """Affine corrections ``[len(ks), 3, 3]`` (starting from ``B``), losses ``[len(ks)]`` and channel weights
    ``[len(ks), C]`` of sections ``ks``, each against the mean of the other usable sections, refined as one batch
    (:func:`refine_affine_batch`). ``weighted``: each channel of both images is scaled by
    :func:`kernels.groupwise.channel_weights` of the section's current image against its template (all 1 if not)."""
    import torch

    from ..kernels.groupwise import channel_weights
    from ..kernels.image_align import refine_affine_batch

    root = _open(store)
    dev = task_device()
    total = np.asarray(root[f"{g}/template_sum"][...], np.float64)
    own = np.stack([np.asarray(root[f"{g}/current"][k], np.float64) for k in ks])
    templates = torch.from_numpy((total[None] - own) / (n_usable - 1)).to(dev)
    canvases = torch.from_numpy(np.stack([np.asarray(root[f"{g}/canvas"][k], np.float64) for k in ks])).to(dev)
    weights = torch.ones(templates.shape[:2], dtype=templates.dtype, device=dev)
    if weighted:  # judged on where the section is now (its current image), as its template is
        weights = channel_weights(templates, torch.from_numpy(own).to(dev))
    w = weights[..., None, None]
    found, losses = refine_affine_batch(
        templates * w, canvases * w, B, scales=scales, iterations=iterations, rigid=rigid
    )
    return found, losses, weights.cpu().numpy()


def _apply_affine_task(store: str, g: str, k: int, B: np.ndarray) -> int:
    import torch

    from ..kernels.image_align import warp_image

    root = _open(store)
    canvas = torch.from_numpy(np.asarray(root[f"{g}/canvas"][k], np.float64))
    root[f"{g}/current"][k] = warp_image(canvas[None], torch.from_numpy(B)[None])[0].float().numpy()
    return k


def _template(root, g: str, weights: np.ndarray):
    """Template(s) of the current images: ``[C, H, W]`` for weights ``[S]``, ``[n, C, H, W]`` for ``[n, S]``."""
    import torch

    return torch.from_numpy(_weighted_sum(root[f"{g}/current"], weights)).float()


def _lddmm_task(
    store: str,
    g: str,
    ks: list[int],
    sides: np.ndarray,
    steps: list[float],
    warm: bool,
    opts: dict,
) -> list[dict]:
    """Two-fold cross-fitted LDDMM of sections ``ks`` as one batch (:func:`lddmm.register_batch`).

    ``sides`` ``[len(ks), 3, S]``: each section's template weights split in two disjoint templates (the
    neighbours at odd / even distance; at an end of the stack nearest / farther:
    :func:`kernels.groupwise.side_weights`), and whole.
    Fold a fits the *fit half* of the section's cells to the first template, fold b the *check half* to the
    second; each fold is then scored on what it never saw: fold a moves the check half and is compared with
    the second template, fold b the reverse (normalised cross-correlation, gain over no warp), and on what it
    was fitted to (the in-sample gains). The section's warp is the mean of the two folds' velocities when the
    held-out gains sum to more than 0 and to at least ``min_heldout_share`` of the in-sample gains' sum, else
    none (it keeps its affine; ``kept`` False). ``agreement``: the cosine similarity of the two folds' displacement
    fields inside the tissue (split-half reproducibility; recorded, not used to decide).
    """
    import torch

    from ..kernels import lddmm
    from ..kernels.image_align import ncc

    root = _open(store)
    dev = task_device()
    n = len(ks)
    checked = bool(opts["heldout_check"])

    def images(name: str):
        return torch.from_numpy(np.stack([np.asarray(root[f"{g}/{name}"][k], np.float32) for k in ks])).to(dev)

    f = opts["pool"]
    init = None
    if warm:  # [n, fold, T, 2, h, w] -> [fold * n, T, 2, h, w] (fold a first)
        init = torch.from_numpy(np.stack([np.asarray(root[f"{g}/velocity"][k]) for k in ks])).to(dev)
        init = init.transpose(0, 1).reshape(2 * n, *init.shape[2:])
    if checked:
        lower, upper = (_template(root, g, sides[:, i]).to(dev) for i in (0, 1))
        fit, check = images("canvas_fit"), images("canvas_check")
        fixed, moving = torch.cat([lower, upper]), torch.cat([fit, check])
    else:  # refine version 1: all cells against the template of both sides, one fit, nothing held out
        fixed, moving = _template(root, g, sides[:, 2]).to(dev), images("canvas")
        init = None if init is None else init[:n]
    vs, reps = lddmm.register_batch(
        fixed,
        moving,
        steps=opts["time_steps"],
        alpha=opts["alpha_px"],
        power=opts["power"],
        sigma=opts["sigma"],
        iterations=tuple(opts["lddmm_iterations"]),
        scales=(2 * f, f),
        init=init,
        tol=1e-7,
        dtype=torch.float32,
        mass=opts["mass_preserving"],
    )
    # Jacobi step towards the consensus (kernels.groupwise.consensus_step), taken on the velocity
    previous = torch.zeros_like(vs) if init is None else lddmm.resize_velocity(init.to(vs), vs.shape[-2:])
    step = torch.tensor(steps * (len(vs) // n), dtype=vs.dtype, device=vs.device).reshape(-1, 1, 1, 1, 1)
    vs = previous + step * (vs - previous)
    if not checked:  # both fold slots hold the one fit; nothing is held out, every warp is kept
        vs, reps = torch.cat([vs, vs]), reps + reps
    mass = opts["mass_preserving"]
    gains, fitted, agreement = np.full((n, 2), np.nan), np.full((n, 2), np.nan), np.full(n, np.nan)
    if checked:
        with torch.no_grad():
            moved = lddmm.integrate_inverse(vs)
            # fold a (fitted: fit half -> first template) moves the check half towards the second; b the reverse
            held_out = [(check, upper, moved[:n]), (fit, lower, moved[n:])]
            in_sample = [(fit, lower, moved[:n]), (check, upper, moved[n:])]

            def gain(img, tpl, d, i):
                return ncc(lddmm.deform(img[i].double(), d[i].double(), mass), tpl[i].double()) - ncc(
                    img[i].double(), tpl[i].double()
                )

            gains = np.array([[gain(*fold, i) for fold in held_out] for i in range(n)])
            fitted = np.array([[gain(*fold, i) for fold in in_sample] for i in range(n)])
            # split-half reproducibility: do two fits from disjoint cells and disjoint neighbours move alike?
            tissue = (fit + check).sum(1)
            inside = (tissue > 0.05 * tissue.flatten(1).amax(1)[:, None, None]).unsqueeze(1).to(moved)
            da, db = moved[:n] * inside, moved[n:] * inside
            num = (da * db).flatten(1).sum(1)
            den = (da.square().flatten(1).sum(1) * db.square().flatten(1).sum(1)).sqrt().clamp_min(1e-12)
            agreement = (num / den).cpu().numpy()
    # cross-validation: the out-of-fold gain, and enough of what the folds gained on their own cells carries over
    share = float(opts["min_heldout_share"])
    kept = (gains.sum(1) > 0) & (gains.sum(1) >= share * fitted.sum(1)) if checked else np.ones(n, bool)
    v = 0.5 * (vs[:n] + vs[n:]) * torch.from_numpy(kept).to(vs).reshape(-1, 1, 1, 1, 1)
    N = moving.shape[-1]
    inverse = lddmm.integrate_inverse(v).cpu().numpy()
    shape = root[f"{g}/velocity"].shape[-2:]
    out = []
    for i, k in enumerate(ks):
        folds = torch.stack([vs[i], vs[n + i]])
        root[f"{g}/velocity"][k] = lddmm.resize_velocity(folds, shape).cpu().numpy()
        root[f"{g}/flow"][k] = (
            lddmm.forward_displacement_tiled(v[i], tile=max(32, N // 2), halo=lddmm.required_halo(v[i])).cpu().numpy()
        )
        root[f"{g}/flow_inverse"][k] = inverse[i]
        out.append(
            {
                "section": k,
                "kept": bool(kept[i]),
                "gain_a": float(gains[i, 0]),
                "gain_b": float(gains[i, 1]),
                "fitted_a": float(fitted[i, 0]),
                "fitted_b": float(fitted[i, 1]),
                "agreement": float(agreement[i]),
                "data_before": 0.5 * (reps[i]["data_before"] + reps[n + i]["data_before"]),
                "data_after": 0.5 * (reps[i]["data_after"] + reps[n + i]["data_after"]),
                "iterations": int(sum(reps[i]["iterations"]) + sum(reps[n + i]["iterations"])),
            }
        )
    return out


def _gauge_task(store: str, g: str, k: int, weights: np.ndarray, spacing: float, mass: bool, kept: bool) -> dict:
    """Section k's flow without its neighbourhood's shared part (``weights`` ``[S]`` over the usable sections;
    a section whose warp was not kept has zero flow there), as displacement / inverse grids in um, and its
    deformed canvas. A section whose warp was not kept, or
    whose warp folds (Jacobian determinant <= 0 somewhere), gets exactly zero displacement."""
    import torch

    from ..kernels import lddmm
    from ..kernels.groupwise import remove_common

    root = _open(store)
    N = root[f"{g}/flow"].shape[-1]
    fwd = inv = torch.zeros((2, N, N), dtype=torch.float64)
    if kept:
        common = _weighted_sum(root[f"{g}/flow"], weights)
        fwd, inv = remove_common(
            torch.from_numpy(np.asarray(root[f"{g}/flow"][k], np.float64)),
            torch.from_numpy(np.asarray(root[f"{g}/flow_inverse"][k], np.float64)),
            torch.from_numpy(common),
        )
    finite = bool(torch.isfinite(fwd).all() and torch.isfinite(inv).all())
    det = lddmm.jacobian_det(fwd) if finite else torch.full((N, N), float("nan"), dtype=torch.float64)
    folded = not finite or float(det.min()) <= 0.0
    if folded:
        fwd = inv = torch.zeros((2, N, N), dtype=torch.float64)
    root[f"{g}/displacement"][k] = (fwd * spacing).float().numpy()
    root[f"{g}/inverse"][k] = (inv * spacing).float().numpy()
    canvas = torch.from_numpy(np.asarray(root[f"{g}/canvas"][k], np.float64))
    root[f"{g}/current"][k] = lddmm.deform(canvas, inv, mass).float().numpy() if kept and not folded else canvas.numpy()
    return {
        "section": k,
        "folded": bool(kept and folded),
        "jacobian_min": float(det.min()) if finite else float("nan"),
        "jacobian_max": float(det.max()) if finite else float("nan"),
        "displacement_max_um": float(fwd.norm(dim=0).max()) * spacing,
    }


def _revert_task(store: str, g: str, k: int) -> int:
    """Section k keeps its affine: zero displacement, and its current image is its canvas."""
    root = _open(store)
    for name in ("displacement", "inverse"):
        root[f"{g}/{name}"][k] = np.zeros(root[f"{g}/{name}"].shape[1:], np.float32)
    root[f"{g}/current"][k] = np.asarray(root[f"{g}/canvas"][k])
    return k


def _score_task(store: str, g: str, k: int, weights: np.ndarray) -> tuple[float, float]:
    """Correlation of section k with its neighbours' template before (affine stage) and after refinement."""
    import torch

    from ..kernels.image_align import ncc

    root = _open(store)
    template = _template(root, g, weights).double()
    before = torch.from_numpy(np.asarray(root[f"{g}/canvas"][k], np.float64))
    after = torch.from_numpy(np.asarray(root[f"{g}/current"][k], np.float64))
    return ncc(before, template), ncc(after, template)


def _build(ctx: StageContext) -> dict:
    """Group-wise affine consistency + LDDMM for every section; writes ``/deformation``.

    ``affine_rounds`` / ``lddmm_rounds``: 0 switches a part off; one round when every template is held, as
    for a pair with a reference. ``batch``: sections per affine or LDDMM task, fitted as one batch (each gets
    what it would get alone, but every tensor operation runs once per batch; on this 2-core CPU batches of 4
    made refine 1.3-1.7x faster). The split depends only on ``batch``, so results do not depend on the
    number of workers. A reference held by ``register`` (``reference=``) is never moved.
    """
    from ..kernels.groupwise import (
        SPLIT_ALTERNATE,
        SPLIT_NEAR_FAR,
        affine_gauge,
        consensus_step,
        frame_stretch,
        side_weights,
        smoothing_weights,
        template_weights,
    )

    atlas, opts, group = ctx.atlas, ctx.options, ctx.group
    g, store = group.path, atlas.path
    raster = atlas.root["raster"]
    S, C, N, _ = raster["cells"].shape
    P = pixel_to_um(raster)
    spacing = float(P[0, 0])
    cen = np.asarray(raster["centroid"][...])
    final = np.asarray(atlas.root["transforms/affine"][...])
    ref = int(atlas.root["transforms/affine"].attrs["reference"])
    held = bool(atlas.root["transforms/affine"].attrs.get("reference_held", False))
    rigid = bool(atlas.root["transforms/affine"].attrs.get("rigid", False))  # register's choice holds here too
    Q = affine_matrix(0.0, 1.0, cen[ref]) @ P  # atlas canvas pixel -> atlas um
    Qi = np.linalg.inv(Q)
    f = max(1, int(round(N / opts.lddmm_grid_px)))
    n_coarse = -(-N // f)
    T = opts.time_steps
    img, field = ("section", "channel", "y", "x"), ("section", "xy", "y", "x")
    for name, shape, dims in [
        ("canvas", (S, C, N, N), img),
        ("canvas_fit", (S, C, N, N), img),
        ("canvas_check", (S, C, N, N), img),
        ("current", (S, C, N, N), img),
        ("template_sum", (C, N, N), img[1:]),
        ("velocity", (S, 2, T, 2, n_coarse, n_coarse), ("section", "fold", "t", "xy", "yc", "xc")),
        ("flow", (S, 2, N, N), field),
        ("flow_inverse", (S, 2, N, N), field),
        ("displacement", (S, 2, N, N), field),
        ("inverse", (S, 2, N, N), field),
    ]:
        arrays.create(group, name, shape, np.float32, (1,) * (len(shape) - 3) + shape[-3:], dims)
    # sections with too few cells to register keep the identity and stay out of every template
    n_cells = np.asarray(atlas.root["qc/n_cells"][...], np.float64)
    usable = n_cells >= max(5.0, opts.min_mass_ratio * n_cells.max())
    moving = usable.copy()
    if held:
        moving[ref] = False

    def to_canvas(B):
        # section raster pixel -> raw um -> atlas um (affine stage) -> atlas canvas pixel -> correction B
        M = [B[k] @ Qi @ final[k] @ affine_matrix(0.0, 1.0, cen[k]) @ P for k in range(S)]
        return ctx.compute(*[dask.delayed(_canvas_task, pure=False)(store, g, k, M[k]) for k in range(S)])

    to_canvas(np.repeat(np.eye(3)[None], S, 0))
    B = np.repeat(np.eye(3)[None], S, 0)
    affine_loss = np.full(S, np.nan)
    affine_weights = np.full((S, C), np.nan)
    # the affine template (all usable sections) moves unless k is the only section that moves; rounds let
    # a moving template settle, against a held one a single round is the whole fit
    affine_template_moves = moving.sum() > 1
    affine_rounds = (
        0 if usable.sum() < 2 else opts.affine_rounds if affine_template_moves else min(opts.affine_rounds, 1)
    )
    if affine_rounds:
        f_aff = max(1, int(round(N / 64)))
        affine_batches = even_batches([int(k) for k in np.flatnonzero(moving)], opts.batch)
        for _ in range(affine_rounds):
            ctx.compute(dask.delayed(_sum_task, pure=False)(store, g, usable))
            tasks = [
                dask.delayed(_affine_task, pure=False)(
                    store,
                    g,
                    ks,
                    B[ks],
                    int(usable.sum()),
                    (2 * f_aff, f_aff),
                    tuple(opts.affine_iterations),
                    rigid,
                    opts.channel_weights,
                )
                for ks in affine_batches
            ]
            step = consensus_step(1.0 / usable.sum(), template_moves=affine_template_moves)
            for ks, (found, losses, weights) in zip(affine_batches, ctx.compute(*tasks)):
                for k, Bk, loss, wk in zip(ks, found, losses, weights):
                    if np.all(np.isfinite(Bk)):
                        B[k], affine_loss[k], affine_weights[k] = B[k] + step * (Bk - B[k]), loss, wk
            if not held:
                B = affine_gauge(B, usable)
            if rigid:  # the gauge's mean correction is not a rotation in general
                from ..kernels.image_align import nearest_rigid

                B = nearest_rigid(B)
            ctx.compute(*[dask.delayed(_apply_affine_task, pure=False)(store, g, k, B[k]) for k in range(S)])
        if opts.channel_weights and C > 1 and np.isfinite(affine_weights).any():
            # a channel that weighs little across the stack is one the sections disagree on: anatomy that moves
            # or changes through the stack, or noise; worth a line for whoever reads the log
            mean = np.nanmean(affine_weights, 0)
            names = raster["cells"].attrs["channels"]  # rasterize names every channel
            low = ", ".join(f"{names[c]} {mean[c]:.2f}" for c in np.argsort(mean)[: min(3, C - 1)])
            log.info("refine: channels the other sections predict least (mean weight in the affine rounds): %s", low)
    # raw -> atlas after the affine rounds, then the frame's mean shear removed about the reference centre
    G = np.stack([Q @ B[k] @ Qi @ final[k] for k in range(S)])
    frame = np.eye(3)
    if usable.sum() >= 3 and not held and not rigid:  # two sections' mean shear is mostly their own warps
        frame[:2, :2] = frame_stretch(G[usable][:, :2, :2])
    C_um = affine_matrix(0.0, 1.0, cen[ref]) @ frame @ affine_matrix(0.0, 1.0, -cen[ref])
    G = np.stack([C_um @ G[k] for k in range(S)])
    final_new = G
    to_canvas(np.stack([Qi @ C_um @ Q @ B[k] for k in range(S)]))

    sig = opts.z_sigma_sections
    tw = np.stack([template_weights(S, k, sig, usable) for k in range(S)])
    split = [side_weights(tw[k], k) for k in range(S)]
    sides = np.stack([np.stack([*sw[:2], tw[k]]) for k, sw in enumerate(split)])  # [S, a / b / all, S]
    local = smoothing_weights(S, sig, usable)
    template_moves = [bool(moving[tw[k] != 0].any()) for k in range(S)]
    steps = [consensus_step(local[k, k], template_moves=template_moves[k]) for k in range(S)]
    n_lddmm = opts.lddmm_rounds if usable.sum() >= 2 else 0
    if not any(template_moves[k] for k in np.flatnonzero(moving)):
        n_lddmm = min(n_lddmm, 1)  # every template is held: a second round would only continue the same fit
    lopts = {**opts.to_dict(), "pool": f}
    fitted = [int(k) for k in np.flatnonzero(moving) if tw[k].sum() > 0]
    batches = even_batches(fitted, opts.batch)
    reports: dict[int, dict] = {}
    gauges: dict[int, dict] = {}
    for r in range(n_lddmm):
        tasks = [
            dask.delayed(_lddmm_task, pure=False)(store, g, ks, sides[ks], [steps[k] for k in ks], r > 0, lopts)
            for ks in batches
        ]
        reports = {rep["section"]: rep for done in ctx.compute(*tasks) for rep in done}
        kept = np.array([reports.get(k, {}).get("kept", False) for k in range(S)])
        # the gauge: each kept section loses its neighbourhood's shared flow, unless a held reference fixes the
        # frame; a section that keeps its affine counts with its zero flow (a kept section among rejected ones
        # would otherwise be its own neighbourhood and lose all of its warp)
        gauge = np.zeros((S, S)) if held else smoothing_weights(S, sig, usable) * kept[:, None]
        done = ctx.compute(
            *[
                dask.delayed(_gauge_task, pure=False)(
                    store, g, k, gauge[k], spacing, opts.mass_preserving, bool(kept[k])
                )
                for k in range(S)
            ]
        )
        gauges = {d["section"]: d for d in done}

    def score() -> np.ndarray:
        if S < 2:
            return np.zeros((S, 2))
        return np.asarray(ctx.compute(*[dask.delayed(_score_task, pure=False)(store, g, k, tw[k]) for k in range(S)]))

    scores = score()
    # the last guard: a warp fitted on this section's own cells that leaves it less like its neighbours is
    # worse than none
    fell = [
        k
        for k in range(S)
        if reports.get(k, {}).get("kept") and not gauges[k]["folded"] and scores[k, 1] < scores[k, 0]
    ]
    if fell:
        ctx.compute(*[dask.delayed(_revert_task, pure=False)(store, g, k) for k in fell])
        fell_scores = {k: (float(scores[k, 0]), float(scores[k, 1])) for k in fell}
        scores = score()
    reasons = []
    for k in range(S):
        rep, gau = reports.get(k), gauges.get(k)
        if not usable[k]:
            reasons.append(f"too few cells to register ({int(n_cells[k])})")
        elif held and k == ref:
            reasons.append("held reference: never moved")
        elif rep is None:
            reasons.append("fine stage off (lddmm_rounds 0)" if n_lddmm == 0 else "no usable neighbour")
        elif not rep["kept"]:
            sides_txt = {SPLIT_ALTERNATE: "odd / even distance", SPLIT_NEAR_FAR: "nearest / farther neighbours"}.get(
                split[k][2], "one neighbour only: cells held out"
            )
            held_gain, own_gain = rep["gain_a"] + rep["gain_b"], rep["fitted_a"] + rep["fitted_b"]
            if held_gain > 0:
                reasons.append(
                    f"held-out check failed: the warp fitted on half of the cells brought the other half closer to "
                    f"the sections it was not fitted to by {held_gain:+.4f} in correlation, less than "
                    f"{opts.min_heldout_share:g} of its gain on its own cells ({own_gain:+.4f}; {sides_txt}); "
                    f"keeps its affine"
                )
            else:
                reasons.append(
                    f"held-out check failed: the warp fitted on half of the cells did not bring the other half closer "
                    f"to the sections it was not fitted to ({sides_txt}; correlation gains {rep['gain_a']:+.4f}, "
                    f"{rep['gain_b']:+.4f}); keeps its affine"
                )
        elif gau is not None and gau["folded"]:
            reasons.append(f"folded warp (Jacobian determinant down to {gau['jacobian_min']:.3f}); keeps its affine")
        elif k in fell:
            a, b = fell_scores[k]
            reasons.append(f"correlation with its neighbours fell with the warp ({a:.4f} -> {b:.4f}); keeps its affine")
        else:
            reasons.append("")
    warped = np.array([reason == "" for reason in reasons])
    reverted = [str(atlas.sections.id.iloc[k]) for k in range(S) if usable[k] and k in reports and not warped[k]]
    if reverted:
        log.warning(
            "refine: %d of %d sections keep their affine (the fine stage did not earn its warp): %s; "
            "the reasons are in /deformation/sections (attr reasons)",
            len(reverted),
            S,
            ", ".join(reverted[:12]) + (" ..." if len(reverted) > 12 else ""),
        )
    for name in ("template_sum", "velocity", "flow", "flow_inverse", "canvas_fit", "canvas_check"):
        del group[name]
    ensure(bool(np.all(np.isfinite(final_new))), "refine produced a non-finite transform")
    arrays.write_small(
        group,
        "affine",
        final_new,
        ("section", "i", "j"),
        {"maps": "raw (x, y, 1) um -> atlas (x, y, 1) um, before the displacement"},
    )
    origin = [float(Q[0, 2]), float(Q[1, 2])]
    group.attrs.update(
        {
            "origin": origin,
            "spacing": spacing,
            "units": "um",
            "displacement": "atlas = a + displacement(a), a = affine @ raw (bilinear on the grid)",
            "inverse": "a = x + inverse(x) for an atlas point x; raw = affine^-1 @ a",
        }
    )
    group["canvas"].attrs["description"] = "each section after the affine stages, on the atlas canvas"
    group["current"].attrs["description"] = "each section after refinement (affine + displacement)"
    qc = group.create_group("sections")
    qc.attrs["ncc"] = (
        "correlation with the section's template of neighbours: before = after the affine rounds, "
        "after = with the displacement too"
    )
    qc.attrs["heldout_gain"] = (
        "held-out check of the last LDDMM round, gain in correlation over no warp: a = the warp fitted on the fit "
        "half of the cells towards the neighbours at odd distance (at an end: the nearest neighbour), scored on the "
        "check half against those at even distance (the farther neighbours); b = the reverse. insample_gain_a / b: "
        "the same folds scored on the cells and neighbours they were fitted to. The warp is kept when the held-out "
        "gains sum to more than 0 and to at least min_heldout_share of the in-sample ones. fold_agreement: cosine "
        "similarity of the two folds' displacements inside the tissue"
    )
    qc.attrs["reasons"] = reasons
    data: dict[str, np.ndarray] = {
        "ncc_before": scores[:, 0],
        "ncc_after": scores[:, 1],
        "affine_loss": affine_loss,
    }
    names = {
        "gain_a": "heldout_gain_a",
        "gain_b": "heldout_gain_b",
        "fitted_a": "insample_gain_a",
        "fitted_b": "insample_gain_b",
        "agreement": "fold_agreement",
    }
    for key in ("gain_a", "gain_b", "fitted_a", "fitted_b", "agreement", "data_before", "data_after"):
        name = names.get(key, f"lddmm_{key}")
        data[name] = np.array([reports[k][key] if k in reports else np.nan for k in range(S)])
    for key in ("jacobian_min", "jacobian_max", "displacement_max_um"):
        data[key] = np.array(
            [gauges[k][key] if k in gauges and warped[k] else (1.0 if "jac" in key else 0.0) for k in range(S)]
        )
    for name, values in data.items():
        arrays.write_small(qc, name, np.asarray(values, np.float64), ("section",))
    arrays.write_small(
        qc,
        "affine_channel_weights",
        affine_weights,
        ("section", "channel"),
        {"description": "each raster channel's weight in the last group-wise affine round (NaN: not fitted)"},
    )
    arrays.write_small(qc, "refined", warped, ("section",))
    arrays.write_small(
        qc,
        "template_split",
        np.array([sw[2] for sw in split], np.uint8),
        ("section",),
        {
            "codes": "how the held-out check split the neighbours: 0 none (cells held out only), 1 nearest / farther "
            "(an end of the stack), 2 odd / even distance"
        },
    )
    skipped = [str(atlas.sections.id.iloc[k]) for k in np.flatnonzero(~usable)]
    return {
        "kept_affine": reverted,
        "lddmm_pool": f,
        "skipped_sections": skipped,
        "rounds": {"affine": affine_rounds, "lddmm": n_lddmm},
        "ncc_mean_before": float(np.mean(scores[:, 0])),
        "ncc_mean_after": float(np.mean(scores[:, 1])),
    }


STAGE = Stage(
    name="refine",
    output="deformation",
    inputs=("register",),
    options=RefineOptions,
    # 2: two-fold cross-fitted LDDMM, a warp kept only where the held-out check says it helps
    # 3: the group-wise affine weighs each channel by how well the other sections predict it
    # 4: a warp is kept only when a share (min_heldout_share) of its in-sample gain carries over to the held-out half
    version=4,
    summary="Group-wise affine consistency, then LDDMM of each section against its neighbours in z, kept only "
    "where a held-out check confirms it.",
    build=_build,
    element="lamina.deformation",
    pipeline="align",
)
refine = STAGE.function
