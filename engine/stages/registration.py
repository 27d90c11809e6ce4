"""Stage ``register``: serial sections -> one 3D frame (affine part).

Data flow::

    /raster/cells --(a task per batch of pairs: k with its neighbour towards the reference, k with the next one)-->
        feature matches (kornia SIFT + mutual NN + ratio,  -> RANSAC similarity    } candidates, each refined
          or LoFTR with local weights)
        rotation search by FFT cross-correlation (needs no features)                } by Adam on the image loss;
                                                                                      the lower loss wins
                                                                                      (one batched fit per task)
    pair estimates --(joint least squares, reference = middle section or the one named)--> section affines
        -> /transforms

Every pair gets a QC row (method, matches, inliers, correlation before/after, overlap, flag with a reason).
A pair that cannot be registered (blank or tiny section) is flagged, gets no weight in the joint solve,
and its section follows its neighbours; no transform is ever NaN.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Literal

import dask
import numpy as np

from ..cluster import even_batches, task_device
from ..errors import InputError, ensure
from ..kernels.consistency import chain, joint_affines
from ..kernels.geometry import affine_matrix
from ..kernels.ransac import ransac
from ..kernels.raster import normalise_density, tissue_points
from ..store import arrays
from ..store.arrays import open_root
from ..store.atlas import Atlas
from .contract import PlanContext, Stage, StageContext
from .options import Options, option
from .rasterize import pixel_to_um


@dataclass(frozen=True)
class RegisterOptions(Options):
    reference: str | int | None = option(
        None,
        "a section id to hold fixed and align every other section onto; "
        "null: none is privileged (the frame is the middle section's)",
    )
    reflect: bool = option(False, "also try mirrored sections")
    rotation_step_deg: float = option(4.0, "angle step of the FFT rotation search (degrees)", gt=0)
    min_inliers: int = option(8, "RANSAC inliers a feature match needs to be used", ge=1)
    ransac_px: float = option(2.5, "RANSAC inlier distance (canvas pixels)", gt=0)
    iterations: tuple[int, ...] = option(
        (120, 60, 25), "Adam steps of the affine refinement per scale (coarse to fine)", ge=0
    )
    skip_pairs: bool = option(True, "also register each section with the one two away, for the joint solve")
    min_overlap: float = option(0.5, "QC flag below this tissue overlap after alignment", ge=0, le=1)
    min_ncc: float = option(0.3, "QC flag below this correlation after alignment", le=1)
    rigid: bool = option(False, "rotation + translation only (data of known pixel size); refine's affine rounds follow")
    scale_range: tuple[float, ...] = option(
        (0.8, 1.25), "QC flag when a pair's scale (sqrt det) is outside this range (min, max)", gt=0
    )
    max_anisotropy: float = option(1.3, "QC flag above this ratio of a pair's stretches (shear)", ge=1)
    max_rotation_deg: float | None = option(
        None, "QC flag above this rotation between neighbours (null: none; slides are often mounted at any angle)", ge=0
    )
    ambiguous_loss: float = option(
        0.05, "QC flag when the other candidate's loss is within this share and its transform differs", ge=0
    )
    min_mass_ratio: float = option(
        0.02,
        "a section with less than this share of its partner's cells is not registered (placed by its neighbours)",
        ge=0,
    )
    matcher: Literal["sift", "loftr"] = option(
        "sift", "feature matcher: kornia SIFT, or LoFTR from matcher_weights (nothing is downloaded)"
    )
    matcher_weights: str | None = option(None, "local LoFTR weights file every worker can read")
    batch: int = option(4, "pairs fitted as one batch per task (16-32 on GPU workers)", ge=1)


def _normalised(img: np.ndarray):
    import torch

    return torch.from_numpy(normalise_density(img)).double()


def register_pair(moving: np.ndarray, fixed: np.ndarray, opts: RegisterOptions, seed: int = 0, device=None) -> dict:
    """Affine ``moving -> fixed`` (pixel coordinates) of two ``[C, H, W]`` rasters plus QC numbers; the image
    work runs on ``device`` (default: :func:`lamina.cluster.task_device`)."""
    return register_pairs([(moving, fixed)], opts, [seed], device)[0]


def _candidates(m, f, opts: RegisterOptions, seed: int, row: dict) -> list[tuple[str, np.ndarray]]:
    """Starting transforms for the refinement: feature matches + RANSAC (when enough inliers), and the
    rotation search, which needs no features. Fills the match counts (and a flag) of ``row``."""
    from ..kernels.features import correspondences, loftr_correspondences
    from ..kernels.image_align import rotation_search

    candidates = []
    try:
        if opts.matcher == "loftr":
            model = load_loftr(opts.matcher_weights, f.device)
            src, dst = loftr_correspondences(f, m, model, reflect=opts.reflect)
        else:
            src, dst = correspondences(f, m, reflect=opts.reflect)
        row["n_matches"] = len(src)
        if len(src) >= opts.min_inliers:
            T, inl = ransac(src, dst, opts.ransac_px, "similarity", opts.reflect, seed=seed)
            row["n_inliers"] = int(inl.sum())
            if inl.sum() >= opts.min_inliers:
                candidates.append(("features", T))
    except RuntimeError as exc:  # kornia fails on images with no scale-space extrema
        row["flag"] = f"feature extraction failed: {exc}"[:200]
    search = rotation_search(f, m, opts.rotation_step_deg, opts.reflect)
    candidates.append(("rotation_search", search["transform"]))
    return candidates


def register_pairs(
    pairs: list[tuple[np.ndarray, np.ndarray]], opts: RegisterOptions, seeds: list[int], device=None
) -> list[dict]:
    """:func:`register_pair` for several ``(moving, fixed)`` pairs of one canvas size: features and the
    rotation search pair by pair, then the gradient refinement of every pair's candidates as one batch
    (:func:`refine_affine_batch`; each candidate gets what it would get alone)."""
    import torch

    from ..kernels.image_align import ncc, refine_affine_batch

    dev = device or task_device()
    rows, work = [], []
    for i, ((moving, fixed), seed) in enumerate(zip(pairs, seeds)):
        torch.manual_seed(seed)
        row = {
            "method": "none",
            "n_matches": 0,
            "n_inliers": 0,
            "loss": float("nan"),
            "ncc_before": 0.0,
            "ncc_after": 0.0,
            "overlap": 0.0,
            "flag": "",
            "transform": np.eye(3),
        }
        rows.append(row)
        mass_m, mass_f = float(moving.sum()), float(fixed.sum())
        if min(mass_m, mass_f) < max(5.0, opts.min_mass_ratio * max(mass_m, mass_f)):
            row["flag"] = (
                f"blank or tiny section ({mass_m:.0f} vs {mass_f:.0f} cells on the canvas); not "
                f"registered, placed by its neighbours"
            )
            continue
        m, f = _normalised(moving).to(dev), _normalised(fixed).to(dev)
        row["ncc_before"] = ncc(m, f)
        work.extend((i, m, f, name, T) for name, T in _candidates(m, f, opts, seed, row))
    if not work:
        return rows
    found, losses = refine_affine_batch(
        torch.stack([w[2] for w in work]),
        torch.stack([w[1] for w in work]),
        np.stack([w[4] for w in work]),
        iterations=tuple(opts.iterations),
        rigid=opts.rigid,
    )
    best: dict[int, tuple] = {}
    tried: dict[int, list] = {}
    for (i, m, f, name, _), A, loss in zip(work, found, losses):
        if np.all(np.isfinite(A)) and np.isfinite(loss):
            tried.setdefault(i, []).append((float(loss), A))
            if i not in best or loss < best[i][3]:
                best[i] = (m, f, name, float(loss), A)
    for i in {w[0] for w in work} - best.keys():
        rows[i]["flag"] = "no finite transform"
    for i, (m, f, name, loss, A) in best.items():
        rows[i].update(method=name, transform=A, loss=loss)
        _qc(rows[i], m, f, A, opts, [(lo, B) for lo, B in tried[i] if B is not A])
    return rows


def _qc(row: dict, m, f, A: np.ndarray, opts: RegisterOptions, others=()) -> None:
    """QC numbers and flags of a registered pair (``A``: moving -> fixed pixels; ``others``: the other
    candidates' (loss, transform)). A flag says the chosen transform is doubtful: little overlap or correlation
    after alignment, or another candidate nearly as good that puts the tissue elsewhere. Which candidate won
    is information (``method``), not a flag."""
    import torch

    from ..kernels.image_align import ncc, warp_image

    warped = warp_image(m[None], torch.from_numpy(A).to(m.device)[None])[0]
    row["ncc_after"] = ncc(warped, f)
    # both ways: moving mass landing on fixed tissue, and fixed mass covered by the warped moving tissue
    on_fixed = float(warped.sum(0)[f.sum(0) > 0.25].sum() / warped.sum().clamp_min(1e-12))
    covered = float(f.sum(0)[warped.sum(0) > 0.25].sum() / f.sum().clamp_min(1e-12))
    row["overlap"] = min(on_fixed, covered)
    reasons = []
    tissue = torch.nonzero(m.sum(0) > 0.25).double().flip(-1).cpu().numpy()  # (x, y) pixels of moving tissue
    if len(tissue):
        pts = np.c_[tissue, np.ones(len(tissue))]
        size = float(np.ptp(tissue, 0).max()) + 1.0
        for loss, B in others:
            apart = float(np.median(np.linalg.norm((pts @ (B - A).T)[:, :2], axis=1)))
            if loss <= row["loss"] * (1 + opts.ambiguous_loss) + 1e-12 and apart > 0.1 * size:
                reasons.append(
                    f"ambiguous: another candidate fits as well (loss {loss:.3g} vs {row['loss']:.3g}) and "
                    f"places the tissue {apart / size:.0%} of its size elsewhere"
                )
    if row["overlap"] < opts.min_overlap:
        reasons.append(f"low overlap after alignment ({row['overlap']:.2f})")
    if row["ncc_after"] < opts.min_ncc:
        reasons.append(f"low correlation after alignment ({row['ncc_after']:.2f})")
    row["flag"] = "; ".join(reasons) if reasons else row["flag"]


def implausible(M: np.ndarray, opts: RegisterOptions, adjacent: bool) -> list[str]:
    """Reasons to doubt a pair's transform ``M`` (3x3, moving -> fixed um) as anatomy: serial sections of one
    specimen differ little in size and are not sheared; a large turn between neighbours is possible (slides
    placed by hand) but worth a look. Empty when none applies."""
    L = np.asarray(M, np.float64)[:2, :2]
    U, sv, Vt = np.linalg.svd(L)
    scale = float(np.sqrt(abs(np.linalg.det(L))))
    R = U @ Vt
    turn = float(np.degrees(abs(np.arctan2(R[1, 0] - R[0, 1], R[0, 0] + R[1, 1]))))
    lo, hi = (list(opts.scale_range) + [np.inf])[:2]
    out = []
    if not lo <= scale <= hi:
        out.append(f"implausible scale {scale:.2f} (outside {lo:g}-{hi:g}: another specimen, or wrong units?)")
    if sv[0] / max(sv[1], 1e-12) > opts.max_anisotropy:
        out.append(f"implausible shear (stretch ratio {sv[0] / sv[1]:.2f} > {opts.max_anisotropy:g})")
    if adjacent and opts.max_rotation_deg is not None and turn > opts.max_rotation_deg:
        out.append(f"large rotation between neighbours ({turn:.0f} deg > {opts.max_rotation_deg:g})")
    return out


def _pairs_task(store: str, raster: str, pairs: list[tuple[int, int]], opts: RegisterOptions) -> list[dict]:
    root = open_root(store, "r")
    images = root[raster]
    rows = register_pairs(
        [(np.asarray(images[k]), np.asarray(images[j])) for k, j in pairs], opts, [k * 1000 + j for k, j in pairs]
    )
    for row, (k, j) in zip(rows, pairs):
        row.update(moving=k, fixed=j)
    return rows


def plan_pairs(n: int, reference: int, skip: bool) -> list[tuple[int, int]]:
    """(moving, fixed) pairs: each section with its neighbour towards the reference, then k with k+2."""
    pairs = [(k, k - 1) for k in range(reference + 1, n)] + [(k, k + 1) for k in range(reference - 1, -1, -1)]
    if skip:
        pairs += [(k, k - 2) for k in range(reference + 2, n)] + [(k, k + 2) for k in range(reference - 2, -1, -1)]
        if 0 < reference < n - 1:
            pairs.append((reference + 1, reference - 1))
    return pairs


def load_loftr(weights: str, device=None):
    """kornia's LoFTR built from the weights of a local file (``torch.load(weights_only=True)``: a state_dict,
    or the published checkpoint ``{"state_dict": ...}``); lamina never downloads weights. Built inside the
    task that needs it and cached per worker process and file version, so a worker reads the file once."""
    stat = os.stat(weights)
    return _cached_loftr(str(weights), stat.st_mtime_ns, stat.st_size, str(device or "cpu"))


@functools.lru_cache(maxsize=2)
def _cached_loftr(weights: str, _mtime: int, _size: int, device: str):
    import torch
    from kornia.feature import LoFTR

    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = LoFTR(pretrained=None)
    model.load_state_dict(state)
    return model.eval().to(device)


def _resolve(atlas: Atlas, opts: RegisterOptions, context: PlanContext) -> RegisterOptions:
    """A reference given as a number (YAML ``reference: 3``) is the section id ``"3"``."""
    return opts.replace(reference=str(opts.reference)) if isinstance(opts.reference, int) else opts


def _check(atlas: Atlas, opts: RegisterOptions) -> None:
    """The reference section exists; a LoFTR matcher has a local weights file that loads (checked once here,
    before any task runs)."""
    ids = [str(i) for i in atlas.sections.id]
    if opts.reference is not None and str(opts.reference) not in ids:
        raise InputError(
            f"register: reference section {opts.reference!r} is not in the atlas {atlas.path} "
            f"(sections: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''})"
        )
    if opts.matcher != "loftr":
        return
    path = opts.matcher_weights
    if not path:
        raise InputError(
            "register: matcher='loftr' needs matcher_weights, the path of a local LoFTR weights file "
            "(lamina downloads nothing); every worker must be able to read it"
        )
    try:
        load_loftr(str(path))
    except FileNotFoundError as exc:
        raise InputError(f"register: LoFTR weights {path} do not exist") from exc
    except Exception as exc:  # torch.load / load_state_dict: not a LoFTR state_dict, truncated, not torch at all
        raise InputError(
            f"register: {path} is not a usable LoFTR weights file ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


def _build(ctx: StageContext) -> dict:
    """Register all sections (affine) into the frame of one reference section; writes ``/transforms``.

    ``reference``: a section id (the atlas frame is that section's own raw frame and ``refine`` holds it
    fixed, every other section is aligned onto it); None: the middle section, with the sections' mean
    scale, and ``refine`` treats all sections alike.
    """
    atlas, opts, group = ctx.atlas, ctx.options, ctx.group
    ids = [str(i) for i in atlas.sections.id]
    raster = atlas.root["raster"]
    S = atlas.n_sections
    held = opts.reference is not None
    ref = ids.index(str(opts.reference)) if held else S // 2
    P = pixel_to_um(raster)
    Pinv = np.linalg.inv(P)
    pairs = plan_pairs(S, ref, opts.skip_pairs)
    tasks = [
        dask.delayed(_pairs_task, pure=False)(atlas.path, "raster/cells", batch, opts)
        for batch in even_batches(pairs, opts.batch)
    ]
    rows = [row for done in ctx.compute(*tasks) for row in done]
    for r in rows:
        r["affine_um"] = P @ r["transform"] @ Pinv
        if r["method"] != "none":
            doubts = implausible(r["affine_um"], opts, adjacent=abs(r["moving"] - r["fixed"]) == 1)
            r["flag"] = "; ".join([r["flag"], *doubts] if r["flag"] else doubts)
    step = {r["moving"]: r["affine_um"] for r in rows[: S - 1]}
    prior = chain(S, ref, step)
    cells = raster["cells"]
    eqs = []
    for r in rows:
        # partial sections still constrain their neighbours, less so the less they overlap
        trust = min(1.0, r["overlap"] / opts.min_overlap) ** 2 if r["method"] != "none" else 0.0
        w = (1.0 if abs(r["moving"] - r["fixed"]) == 1 else 0.5) * trust
        eqs.append((r["moving"], r["fixed"], r["affine_um"], w, tissue_points(np.asarray(cells[r["moving"]]), P)))
    G = joint_affines(S, ref, eqs, prior) if S > 1 else prior
    if opts.rigid:  # the joint least squares of rigid pairs is rigid only up to its residuals
        from ..kernels.image_align import nearest_rigid

        G = nearest_rigid(G)
    elif not held:  # the atlas frame takes the sections' mean scale, not the middle section's own (+-10% is common)
        mean_scale = float(np.exp(np.mean(np.log(np.sqrt(np.abs(np.linalg.det(G[:, :2, :2])))))))
        G = np.diag([1 / mean_scale, 1 / mean_scale, 1.0]) @ G
    centroid = np.asarray(raster["centroid"][...])
    back = affine_matrix(0.0, 1.0, centroid[ref])  # atlas frame: the reference section's raw position
    final = np.stack([back @ G[k] @ affine_matrix(0.0, 1.0, -centroid[k]) for k in range(S)])
    ensure(bool(np.all(np.isfinite(final))), "register produced a non-finite transform")
    arrays.write_small(
        group,
        "affine",
        final,
        ("section", "i", "j"),
        {
            "maps": "raw (x, y, 1) um -> atlas (x, y, 1) um",
            "reference": int(ref),
            "reference_held": held,
            "rigid": bool(opts.rigid),
        },
    )
    qc = group.create_group("pairs")
    for name in ("moving", "fixed", "n_matches", "n_inliers"):
        arrays.write_small(qc, name, np.array([r[name] for r in rows], np.int64), ("pair",))
    for name in ("loss", "ncc_before", "ncc_after", "overlap"):
        arrays.write_small(qc, name, np.array([r[name] for r in rows], np.float64), ("pair",))
    for name in ("method", "flag"):
        arrays.write_small(qc, name, np.array([r[name] for r in rows], dtype=str), ("pair",))
    arrays.write_small(
        qc,
        "affine_um",
        np.stack([r["affine_um"] for r in rows]) if rows else np.zeros((0, 3, 3)),
        ("pair", "i", "j"),
        {"maps": "moving section-centred um -> fixed section-centred um"},
    )
    flagged = [
        f"{atlas.sections.id.iloc[r['moving']]}->{atlas.sections.id.iloc[r['fixed']]}: {r['flag']}"
        for r in rows
        if r["flag"]
    ]
    return {
        "reference": int(ref),
        "reference_held": held,
        "n_pairs": len(rows),
        "n_flagged": len(flagged),
        "flagged": flagged[:20],
    }


STAGE = Stage(
    name="register",
    output="transforms",
    inputs=("rasterize",),
    options=RegisterOptions,
    version=1,
    summary="Affine registration of the sections into one frame: pairwise fits, then one joint solve.",
    build=_build,
    element="lamina.transforms",
    pipeline="align",
    check=_check,
    resolve=_resolve,
)
register = STAGE.function
