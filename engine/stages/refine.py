"""Stage ``refine``: group-wise global consistency (affine) and the fine diffeomorphic stage (LDDMM).

Data flow (every arrow is one Dask task per section, or per batch of sections for the fits; between rounds
the driver handles only ``[S, 3, 3]`` matrices)::

    /raster/cells + /transforms/affine --> canvas_k: section k resampled onto the atlas canvas
    affine rounds:  template_k = mean of the other sections' current images (global)
                    canvas_k --(refine_affine vs template_k)--> B_k, a step (S-1)/S of the way;  gauge: mean(B) = I
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
Sections too blank to register keep the identity and are left out of every template.

A reference section named at ``register`` is *held*: it is never moved, it serves in the others' templates,
and it replaces the gauge (the atlas frame is its own). A section whose template does not move (the held
reference alone, as in a pair) takes the full step.
"""

from __future__ import annotations

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
    min_mass_ratio: float = option(
        0.02,
        "sections with fewer cells than this share of the largest keep the identity and stay out of every template",
        ge=0,
    )
    mass_preserving: bool = option(True, "carry rasters as densities (times the Jacobian) under the warp")
    batch: int = option(4, "sections fitted as one batch per task (16-32 on GPU workers)", ge=1)


def _open(store: str):
    return open_root(store, "r+")


def _canvas_task(store: str, g: str, k: int, M: np.ndarray) -> float:
    """Section k's raster resampled onto the atlas canvas (``M``: section pixel -> atlas pixel)."""
    import torch

    from ..kernels.image_align import warp_image

    root = _open(store)
    img = torch.from_numpy(normalise_density(np.asarray(root["raster/cells"][k]))).double()
    out = warp_image(img[None], torch.from_numpy(M)[None])[0].float().numpy()
    root[f"{g}/canvas"][k] = out
    root[f"{g}/current"][k] = out
    return float(out.sum())


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
    store: str, g: str, ks: list[int], B: np.ndarray, n_usable: int, scales, iterations, rigid: bool = False
) -> tuple:
    """Affine corrections ``[len(ks), 3, 3]`` (starting from ``B``) and losses of sections ``ks``, each against the
    mean of the other usable sections, refined as one batch (:func:`refine_affine_batch`)."""
    import torch

    from ..kernels.image_align import refine_affine_batch

    root = _open(store)
    dev = task_device()
    total = np.asarray(root[f"{g}/template_sum"][...], np.float64)
    own = np.stack([np.asarray(root[f"{g}/current"][k], np.float64) for k in ks])
    templates = torch.from_numpy((total[None] - own) / (n_usable - 1)).to(dev)
    canvases = torch.from_numpy(np.stack([np.asarray(root[f"{g}/canvas"][k], np.float64) for k in ks])).to(dev)
    return refine_affine_batch(templates, canvases, B, scales=scales, iterations=iterations, rigid=rigid)


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
    store: str, g: str, ks: list[int], weights: np.ndarray, steps: list[float], warm: bool, opts: dict
) -> list[dict]:
    """LDDMM of sections ``ks`` onto their templates (``weights`` ``[len(ks), S]``) as one batch
    (:func:`lddmm.register_batch`: each section gets what it would get alone, every operation runs once)."""
    import torch

    from ..kernels import lddmm

    root = _open(store)
    dev = task_device()
    templates = _template(root, g, weights).to(dev)
    canvases = torch.from_numpy(np.stack([np.asarray(root[f"{g}/canvas"][k], np.float32) for k in ks])).to(dev)
    f = opts["pool"]
    init = torch.from_numpy(np.stack([np.asarray(root[f"{g}/velocity"][k]) for k in ks])).to(dev) if warm else None
    vs, reps = lddmm.register_batch(
        templates,
        canvases,
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
    vs = previous + torch.tensor(steps, dtype=vs.dtype, device=vs.device).reshape(-1, 1, 1, 1, 1) * (vs - previous)
    N = canvases.shape[-1]
    inverse = lddmm.integrate_inverse(vs).cpu().numpy()
    out = []
    for i, k in enumerate(ks):
        v = vs[i]
        root[f"{g}/velocity"][k] = lddmm.resize_velocity(v, root[f"{g}/velocity"].shape[-2:]).cpu().numpy()
        root[f"{g}/flow"][k] = (
            lddmm.forward_displacement_tiled(v, tile=max(32, N // 2), halo=lddmm.required_halo(v)).cpu().numpy()
        )
        root[f"{g}/flow_inverse"][k] = inverse[i]
        out.append(
            {
                "section": k,
                "data_before": reps[i]["data_before"],
                "data_after": reps[i]["data_after"],
                "iterations": int(sum(reps[i]["iterations"])),
            }
        )
    return out


def _gauge_task(store: str, g: str, k: int, weights: np.ndarray, spacing: float, mass: bool) -> int:
    import torch

    from ..kernels import lddmm
    from ..kernels.groupwise import remove_common

    root = _open(store)
    flows = root[f"{g}/flow"]
    common = _weighted_sum(flows, weights)
    fwd, inv = remove_common(
        torch.from_numpy(np.asarray(flows[k], np.float64)),
        torch.from_numpy(np.asarray(root[f"{g}/flow_inverse"][k], np.float64)),
        torch.from_numpy(common),
    )
    ensure(
        bool(torch.isfinite(fwd).all() and torch.isfinite(inv).all()),
        f"refine: non-finite displacement for section {k}",
    )
    root[f"{g}/displacement"][k] = (fwd * spacing).float().numpy()
    root[f"{g}/inverse"][k] = (inv * spacing).float().numpy()
    canvas = torch.from_numpy(np.asarray(root[f"{g}/canvas"][k], np.float64))
    root[f"{g}/current"][k] = lddmm.deform(canvas, inv, mass).float().numpy()
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
    from ..kernels.groupwise import affine_gauge, consensus_step, frame_stretch, smoothing_weights, template_weights

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
        ("current", (S, C, N, N), img),
        ("template_sum", (C, N, N), img[1:]),
        ("velocity", (S, T, 2, n_coarse, n_coarse), ("section", "t", "xy", "yc", "xc")),
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
                    store, g, ks, B[ks], int(usable.sum()), (2 * f_aff, f_aff), tuple(opts.affine_iterations), rigid
                )
                for ks in affine_batches
            ]
            step = consensus_step(1.0 / usable.sum(), template_moves=affine_template_moves)
            for ks, (found, losses) in zip(affine_batches, ctx.compute(*tasks)):
                for k, Bk, loss in zip(ks, found, losses):
                    if np.all(np.isfinite(Bk)):
                        B[k], affine_loss[k] = B[k] + step * (Bk - B[k]), loss
            if not held:
                B = affine_gauge(B, usable)
            if rigid:  # the gauge's mean correction is not a rotation in general
                from ..kernels.image_align import nearest_rigid

                B = nearest_rigid(B)
            ctx.compute(*[dask.delayed(_apply_affine_task, pure=False)(store, g, k, B[k]) for k in range(S)])
    # raw -> atlas after the affine rounds, then the frame's mean shear removed about the reference centre
    G = np.stack([Q @ B[k] @ Qi @ final[k] for k in range(S)])
    frame = np.eye(3)
    if usable.sum() >= 3 and not held and not rigid:  # two sections' mean shear is mostly their own warps
        frame[:2, :2] = frame_stretch(G[usable][:, :2, :2])
    C_um = affine_matrix(0.0, 1.0, cen[ref]) @ frame @ affine_matrix(0.0, 1.0, -cen[ref])
    G = np.stack([C_um @ G[k] for k in range(S)])
    final_new = G
    to_canvas(np.stack([Qi @ C_um @ Q @ B[k] for k in range(S)]))

    reports = []
    sig = opts.z_sigma_sections
    tw = np.stack([template_weights(S, k, sig, usable) for k in range(S)])
    local = smoothing_weights(S, sig, usable)
    template_moves = [bool(moving[tw[k] != 0].any()) for k in range(S)]
    steps = [consensus_step(local[k, k], template_moves=template_moves[k]) for k in range(S)]
    n_lddmm = opts.lddmm_rounds if usable.sum() >= 2 else 0
    if not any(template_moves[k] for k in np.flatnonzero(moving)):
        n_lddmm = min(n_lddmm, 1)  # every template is held: a second round would only continue the same fit
    # the gauge: each section loses its neighbourhood's shared flow, unless a held reference fixes the frame
    gauge = np.zeros((S, S)) if held else local * usable[:, None]
    lopts = {**opts.to_dict(), "pool": f}
    batches = even_batches([int(k) for k in np.flatnonzero(moving) if tw[k].sum() > 0], opts.batch)
    for r in range(n_lddmm):
        tasks = [
            dask.delayed(_lddmm_task, pure=False)(store, g, ks, tw[ks], [steps[k] for k in ks], r > 0, lopts)
            for ks in batches
        ]
        reports = [rep for done in ctx.compute(*tasks) for rep in done]
        ctx.compute(
            *[
                dask.delayed(_gauge_task, pure=False)(store, g, k, gauge[k], spacing, opts.mass_preserving)
                for k in range(S)
            ]
        )
    scores = (
        np.asarray(ctx.compute(*[dask.delayed(_score_task, pure=False)(store, g, k, tw[k]) for k in range(S)]))
        if S > 1
        else np.zeros((S, 2))
    )
    for name in ("template_sum", "velocity", "flow", "flow_inverse"):
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
    data = {
        "ncc_before": scores[:, 0],
        "ncc_after": scores[:, 1],
        "affine_loss": affine_loss,
        "lddmm_data_before": np.full(S, np.nan),
        "lddmm_data_after": np.full(S, np.nan),
    }
    for rep in reports:
        data["lddmm_data_before"][rep["section"]] = rep["data_before"]
        data["lddmm_data_after"][rep["section"]] = rep["data_after"]
    for name, values in data.items():
        arrays.write_small(qc, name, np.asarray(values, np.float64), ("section",))
    arrays.write_small(qc, "refined", usable, ("section",))
    skipped = [str(atlas.sections.id.iloc[k]) for k in np.flatnonzero(~usable)]
    return {
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
    version=1,
    summary="Group-wise affine consistency, then LDDMM of each section against its neighbours in z.",
    build=_build,
    element="lamina.deformation",
    pipeline="align",
)
refine = STAGE.function
