"""Stage ``enhance``: histology + spot expression -> high-definition expression on a superpixel grid, per
section, tile by tile (what SpaHDmap and SpaMCAF do; no downloaded weights). Reads the image features of stage
``histology`` (:mod:`lamina.stages.histology`); ``lamina.enhance`` is the pipeline histology -> enhance, this
module's ``enhance`` (``lamina.stages.enhance``) the stage alone.

For the whole atlas at once (spots are few: a Visium section has <= 5k)::

    /X (log-normalised, non-negative) of the model genes --NMF (rank, fitted on <= fit_spots spots)-->
        loadings H [rank, gene] (metagenes) and spot scores W [spot, rank]
    W of the fitted spots --Gaussian means at neighbour_pitches, each spot left out of its own--> neighbour
        features N [spot, rank x widths] (what the spots around a place say about it)
    /histology/cells/features, N --ridge, one unpenalised offset per section--> W ~ standardised features @ coef
        + standardised N @ neighbour_coef + offset: the forward-sum objective of a linear head (a spot's mean
        over its footprint is the head at its footprint-mean features), one penalty for the image and one for
        the neighbours, chosen by cross-validation over folds of spatial blocks that are hidden from N as well;
        residuals r = W - fitted, of the fitted spots only

and per section, tile by tile::

    /histology/<section>/features --map_tiles(embedding_block)--> /enhance/<section>/embedding [rank, y, x]:
        head (image + the neighbour features of each superpixel) + the residuals spread by a Gaussian of
        residual_sigma_um (each width interpolated from a lattice of nodes a quarter of its sigma apart, on the
        section's global grid) (+ with ``project``, each fitted spot's
        footprint shifted so its mean equals its scores) --map_tiles(gene_block)--> genes [gene, y, x]

``/enhance/cells/scores [cell, rank]``: every spot's (cell's) footprint mean of the embedding; its expression is
``scores @ model/loadings``. Spots left out of the fit (``fit_column``) are predicted, never seen: the
benchmark scores them. Cells given apart from the spots (a segmentation of the image): ``lamina.enhance_cells``
(:mod:`lamina.enhance_cells`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InputError, MissingInputError, UnknownGeneError, ensure
from ..store import arrays
from ..store.atlas import Atlas
from .contract import Stage, StageContext
from .options import Options, option

log = logging.getLogger("lamina")

#: gene maps written per run at most (each is [gene, y, x] per section)
MAX_GENE_MAPS = 256
#: genes per chunk (and per task) of the gene maps: a 256 x 256 tile of 16 genes is 4 MiB
GENE_CHUNK = 16
#: weight of "no residual" in the residual field (a spot at ~2.1 sigma weighs as much)
PRIOR = 0.1
#: ridge penalties tried by alpha=null (cross-validated error, closed form)
ALPHAS = tuple(10.0**k for k in range(-1, 7))
#: folds (of whole spatial blocks) that choose the penalties when the head has a neighbour block
CV_FOLDS = 10
#: residual spreads tried by residual_sigma_um=null, in spot pitches (0: none)
SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class EnhanceOptions(Options):
    rank: int = option(10, "metagenes (NMF rank of the spots): dimensions of /enhance/<section>/embedding", ge=1)
    alpha: float | None = option(
        None,
        "ridge penalty of the image features in the head (standardised); null: the least cross-validated error, "
        "spots left out in blocks of cv_block_pitches (the neighbour block's penalty is always chosen so)",
        ge=0,
    )
    cv_block_pitches: float = option(
        3.0,
        "side (spot pitches) of the square blocks of spots left out together when alpha is chosen; 0: one spot at "
        "a time (version 1)",
        ge=0,
    )
    neighbour_pitches: tuple[float, ...] = option(
        (0.75, 1.5, 3.0),
        "Gaussian widths (spot pitches) at which the fitted spots' metagene scores, smoothed around each place, join "
        "the image features in the head (a fitted spot is left out of its own when the head is fitted); (): the image "
        "alone (version 2)",
    )
    residual_sigma_um: float | None = option(
        None,
        "Gaussian (um) that spreads the spots' residuals; null: the least leave-one-out error of 0.5-3 spot pitches "
        "(or none); 0: the image head only",
        ge=0,
    )
    project: bool = option(
        False,
        "shift each fitted spot's footprint so its mean equals its scores (embedding) and its measurement (gene maps, "
        "cells/residuals)",
    )
    genes: tuple[str, ...] = option((), "genes whose maps [gene, y, x] are written (at most 256)")
    n_genes: int = option(2000, "model genes: the most variable of /X (variance over the spots), plus genes", ge=1)
    fit_column: str | None = option(
        None, "cell column (bool / 0-1): the spots the model is fitted on; the others are predicted only"
    )
    fit_spots: int = option(50_000, "spots the NMF is fitted on at most (a fixed random subset)", ge=10)
    seed: int = option(0, "seed of the NMF and of the fit subset")
    seeds: int = option(
        1,
        "NMF models combined: each fitted on a bootstrap sample of the spots (seeds seed, seed + 1, ...), their "
        "metagenes side by side with loadings / seeds, so the gene maps are the models' mean; rank x seeds "
        "dimensions in the embedding",
        ge=1,
    )


# ------------------------------------------------------------------------------------------- checks
def _check(atlas: Atlas, opts: EnhanceOptions) -> None:
    if "X" not in atlas.root or atlas.n_genes == 0:
        raise MissingInputError(f"enhance: {atlas.path} has no expression matrix /X; ingest it with genes=...")
    if not atlas.images():
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


# ---------------------------------------------------------------------------------------- expression
def read_expression(atlas: Atlas, rows: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """/X at sorted ``rows`` and ``genes`` (small: spots x model genes), float64, read chunk by chunk."""
    X = atlas.root["X"]
    out = np.empty((len(rows), len(genes)))
    chunk = X.chunks[0]
    for c in np.unique(rows // chunk):
        sel = (rows // chunk) == c
        block = arrays.read_columns(X, c * chunk, min(X.shape[0], (c + 1) * chunk), genes)
        out[sel] = block[rows[sel] - c * chunk]
    return out


def _model_genes(atlas: Atlas, rows: np.ndarray, opts: EnhanceOptions) -> np.ndarray:
    """Indices of the model genes: the ``n_genes`` of highest variance over the spots ``rows``, and ``genes``."""
    X = atlas.root["X"]
    G = X.shape[1]
    s1, s2 = np.zeros(G), np.zeros(G)
    chunk = X.chunks[0]
    for c in np.unique(rows // chunk):
        sel = rows[(rows // chunk) == c] - c * chunk
        for g0, g1, block in arrays.column_blocks(X, c * chunk, min(X.shape[0], (c + 1) * chunk)):
            s1[g0:g1] += block[sel].sum(0)
            s2[g0:g1] += (block[sel] ** 2).sum(0)
    var = s2 / len(rows) - (s1 / len(rows)) ** 2
    top = np.argsort(-var, kind="stable")[: opts.n_genes]
    name = {g: i for i, g in enumerate(atlas.genes)}
    return np.unique(np.concatenate([top, [name[g] for g in opts.genes]]).astype(np.int64))


def _spots(atlas: Atlas, sections: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The enhanced sections' spots: rows, section position, xy (um) and footprint features ``[spot, F]``."""
    secs = atlas.sections
    feats = atlas.root["histology/cells/features"]
    rows, sec, xy, F = [], [], [], []
    for si, sid in enumerate(sections):
        row = secs[secs.id == sid].iloc[0]
        a, b = int(row.cell_start), int(row.cell_stop)
        rows.append(np.arange(a, b))
        sec.append(np.full(b - a, si))
        xy.append(np.c_[atlas.root["cells/x"][a:b], atlas.root["cells/y"][a:b]].astype(np.float64))
        F.append(np.asarray(feats[a:b], np.float64))
    return np.concatenate(rows), np.concatenate(sec), np.concatenate(xy), np.concatenate(F)


# -------------------------------------------------------------------------------------------- build
def _metagenes(Y: np.ndarray, fit: np.ndarray, opts: EnhanceOptions) -> tuple[np.ndarray, np.ndarray]:
    """NMF of the fitted spots' expression ``Y [spot, gene]``: loadings ``H [rank * seeds, gene]`` and scores
    ``W [spot, rank * seeds]`` (0 for the spots not fitted); with ``seeds`` > 1, ``W H`` is the mean of the
    bootstrap models' ``W_k H_k``."""
    from sklearn.decomposition import NMF

    fit_idx = np.flatnonzero(fit)
    nmf_idx = np.sort(np.random.default_rng(opts.seed).choice(fit_idx, min(len(fit_idx), opts.fit_spots), False))
    rank = min(opts.rank, Y.shape[1], len(nmf_idx))
    Hs, Ws = [], []
    for k in range(opts.seeds):
        sample = nmf_idx
        if opts.seeds > 1:
            sample = np.random.default_rng(opts.seed + k).choice(nmf_idx, len(nmf_idx), replace=True)
        nmf = NMF(rank, init="nndsvda", max_iter=1000, random_state=opts.seed + k).fit(Y[sample])
        Hs.append(nmf.components_ / opts.seeds)
        Ws.append(nmf.transform(Y[fit]))
    H = np.vstack(Hs)
    W = np.zeros((len(Y), H.shape[0]))
    W[fit] = np.hstack(Ws)
    return H, W


@dataclass
class Head:
    """The fitted head and what the maps need of it (``R`` metagenes, ``F`` image features, ``S`` sections)."""

    coef: np.ndarray  # [F, R] on the standardised image features
    offsets: np.ndarray  # [S, R]
    alpha: float
    #: {} or the neighbour block: mean, scale [R * widths], base [S, R], sigmas_um, coef [R * widths, R]
    nb: dict
    alpha_nb: float
    resid: np.ndarray  # [spot, R]: W - head of the fitted spots (0 elsewhere)
    sigma_um: float  # of the residual field (0: none)
    r2: float
    alone: list[int]  # sections without a fitted spot: an image-only head
    coef_alone: np.ndarray | None = None
    offsets_alone: np.ndarray | None = None

    def of_section(self, si: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """The image coefficients, offset and neighbour block that section ``si``'s maps use."""
        if si in self.alone:
            ensure(self.coef_alone is not None and self.offsets_alone is not None, "enhance: no image-only head")
            return np.asarray(self.coef_alone), np.asarray(self.offsets_alone)[si], {}
        return self.coef, self.offsets[si], self.nb


def _fit_head(
    Z: np.ndarray, W: np.ndarray, xy: np.ndarray, sec: np.ndarray, fit: np.ndarray, n_sec: int, pitch: float, opts
) -> Head:
    """The ridge head ``W ~ Z coef + N coef_nb + offset[section]`` on the fitted spots (``Z [spot, F]``
    standardised footprint features, ``N`` the neighbour features), its penalties, residuals and residual width."""
    from ..kernels.enhance import (
        fit_ridge,
        neighbour_design,
        neighbour_ridge_cv,
        residual_loo_error,
        ridge_block_error,
        spatial_blocks,
    )

    # the neighbours' scores as features: the head learns, per metagene, how far to trust the image and how far
    # the spots around (fitted on the fitted spots with each left out of its own smoothing, so the weight it
    # learns is what a spot's neighbours say about it, not what it says about itself)
    nb: dict = {}
    Z_fit = Z[fit]
    if opts.neighbour_pitches:
        sig_nb = [float(k * pitch) for k in opts.neighbour_pitches]
        own, _, base = neighbour_design(xy[fit], W[fit], sec[fit], n_sec, sig_nb, PRIOR)
        sd = own.std(0)
        nb = {"mean": own.mean(0), "scale": np.where(sd > 1e-12, sd, 1.0), "base": base, "sigmas_um": sig_nb}
        Z_fit = np.c_[Z_fit, (own - nb["mean"]) / nb["scale"]]
    # one penalty for the image features, one for the neighbour block: with a single one, informative neighbours
    # would pull the penalty down and let an image that carries nothing into the head
    F, F_nb = Z.shape[1], Z_fit.shape[1] - Z.shape[1]
    pairs = [(a, b) for a in (ALPHAS if opts.alpha is None else (opts.alpha,)) for b in (ALPHAS if nb else (0.0,))]
    blocks = spatial_blocks(xy[fit], sec[fit], opts.cv_block_pitches * pitch)
    alpha, alpha_nb = pairs[0]
    if len(pairs) > 1:  # the image earns its weight: with no information in it the head shrinks to the offsets
        # a spot's context features overlap its neighbours': left out alone, the neighbours still in the fit
        # carry its place, and the error rewards a head that interpolates between spots (the residual field's
        # job) rather than one that reads the image; blocks leave the neighbours out with it
        penalties = [np.r_[np.full(F, a), np.full(F_nb, b)] for a, b in pairs]
        if nb:  # folds of whole blocks, hidden from the neighbour features as well (see neighbour_ridge_cv)
            _, label = np.unique(blocks, return_inverse=True)
            folds = np.random.default_rng(opts.seed).permutation(label.max() + 1)[label] % CV_FOLDS
            cv = neighbour_ridge_cv(Z[fit], W[fit], xy[fit], sec[fit], n_sec, folds, nb["sigmas_um"], penalties, PRIOR)
        else:
            cv = ridge_block_error(Z_fit, W[fit], sec[fit], n_sec, penalties, blocks)
        alpha, alpha_nb = pairs[int(np.argmin(cv))]
        log.info(
            "enhance: ridge penalties %g (image), %g (neighbours) (cross-validated error %.4g, blocks of %g pitches)",
            alpha,
            alpha_nb,
            cv.min(),
            opts.cv_block_pitches,
        )
    coef_all, offsets = fit_ridge(Z_fit, W[fit], sec[fit], n_sec, np.r_[np.full(F, alpha), np.full(F_nb, alpha_nb)])
    if nb:
        nb["coef"] = coef_all[F:]
    head_fit = Z_fit @ coef_all + offsets[sec[fit]]  # the fitted spots as the head was fitted (left out)
    resid = np.zeros_like(W)
    resid[fit] = W[fit] - head_fit
    sigma_um = opts.residual_sigma_um
    if sigma_um is None:  # per section: residuals spread only within their own section
        sigmas = [k * pitch for k in SIGMAS]
        loo = sum(
            residual_loo_error(xy[fit & (sec == i)], resid[fit & (sec == i)], sigmas, PRIOR) for i in range(n_sec)
        )
        sigma_um = float(sigmas[int(np.argmin(loo))])
        log.info("enhance: residual sigma %g um (leave-one-out error %.4g; none: %.4g)", sigma_um, loo.min(), loo[0])
    r2 = 1 - ((W[fit] - head_fit) ** 2).sum() / max(((W[fit] - W[fit].mean(0)) ** 2).sum(), 1e-30)
    # a section without a fitted spot has no neighbours to read: it gets a head fitted on the image alone (the
    # joint head leans on its neighbour block, and its image part alone under-predicts: on her2st's held-out
    # sections r fell by up to 0.05 with it)
    alone = [i for i in range(n_sec) if nb and not (fit & (sec == i)).any()]
    head = Head(coef_all[:F], offsets, alpha, nb, alpha_nb, resid, float(sigma_um), float(r2), alone)
    if alone:
        alpha_alone = opts.alpha
        if alpha_alone is None:
            cv = ridge_block_error(Z[fit], W[fit], sec[fit], n_sec, ALPHAS, blocks)
            alpha_alone = ALPHAS[int(np.argmin(cv))]
        head.coef_alone, head.offsets_alone = fit_ridge(Z[fit], W[fit], sec[fit], n_sec, alpha_alone)
    return head


def _enhance_section(
    ctx: StageContext,
    si: int,
    head: Head,
    spots: dict,
    H: np.ndarray,
    Y: np.ndarray,
    maps: list[int],
    feature_mean: np.ndarray,
    feature_scale: np.ndarray,
) -> np.ndarray:
    """Section ``si``'s embedding (and gene maps), tile by tile; returns its spots' scores ``[spot, R]``, each the
    footprint mean of the embedding. ``spots``: the enhanced sections' ``sec, xy, Z, W, fit`` (all spots)."""
    from ..kernels.enhance import embedding_block, footprints, gene_block, spatial_field
    from ..store.elements import EnhanceSectionV1
    from .histology import Grid, grid_map

    opts, group = ctx.options, ctx.group
    hist = ctx.atlas.root["histology"]
    sid = str(hist.attrs["sections"][si])
    sec, xy, Z, W, fit = (spots[k] for k in ("sec", "xy", "Z", "W", "fit"))
    rank, sigma_um = W.shape[1], head.sigma_um
    grid = Grid.of(hist[sid])
    g = group.create_group(sid)
    m, fm = sec == si, fit & (sec == si)
    # the image part of the head (linear: its footprint mean is the head at the mean features)
    c_img, off, nb = head.of_section(si)
    radius_sp = float(hist[sid].attrs["spot_radius_um"]) / grid.sp_um
    centres = grid.centres(xy[m])
    # the spatial part of the head (neighbour term and residual field), as the tiles apply it
    spatial = {
        "grid_to_um": grid.grid_to_um,
        "spots_um": xy[fm] if sigma_um > 0 else np.zeros((0, 2)),
        "residuals": head.resid[fm],
        "sigma_um": max(sigma_um, 1e-9),
        "prior": PRIOR,
        "superpixel_um": grid.sp_um,
        "neighbours": None
        if not nb
        else {
            "spots_um": xy[fm],
            "scores": W[fm],
            "base": nb["base"][si],
            "sigmas_um": nb["sigmas_um"],
            "prior": PRIOR,
            "mean": nb["mean"],
            "scale": nb["scale"],
            "coef": nb["coef"],
        },
    }
    # ... and its mean over each footprint's superpixels, so that a spot's scores are its footprint mean of the
    # embedding
    field_mean = np.zeros((int(m.sum()), rank))
    if spatial["neighbours"] or len(spatial["spots_um"]):
        rr, cc, inside = footprints(centres, radius_sp, grid.h, grid.w)
        rc = np.stack([cc + 0.5, rr + 0.5], -1).reshape(-1, 2)
        field = spatial_field(rc, rank, **spatial).reshape(*rr.shape, rank)
        with np.errstate(invalid="ignore"):
            field_mean = (field * inside[..., None]).sum(1) / inside.sum(1)[:, None]
    before = Z[m] @ c_img + off + field_mean
    shift = np.where(fit[m][:, None], W[m] - before, 0.0) if opts.project else None
    kwargs = {
        "mean": feature_mean,
        "scale": feature_scale,
        "coef": c_img,
        "offset": off,
        "centres_sp": centres[fit[m]] if shift is not None else None,
        "radius_sp": radius_sp,
        "shift": shift[fit[m]] if shift is not None else None,
        **spatial,
    }
    source = f"histology/{sid}/features"
    grid_map(
        ctx, grid, g, embedding_block, source, "embedding", rank, "metagene", halo=0, with_origin=True, kwargs=kwargs
    )
    if maps:
        kw = {"loadings": H[:, maps]}
        if opts.project:  # the footprint of a fitted spot: its measurement, gene by gene
            kw.update(centres_sp=centres[fit[m]], radius_sp=radius_sp, shift=(Y[fm] - W[fm] @ H)[:, maps])
        src = f"{g.path}/embedding"
        grid_map(
            ctx, grid, g, gene_block, src, "genes", len(maps), "gene", GENE_CHUNK, halo=0, with_origin=True, kwargs=kw
        )
        arrays.write_small(g, "gene", np.asarray(list(opts.genes), dtype=str), ("gene",))
    g.attrs.update({k: hist[sid].attrs[k] for k in ("section", "superpixel_um", "grid_to_section", "image_level")})
    g.attrs["spot_radius_um"] = hist[sid].attrs["spot_radius_um"]
    EnhanceSectionV1.stamp(g)
    return before if shift is None else before + shift


def _write_cells(atlas: Atlas, group, rows: np.ndarray, scores: np.ndarray, fit: np.ndarray, E) -> None:
    """``/enhance/cells``: scores [cell, R] and fitted [cell] (NaN / False outside the enhanced sections) and, with
    ``E [spot, gene]`` (``project``), residuals [cell, gene]; written whole cell chunks at a time, in order."""
    n, chunk, rank = atlas.n_cells, atlas.cell_chunk, scores.shape[1]
    cells = group.create_group("cells")
    target = arrays.create(cells, "scores", (n, rank), np.float32, (chunk, rank), ("cell", "metagene"))
    fitted = arrays.create(cells, "fitted", (n,), bool, (chunk,), ("cell",))
    resid_x = None
    if E is not None:  # what the metagenes miss of each fitted spot's measurement: x - W H (0 elsewhere)
        G = E.shape[1]
        resid_x = arrays.create(cells, "residuals", (n, G), np.float32, (chunk, min(G, 256)), ("cell", "gene"))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        sel = (rows >= a) & (rows < b)
        block, flag = np.full((b - a, rank), np.nan, np.float32), np.zeros(b - a, bool)
        block[rows[sel] - a] = scores[sel]
        flag[rows[sel] - a] = fit[sel]
        target[a:b], fitted[a:b] = block, flag
        if resid_x is not None:
            res = np.zeros((b - a, E.shape[1]), np.float32)
            res[rows[sel] - a] = E[sel]
            resid_x[a:b] = res


def _build(ctx: StageContext) -> dict:
    atlas, opts, group = ctx.atlas, ctx.options, ctx.group
    hist = atlas.root["histology"]
    sections = [str(s) for s in hist.attrs["sections"]]
    pitch = float(hist.attrs["spot_pitch_um"])
    rows, sec, xy, Zraw = _spots(atlas, sections)
    usable = np.isfinite(Zraw).all(1)
    fit = usable.copy()
    if opts.fit_column is not None:
        fit &= np.asarray(atlas.root[f"cells/{opts.fit_column}"][...])[rows].astype(bool)
    if fit.sum() < max(opts.rank + 2, 10):
        raise InputError(
            f"enhance: only {int(fit.sum())} spots to fit on (inside the images"
            f"{', with ' + opts.fit_column if opts.fit_column else ''}); need at least {max(opts.rank + 2, 10)}"
        )

    # metagenes of the fitted spots
    gene_idx = _model_genes(atlas, rows[fit], opts)
    Y = read_expression(atlas, rows, gene_idx)
    bad = ~np.isfinite(Y) | (Y < 0)
    if bad[fit].any():
        raise InputError(
            f"enhance: /X of {atlas.path} holds negative or non-finite values (first at row "
            f"{int(rows[fit][np.argmax(bad[fit].any(1))])}); enhance needs counts or log-normalised expression "
            f"(ingest with normalize='log1p', not scaled values)"
        )
    H, W = _metagenes(Y, fit, opts)
    rank = H.shape[0]

    # the image head and its residuals
    # standardised at the superpixels' scale, where the head is applied: a feature that varies much within a
    # footprint but little between spots (texture) is penalised for that variation, not amplified by it
    mean, scale = np.asarray(hist["feature_mean"][...]), np.asarray(hist["feature_scale"][...])
    scale = np.where(scale > 1e-12, scale, 1.0)
    Z = np.where(usable[:, None], (np.nan_to_num(Zraw) - mean) / scale, 0.0)
    head = _fit_head(Z, W, xy, sec, fit, len(sections), pitch, opts)

    # per section: the embedding (and gene maps); each spot's scores = the footprint mean of the embedding
    model_genes = list(atlas.genes[gene_idx])
    maps = [model_genes.index(g) for g in opts.genes]
    spots = {"sec": sec, "xy": xy, "Z": Z, "W": W, "fit": fit}
    scores = np.full((len(rows), rank), np.nan)
    for si in range(len(sections)):
        scores[sec == si] = _enhance_section(ctx, si, head, spots, H, Y, maps, mean, scale)
    _write_cells(atlas, group, rows, scores, fit, np.where(fit[:, None], Y - W @ H, 0.0) if opts.project else None)

    model = group.create_group("model")
    arrays.write_small(model, "loadings", H.astype(np.float32), ("metagene", "gene"))
    arrays.write_small(model, "gene", np.asarray(model_genes, dtype=str), ("gene",))
    arrays.write_small(model, "feature_mean", mean, ("feature",))
    arrays.write_small(model, "feature_scale", scale, ("feature",))
    arrays.write_small(model, "coef", head.coef, ("feature", "metagene"))
    if head.alone:  # the image-only head of the sections without fitted spots
        arrays.write_small(model, "image_only_coef", head.coef_alone, ("feature", "metagene"))
        arrays.write_small(model, "image_only_offsets", head.offsets_alone, ("section", "metagene"))
    nb = head.nb
    if nb:
        arrays.write_small(model, "neighbour_coef", nb["coef"], ("neighbour_feature", "metagene"))
        arrays.write_small(model, "neighbour_mean", nb["mean"], ("neighbour_feature",))
        arrays.write_small(model, "neighbour_scale", nb["scale"], ("neighbour_feature",))
        arrays.write_small(model, "neighbour_base", nb["base"], ("section", "metagene"))
    arrays.write_small(model, "offsets", head.offsets, ("section", "metagene"))
    arrays.write_small(model, "section", np.asarray(sections, dtype=str), ("section",))
    group.attrs.update(
        {
            "sections": sections,
            "spot_diameter_um": float(hist.attrs["spot_diameter_um"]),
            "spot_pitch_um": pitch,
            "residual_sigma_um": head.sigma_um,
            "neighbour_sigmas_um": nb["sigmas_um"] if nb else [],
            "alpha": head.alpha,
            "neighbour_alpha": head.alpha_nb,
            "image_only_sections": [sections[i] for i in head.alone],
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
        "head_r2": round(head.r2, 4),
        "alpha": head.alpha,
        "neighbour_alpha": head.alpha_nb,
        "residual_sigma_um": round(head.sigma_um, 2),
    }


STAGE = Stage(
    name="enhance",
    output="enhance",
    inputs=("histology",),
    options=EnhanceOptions,
    # 2: alpha=null chosen by leaving spots out in spatial blocks (cv_block_pitches), not one at a time
    # 3: the neighbours' smoothed scores join the image features in the head (neighbour_pitches)
    # 4: the neighbour features and the residual field of the maps interpolated from lattices sigma / 4 apart
    version=4,
    summary=(
        "Histology-guided high-definition expression: NMF metagenes of the spots, a ridge head on the histology "
        "features and the neighbouring spots' smoothed scores fitted by the forward-sum objective, plus the spots' "
        "residuals spread by a Gaussian -> "
        "/enhance/<section>/embedding [rank, y, x] (+ gene maps), /enhance/cells/scores."
    ),
    build=_build,
    element="lamina.enhance",
    pipeline="enhance",
    check=_check,
)
enhance = STAGE.function  # the stage alone; lamina.enhance is the pipeline histology -> enhance
