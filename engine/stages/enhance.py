"""Stage ``enhance``: histology + spot expression -> high-definition expression on a superpixel grid, per
section, tile by tile (what SpaHDmap and SpaMCAF do; no downloaded weights).

Data flow, per section with an image in ``/images``::

    image level (pixel <= superpixel / 4) --map_tiles(image_features, halo from the filter bank)--> features
        [F, h, w] on the superpixel grid (scratch) --map_tiles(context_features, halo 4 sigma)--> context
        [3F, h, w]: each superpixel's features and their means at 1x and 3x the spot radius (scratch)
    context tiles + the spots whose centres fall in them --footprint_means--> spot features [spot, 3F]

Then, for the whole atlas at once (spots are few: a Visium section has <= 5k):

    /X (log-normalised, non-negative) of the model genes --NMF (rank, fitted on <= fit_spots spots)-->
        loadings H [rank, gene] (metagenes) and spot scores W [spot, rank]
    ridge with one unpenalised offset per section: W ~ standardised spot features @ coef + offset
        (the forward-sum objective of a linear head: a spot's mean over its footprint is the head at its mean
        features); residuals r = W - fitted, of the fitted spots only

and back to the tiles:

    context --map_tiles(embedding_block)--> /enhance/<section>/embedding [rank, y, x]: head + the residuals
        spread by a Gaussian of residual_sigma_um (+ with ``project``, each fitted spot's footprint shifted so
        its mean equals its scores) --map_tiles(gene_block)--> genes [gene, y, x] for the genes asked for

``/enhance/cells/scores [cell, rank]``: every spot's (cell's) footprint mean of the embedding; its expression is
``scores @ model/loadings``. Spots left out of the fit (``fit_column``) are predicted, never seen: the
benchmark scores them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import dask
import numpy as np

from ..errors import ConfigError, InputError, MissingInputError, UnknownGeneError, ensure
from ..store import arrays
from ..store.atlas import Atlas
from .contract import Stage, StageContext
from .options import Options, option

log = logging.getLogger("lamina")

#: superpixels per side of a feature / embedding chunk
TILE = 256
#: context scales, in spot radii
CONTEXT_RADII = (1.0, 3.0)
#: gene maps written per run at most (each is [gene, y, x] per section)
MAX_GENE_MAPS = 256


@dataclass(frozen=True)
class EnhanceOptions(Options):
    superpixel_um: float = option(16.0, "side of a superpixel (um): the grid of the enhanced maps", gt=0)
    spot_diameter_um: float | None = option(
        None, "spot diameter (um); null: half the median distance between neighbouring spots (Visium 55 / 100)", gt=0
    )
    rank: int = option(10, "metagenes (NMF rank of the spots): dimensions of /enhance/<section>/embedding", ge=1)
    alpha: float = option(300.0, "ridge penalty of the image head (on standardised features)", ge=0)
    residual_sigma_um: float | None = option(
        None, "Gaussian (um) that spreads the spots' residuals; null: the spot pitch; 0: image head only", ge=0
    )
    project: bool = option(False, "shift each fitted spot's footprint so its mean equals the spot's scores")
    genes: tuple[str, ...] = option((), "genes whose maps [gene, y, x] are written (at most 256)")
    n_genes: int = option(2000, "model genes: the most variable of /X (variance over the spots), plus genes", ge=1)
    fit_column: str | None = option(
        None, "cell column (bool / 0-1): the spots the model is fitted on; the others are predicted only"
    )
    sections: tuple[str, ...] = option((), "sections to enhance; empty: every section with an image")
    fit_spots: int = option(50_000, "spots the NMF is fitted on at most (a fixed random subset)", ge=10)
    seed: int = option(0, "seed of the NMF and of the fit subset")


# ------------------------------------------------------------------------------------------- checks
def _sections(atlas: Atlas, opts: EnhanceOptions) -> list[str]:
    have = atlas.images()
    ids = [str(s) for s in atlas.sections.id]
    if opts.sections:
        missing = [s for s in opts.sections if s not in ids]
        if missing:
            raise InputError(f"enhance: section(s) {missing} are not in {atlas.path}; sections: {', '.join(ids)}")
        lacking = [s for s in opts.sections if s not in have]
        if lacking:
            raise MissingInputError(
                f"enhance: section(s) {lacking} of {atlas.path} have no image; add one with "
                f"lamina.add_image(atlas, section, path, pixel_size_um=...)"
            )
        return list(opts.sections)
    return [s for s in ids if s in have]


def _check(atlas: Atlas, opts: EnhanceOptions) -> None:
    if "X" not in atlas.root or atlas.n_genes == 0:
        raise MissingInputError(f"enhance: {atlas.path} has no expression matrix /X; ingest it with genes=...")
    if not _sections(atlas, opts):
        raise MissingInputError(
            f"enhance: no section of {atlas.path} has an image; ingest with images={{section: path}} or "
            f"lamina.add_image(atlas, section, path, pixel_size_um=...)"
        )
    unknown = [g for g in opts.genes if g not in set(atlas.genes)]
    if unknown:
        raise UnknownGeneError(f"enhance: gene(s) {unknown[:5]} are not in {atlas.path}/genes")
    if len(opts.genes) > MAX_GENE_MAPS:
        raise ConfigError(f"enhance: {len(opts.genes)} gene maps asked for; at most {MAX_GENE_MAPS} per run")
    if opts.fit_column is not None and opts.fit_column not in atlas.cell_columns:
        raise MissingInputError(
            f"enhance: fit_column={opts.fit_column!r} is not a cell column of {atlas.path} "
            f"(columns: {', '.join(atlas.cell_columns)})"
        )


# ------------------------------------------------------------------------------------------ geometry
@dataclass
class _Grid:
    """One section's superpixel grid: the image level it is read from and the map grid (col, row) -> um."""

    section: str
    level: int
    factor: int
    px_um: float
    h: int
    w: int
    grid_to_um: np.ndarray

    @property
    def sp_um(self) -> float:
        return self.px_um * self.factor


def _grid(atlas: Atlas, sid: str, superpixel_um: float) -> _Grid:
    img = atlas.image(sid)
    levels, px0 = img["levels"], img["pixel_size_um"]
    level = 0
    while level + 1 < len(levels) and px0 * 2 ** (level + 1) <= superpixel_um / 4:
        level += 1
    px = px0 * 2**level
    factor = max(1, int(round(superpixel_um / px)))
    _, H, W = levels[level].shape
    to_um = img["image_to_section"] @ np.diag([2.0**level * factor, 2.0**level * factor, 1.0])
    return _Grid(sid, level, factor, px, -(-H // factor), -(-W // factor), to_um)


def _spot_geometry(atlas: Atlas, sections: list[str], opts: EnhanceOptions) -> tuple[float, float]:
    """(spot diameter, spot pitch) in um: the pitch is the median distance to the nearest other spot."""
    from scipy.spatial import cKDTree

    secs = atlas.sections
    d = []
    for sid in sections:
        row = secs[secs.id == sid].iloc[0]
        a, b = int(row.cell_start), int(row.cell_stop)
        if b - a >= 2:
            xy = np.c_[atlas.root["cells/x"][a:b], atlas.root["cells/y"][a:b]].astype(np.float64)
            dist, _ = cKDTree(xy).query(xy, k=2)
            d.append(dist[:, 1])
    pitch = float(np.median(np.concatenate(d))) if d else float("nan")
    if not np.isfinite(pitch) or pitch <= 0:
        if opts.spot_diameter_um is None or opts.residual_sigma_um is None:
            raise InputError(
                f"enhance: the spots of {atlas.path} have no neighbours to measure their pitch from; "
                f"give spot_diameter_um and residual_sigma_um"
            )
        pitch = float(opts.residual_sigma_um)
    diameter = float(opts.spot_diameter_um) if opts.spot_diameter_um is not None else 0.5 * pitch
    return diameter, pitch


# ------------------------------------------------------------------------------------------- tasks
def _spot_features_task(store: str, context: str, centres_sp: np.ndarray, pick: np.ndarray, tile, halo, radius_sp):
    from ..kernels.enhance import footprint_means

    root = arrays.open_root(store, "r")
    arr = root[context]
    _, h, w = arr.shape
    (y0, y1), (x0, x1) = tile
    a0, a1, b0, b1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
    block = np.asarray(arr[:, a0:a1, b0:b1])
    means, count = footprint_means(block, centres_sp, radius_sp, origin=(a0, b0))
    return pick, means, count


def _spot_features(ctx: StageContext, grid: _Grid, context: str, xy_um: np.ndarray, radius_um: float):
    """Footprint means ``[n, F]`` of the context features for the spots at ``xy_um`` (one task per context tile
    holding spot centres) and the spots' centres in superpixels ``[n, 2]``."""
    inv = np.linalg.inv(grid.grid_to_um)
    centres = (np.c_[xy_um, np.ones(len(xy_um))] @ inv.T)[:, :2]
    radius_sp = radius_um / grid.sp_um
    halo = int(math.ceil(radius_sp)) + 2
    ty = np.floor(centres[:, 1] / TILE).astype(np.int64)
    tx = np.floor(centres[:, 0] / TILE).astype(np.int64)
    tasks = []
    for key in sorted(set(zip(ty.tolist(), tx.tolist()))):
        pick = np.flatnonzero((ty == key[0]) & (tx == key[1]))
        tile = ((key[0] * TILE, (key[0] + 1) * TILE), (key[1] * TILE, (key[1] + 1) * TILE))
        tasks.append(
            dask.delayed(_spot_features_task, pure=False)(
                ctx.atlas.path, context, centres[pick], pick, tile, halo, radius_sp
            )
        )
    F = ctx.atlas.root[context].shape[0]
    out = np.full((len(xy_um), F), np.nan)
    count = np.zeros(len(xy_um), np.int64)
    for pick, means, cnt in ctx.compute(*tasks):
        out[pick], count[pick] = means, cnt
    return out, count, centres


def _expression(atlas: Atlas, rows: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """/X at sorted ``rows`` and ``genes`` (small: spots x model genes), float64."""
    X = atlas.root["X"]
    out = np.empty((len(rows), len(genes)))
    chunk = X.chunks[0]
    for c in np.unique(rows // chunk):
        sel = (rows // chunk) == c
        block = np.asarray(X[c * chunk : min(X.shape[0], (c + 1) * chunk)])
        out[sel] = block[rows[sel] - c * chunk][:, genes]
    return out


def _model_genes(atlas: Atlas, rows: np.ndarray, opts: EnhanceOptions) -> np.ndarray:
    """Indices of the model genes: the ``n_genes`` of highest variance over the spots, and ``genes``."""
    X = atlas.root["X"]
    G = X.shape[1]
    s1, s2 = np.zeros(G), np.zeros(G)
    chunk = X.chunks[0]
    for c in np.unique(rows // chunk):
        block = np.asarray(X[c * chunk : min(X.shape[0], (c + 1) * chunk)], np.float64)
        sel = rows[(rows // chunk) == c] - c * chunk
        s1 += block[sel].sum(0)
        s2 += (block[sel] ** 2).sum(0)
    var = s2 / len(rows) - (s1 / len(rows)) ** 2
    top = np.argsort(-var, kind="stable")[: opts.n_genes]
    name = {g: i for i, g in enumerate(atlas.genes)}
    return np.unique(np.concatenate([top, [name[g] for g in opts.genes]]).astype(np.int64))


def _grid_map(ctx: StageContext, grid: _Grid, g, fn, source: str, name: str, channels: int, dim: str, **kw) -> None:
    """``g/<name>`` ``[channels, h, w]`` on the section's superpixel grid (chunks of ``TILE`` superpixels, the
    channels whole), filled from ``source`` by :func:`lamina.map_tiles` (``kw``: its halo, factor, kwargs, ...)."""
    from ..maps import map_tiles

    chunks = (channels, min(TILE, grid.h), min(TILE, grid.w))
    arrays.create(g, name, (channels, grid.h, grid.w), np.float32, chunks, (dim, "y", "x"))
    label = f"enhance: {name} {grid.section}"
    map_tiles(fn, ctx.atlas.path, source, f"{g.path}/{name}", batch_dims=0, client=ctx.client, label=label, **kw)


# -------------------------------------------------------------------------------------------- build
def _build(ctx: StageContext) -> dict:
    from sklearn.decomposition import NMF

    from ..kernels.enhance import (
        N_FEATURES,
        context_features,
        embedding_block,
        fit_ridge,
        footprints,
        gene_block,
        image_features,
        residual_field,
    )
    from ..store.elements import EnhanceSectionV1

    atlas, opts, group = ctx.atlas, ctx.options, ctx.group
    sections = _sections(atlas, opts)
    diameter, pitch = _spot_geometry(atlas, sections, opts)
    radius_um = diameter / 2
    sigma_um = pitch if opts.residual_sigma_um is None else float(opts.residual_sigma_um)
    secs = atlas.sections
    grids: dict[str, _Grid] = {}
    spot_rows, spot_sec, spot_feat, spot_centres, spot_xy = [], [], [], [], []
    n_ctx = N_FEATURES * (1 + len(CONTEXT_RADII))
    for si, sid in enumerate(sections):
        grid = grids[sid] = _grid(atlas, sid, opts.superpixel_um)
        g = group.create_group(sid)
        image = f"images/{sid}/{grid.level}"
        features = {"px_um": grid.px_um, "factor": grid.factor}
        _grid_map(
            ctx, grid, g, image_features, image, "features", N_FEATURES, "feature", factor=grid.factor, kwargs=features
        )
        sig_sp = {"sigmas_sp": tuple(k * radius_um / grid.sp_um for k in CONTEXT_RADII)}
        _grid_map(ctx, grid, g, context_features, f"{g.path}/features", "context", n_ctx, "feature", kwargs=sig_sp)
        row = secs[secs.id == sid].iloc[0]
        a, b = int(row.cell_start), int(row.cell_stop)
        if b - a == 0:
            raise InputError(f"enhance: section {sid!r} of {atlas.path} has no spots; leave it out with sections=")
        xy = np.c_[atlas.root["cells/x"][a:b], atlas.root["cells/y"][a:b]].astype(np.float64)
        feat, count, centres = _spot_features(ctx, grid, f"{g.path}/context", xy, radius_um)
        outside = count == 0
        if outside.mean() > 0.05:
            img = atlas.image(sid)
            raise InputError(
                f"enhance: {int(outside.sum())} of {b - a} spots of section {sid!r} lie outside its image "
                f"({img['source'] or 'images/' + sid}, {grid.w * grid.factor} x {grid.h * grid.factor} px at level "
                f"{grid.level}): the image or its pixel size / image_to_section does not match the spots; fix "
                f"them with lamina.add_image(atlas, {sid!r}, path, pixel_size_um=... | image_to_section=...)"
            )
        spot_rows.append(np.arange(a, b))
        spot_sec.append(np.full(b - a, si))
        spot_feat.append(feat)
        spot_centres.append(centres)
        spot_xy.append(xy)
    rows = np.concatenate(spot_rows)
    sec = np.concatenate(spot_sec)
    Zraw = np.concatenate(spot_feat)
    centres_all, xy_all = np.concatenate(spot_centres), np.concatenate(spot_xy)
    usable = np.isfinite(Zraw).all(1)
    fit = usable.copy()
    if opts.fit_column is not None:
        fit &= np.asarray(atlas.root[f"cells/{opts.fit_column}"][...])[rows].astype(bool)
    if fit.sum() < max(opts.rank + 2, 10):
        raise InputError(
            f"enhance: only {int(fit.sum())} spots to fit on (inside the images"
            f"{', with ' + opts.fit_column if opts.fit_column else ''}); need at least {max(opts.rank + 2, 10)}"
        )

    # expression and metagenes
    gene_idx = _model_genes(atlas, rows[fit], opts)
    Y = _expression(atlas, rows, gene_idx)
    bad = ~np.isfinite(Y) | (Y < 0)
    if bad[fit].any():
        raise InputError(
            f"enhance: /X of {atlas.path} holds negative or non-finite values (first at row "
            f"{int(rows[fit][np.argmax(bad[fit].any(1))])}); enhance needs counts or log-normalised expression "
            f"(ingest with normalize='log1p', not scaled values)"
        )
    rng = np.random.default_rng(opts.seed)
    fit_idx = np.flatnonzero(fit)
    nmf_idx = np.sort(rng.choice(fit_idx, min(len(fit_idx), opts.fit_spots), replace=False))
    rank = min(opts.rank, len(gene_idx), len(nmf_idx))
    nmf = NMF(rank, init="nndsvda", max_iter=1000, random_state=opts.seed).fit(Y[nmf_idx])
    H = nmf.components_
    W = np.zeros((len(rows), rank))
    W[fit] = nmf.transform(Y[fit])

    # the image head
    mean, scale = Zraw[fit].mean(0), Zraw[fit].std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    Z = np.where(usable[:, None], (np.nan_to_num(Zraw) - mean) / scale, 0.0)
    coef, offsets = fit_ridge(Z[fit], W[fit], sec[fit], len(sections), opts.alpha)
    head = Z @ coef + offsets[sec]
    resid = np.where(fit[:, None], W - head, 0.0)
    r2 = 1 - ((W[fit] - head[fit]) ** 2).sum() / max(((W[fit] - W[fit].mean(0)) ** 2).sum(), 1e-30)

    # per section: the embedding (and genes); the spots' scores = footprint means of the embedding
    scores = np.full((len(rows), rank), np.nan)
    gene_pos = {g: i for i, g in enumerate(atlas.genes[gene_idx])}
    maps = [gene_pos[g] for g in opts.genes]
    for si, sid in enumerate(sections):
        grid, g = grids[sid], group[sid]
        m = sec == si
        fm = fit & m
        spots_um = xy_all[fm]
        radius_sp = radius_um / grid.sp_um
        centres = centres_all[m]
        # the mean of the residual field over each spot's footprint (the head's mean is linear: head[m])
        rr, cc, inside = footprints(centres, radius_sp, grid.h, grid.w)
        pts = np.stack([cc + 0.5, rr + 0.5, np.ones_like(rr, dtype=float)], -1) @ grid.grid_to_um.T
        field = residual_field(pts[..., :2].reshape(-1, 2), spots_um, resid[fm], sigma_um) if sigma_um > 0 else None
        if field is None:
            field_mean = np.zeros((int(m.sum()), rank))
        else:
            field = field.reshape(*rr.shape, rank)
            with np.errstate(invalid="ignore"):
                field_mean = (field * inside[..., None]).sum(1) / inside.sum(1)[:, None]
        before = head[m] + field_mean
        shift = np.where(fit[m][:, None], W[m] - before, 0.0) if opts.project else None
        scores[m] = before + (shift if shift is not None else 0.0)
        _grid_map(
            ctx,
            grid,
            g,
            embedding_block,
            f"{g.path}/context",
            "embedding",
            rank,
            "metagene",
            halo=0,
            with_origin=True,
            kwargs={
                "mean": mean,
                "scale": scale,
                "coef": coef,
                "offset": offsets[si],
                "grid_to_um": grid.grid_to_um,
                "spots_um": spots_um if sigma_um > 0 else np.zeros((0, 2)),
                "residuals": resid[fm],
                "sigma_um": max(sigma_um, 1e-9),
                "prior": 0.1,
                "centres_sp": centres[fit[m]] if opts.project else None,
                "radius_sp": radius_sp,
                "shift": shift[fit[m]] if shift is not None else None,
            },
        )
        if maps:
            loadings = {"loadings": H[:, maps]}
            _grid_map(
                ctx, grid, g, gene_block, f"{g.path}/embedding", "genes", len(maps), "gene", halo=0, kwargs=loadings
            )
            arrays.write_small(g, "gene", np.asarray(list(opts.genes), dtype=str), ("gene",))
        del g["features"], g["context"]
        g.attrs.update(
            {
                "section": sid,
                "superpixel_um": grid.sp_um,
                "grid_to_section": grid.grid_to_um.tolist(),
                "image_level": grid.level,
                "pixels_per_superpixel": grid.factor,
                "spot_radius_um": radius_um,
            }
        )
        EnhanceSectionV1.stamp(g)

    n, chunk = atlas.n_cells, atlas.cell_chunk
    cells = group.create_group("cells")
    target = arrays.create(cells, "scores", (n, rank), np.float32, (chunk, rank), ("cell", "metagene"))
    fitted = arrays.create(cells, "fitted", (n,), bool, (chunk,), ("cell",))
    for a in range(0, n, chunk):  # whole chunks, in order; rows of sections not enhanced stay NaN
        b = min(n, a + chunk)
        block, flag = np.full((b - a, rank), np.nan, np.float32), np.zeros(b - a, bool)
        sel = (rows >= a) & (rows < b)
        block[rows[sel] - a] = scores[sel]
        flag[rows[sel] - a] = fit[sel]
        target[a:b], fitted[a:b] = block, flag
    model = group.create_group("model")
    arrays.write_small(model, "loadings", H.astype(np.float32), ("metagene", "gene"))
    arrays.write_small(model, "gene", np.asarray(atlas.genes[gene_idx], dtype=str), ("gene",))
    arrays.write_small(model, "feature_mean", mean, ("feature",))
    arrays.write_small(model, "feature_scale", scale, ("feature",))
    arrays.write_small(model, "coef", coef, ("feature", "metagene"))
    arrays.write_small(model, "offsets", offsets, ("section", "metagene"))
    arrays.write_small(model, "section", np.asarray(sections, dtype=str), ("section",))
    group.attrs.update(
        {
            "sections": sections,
            "spot_diameter_um": diameter,
            "spot_pitch_um": pitch,
            "residual_sigma_um": sigma_um,
            "rank": rank,
        }
    )
    ensure(np.isfinite(scores[usable]).all(), "enhance: a spot inside its image has no score")
    return {
        "sections": len(sections),
        "spots_fitted": int(fit.sum()),
        "spots_predicted": int((usable & ~fit).sum()),
        "model_genes": len(gene_idx),
        "rank": rank,
        "head_r2": round(float(r2), 4),
    }


STAGE = Stage(
    name="enhance",
    output="enhance",
    inputs=(),
    options=EnhanceOptions,
    version=1,
    summary=(
        "Histology-guided high-definition expression: weight-free H&E features per superpixel, NMF metagenes of the "
        "spots, a ridge head fitted by the forward-sum objective plus the spots' residuals spread by a Gaussian "
        "-> /enhance/<section>/embedding [rank, y, x] (+ gene maps), /enhance/cells/scores."
    ),
    build=_build,
    element="lamina.enhance",
    pipeline="enhance",
    check=_check,
)
enhance = STAGE.function
