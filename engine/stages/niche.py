"""Stage ``niche``: niche-aware cell embeddings -> ``/embeddings/niche`` ``[cell, dim]``.

Per cell, the features of :mod:`lamina.kernels.niche` over its neighbourhood: its own PCs (``/pca/pcs``),
disk means of its neighbours' PCs at each of ``radii_um`` (same section), BANKSY's azimuthal gradient,
the composition of cell types at each radius (a categorical cell column, or ``auto``: k-means clusters
of the PCs, which uses no labels). In a stack of aligned sections the cells of the ``z_sections`` adjacent
sections on each side (in-plane distance in the atlas frame) join the disks: ``z_mode="pool"`` (default)
counts them in the means and compositions (a cylinder through the stack instead of a disk), ``"block"`` keeps
the disk means over them apart, as a ``z`` block. Pooling was chosen on 12 phantom stacks, where the
separate block lifted the layer ARI over 2D by +0.002 on average and pooling by +0.034 (8 of 12 up), and
holds on 12 other stacks (+0.021, 12 of 12; RESULTS.md ``embed-3d``): the adjacent sections' cells are more
samples of the same niche, and a block of their own is one more direction for the PCA to spend its
dimensions on. Each block (own,
means at one radius, ...) is scaled to a total variance given by ``weights`` (split evenly over a block's
radii), then the neighbourhood blocks are compressed to ``dim`` dimensions by PCA and the cell's own PCs,
whitened, are appended at ``own_weight`` times the neighbourhood part's RMS
(:func:`lamina.kernels.niche.block_pca`): k-means on the embedding sees mostly the niche, while a probe
(scale-free) still finds the cell's identity. Disks expected to hold more than ``max_neighbours`` cells are
summarised from a fixed hashed subset of the cells (the exact neighbour lists stop at ``exact_um``; the
tiles read cells out to the largest radius). Data flow::

    k-means of a subsample of /pca/pcs (cell_types=auto) -> centroids
    map_neighbourhoods(reduce): features of a fixed subset of <= fit_cells cells -> n, sum, Gram [F, F]
    block scales from the Gram's diagonal; eigh of the scaled covariance -> components [F, dim + own]
    map_neighbourhoods(target): features of every cell -> projected -> /embeddings/niche/values

Memory: one tile with its halo and ``[F, F]`` statistics per task; the ``[cell, F]`` feature matrix is
never formed (each pass recomputes the features of its tile).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

import dask.array as da
import numpy as np

from ..errors import ConfigError, InputError, MissingInputError
from ..store import arrays
from ..store.atlas import Atlas
from .contract import Stage, StageContext
from .options import Options, option

BLOCKS = ("means", "gradient", "types", "z")
DEFAULT_WEIGHTS = {"means": 1.0, "gradient": 0.25, "types": 1.0, "z": 0.5}
#: cells of /pca/pcs read to find the k-means centroids of cell_types="auto"
KMEANS_SAMPLE = 50_000


@dataclass(frozen=True)
class NicheOptions(Options):
    dim: int = option(16, "dimensions of the neighbourhood part (a PCA of the neighbourhood features)", ge=1)
    n_pcs: int = option(30, "PCs per cell (the first of /pca; fewer when /pca has fewer)", ge=1)
    own_weight: float = option(
        0.25, "the cell's own PCs, whitened, appended at this RMS relative to the neighbourhood part; 0: none", ge=0
    )
    radii_um: tuple[float, ...] = option(
        (30.0, 60.0, 120.0, 240.0, 480.0), "radii (um) of the neighbour means and compositions, increasing"
    )
    gradient_um: float = option(30.0, "sigma (um) of the azimuthal-gradient filter; 0: no gradient block", ge=0)
    cell_types: str | None = option(
        "auto", "cell column of types for the composition block; auto: k-means clusters of the PCs; null: none"
    )
    n_types: int = option(16, "clusters of cell_types=auto", ge=2)
    z_sections: int = option(
        1, "adjacent aligned sections on each side whose cells join the neighbourhoods (stacks only); 0: 2D only", ge=0
    )
    z_mode: Literal["pool", "block"] = option(
        "pool",
        "pool: the adjacent sections' cells join the disk means and compositions (cylinders through the stack); "
        "block: their disk means form a separate z block (weights.z)",
    )
    weights: dict | None = option(
        None,
        "total variance of each block before the PCA (means, gradient, types, z); given blocks replace "
        "the defaults: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_WEIGHTS.items()),
    )
    max_neighbours: int = option(
        200, "a disk expected to hold more cells is summarised from a fixed random subset of about this many", ge=8
    )
    fit_cells: int = option(200_000, "cells whose features fit the PCA (a fixed random subset of the atlas)", ge=1)
    seed: int = option(0, "seed of the k-means and of the fit subset")


def uses_z(atlas: Atlas, opts: NicheOptions) -> bool:
    return opts.z_sections > 0 and atlas.n_sections > 1 and (opts.z_mode == "pool" or _weights(opts)["z"] > 0)


def _needs(atlas: Atlas, opts: NicheOptions) -> tuple[str, ...]:
    return ("pca", "warp") if uses_z(atlas, opts) else ("pca",)


def _check(atlas: Atlas, opts: NicheOptions) -> None:
    radii = np.asarray(opts.radii_um, np.float64)
    if not len(radii) or np.any(~np.isfinite(radii)) or np.any(radii <= 0) or np.any(np.diff(radii) <= 0):
        raise ConfigError(f"niche: radii_um must be increasing positive distances in um, got {list(opts.radii_um)}")
    given = dict(opts.weights or {})
    unknown = sorted(set(given) - set(BLOCKS))
    if unknown:
        raise ConfigError(f"niche: weights has unknown block(s) {unknown}; blocks: {', '.join(BLOCKS)}")
    bad = {k: v for k, v in given.items() if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0)}
    if bad or not any(float(v) > 0 for v in _weights(opts).values()):
        raise ConfigError(f"niche: weights must be non-negative numbers, not all zero; got {given}")
    if opts.cell_types not in (None, "auto"):
        if opts.cell_types not in atlas.cell_columns:
            raise MissingInputError(
                f"niche: cell_types={opts.cell_types!r} is not a cell column of {atlas.path} (columns: "
                f"{', '.join(atlas.cell_columns)}); name a categorical column, 'auto' or null"
            )
        if atlas.categories(opts.cell_types) is None:
            raise InputError(
                f"niche: cell_types={opts.cell_types!r} of {atlas.path} is numeric; the composition needs a "
                f"categorical column (cell-type labels), 'auto' (k-means clusters) or null"
            )


def _weights(opts: NicheOptions) -> dict[str, float]:
    given = dict(opts.weights or {})
    return {b: float(given.get(b, DEFAULT_WEIGHTS[b])) for b in BLOCKS}


def _layout(P: int, R: int, T: int, spec: dict) -> list[tuple[str, int]]:
    """The feature blocks in column order: (block, width) per sub-block (one per radius)."""
    w = spec["weights"]
    out = [("own", P)]
    out += [("means", P)] * R if w["means"] > 0 else []
    out += [("gradient", P)] if spec["gradient_um"] > 0 and w["gradient"] > 0 else []
    out += [("types", T)] * R if T and w["types"] > 0 else []
    out += [("z", P)] * R if spec["z"] and spec["z_mode"] == "block" else []
    return out


_tile = threading.local()


def _tile_cache(nb) -> dict:
    """What the blocks of one tile can share (they arrive one after another in one task and thread, with the
    same gathered rows): a dict that is emptied when the rows change."""
    rows = nb.rows
    key = (id(rows), len(rows), int(rows[0]) if len(rows) else -1, int(rows[-1]) if len(rows) else -1, int(rows.sum()))
    cache = getattr(_tile, "cache", None)
    if cache is None or cache["key"] != key:
        cache = _tile.cache = {"key": key}
    return cache


def _pair_set(nb, spec: dict, r: float, d: np.ndarray) -> tuple:
    """``(indptr, indices, distances, pair weights | None, keep)`` of the block cells' neighbours within ``r``: from
    the exact lists when ``r <= exact_um``, else from a fixed random subset of the cells (a hash of the row; a
    fraction per section chosen so that a disk holds about ``max_neighbours`` of them), each weighted by the
    inverse of its section's fraction (so that a mean over several sections stays unbiased)."""
    from scipy.spatial import cKDTree

    from ..maps import ball_lists, sampled

    if r <= spec["exact_um"] * (1 + 1e-12):
        return nb.indptr, nb.indices, d, None, d <= r
    frac = np.asarray(spec["fraction"][repr(float(r))], np.float64)[nb.section]
    pts = np.asarray(nb.xyz, np.float64) * np.array([1.0, 1.0, spec["z_scale"]])
    cache = _tile_cache(nb)
    if ("tree", r) not in cache:  # the blocks of one tile share its cells: one subset and tree per radius
        pick = np.flatnonzero(sampled(nb.rows, frac, spec["seed"]))
        cache[("tree", r)] = (pick, cKDTree(pts[pick]))
    pick, tree = cache[("tree", r)]
    owner = np.asarray(nb.core, np.int64)
    counts, flat = ball_lists(tree, pts[owner], float(r))
    indices = pick[flat]
    indptr = np.concatenate([[0], np.cumsum(counts)])
    rep = np.repeat(owner, counts)
    dist = np.sqrt(((pts[indices] - pts[rep]) ** 2).sum(1))
    return indptr, indices, dist, 1.0 / frac[indices], np.ones(len(indices), bool)


def features(nb, spec: dict) -> np.ndarray:
    """Niche features ``[m, F]`` (float64) of a :class:`lamina.maps.Neighbourhood` block, in :func:`_layout`'s
    order."""
    from ..kernels.niche import azimuthal_gradient, mean_or_own, nearest_centroid, one_hot, pair_owner, weights

    P = spec["n_pcs"]
    pcs = np.asarray(nb.columns["pca/pcs"][:, :P], np.float64)
    bad = ~np.isfinite(pcs).all(axis=1)
    if bad.any():
        raise InputError(
            f"niche: /pca/pcs holds NaN or inf for {int(bad.sum())} cell(s), the first at row "
            f"{int(nb.rows[np.argmax(bad)])}; re-run lamina.pca(atlas, force=True)"
        )
    owner = np.asarray(nb.core, np.int64)
    n = len(nb.rows)
    d_all = np.asarray(nb.distances, np.float64)
    sets = {}

    def within(r):
        """(indptr, indices, distances, weights, same section, other cell) of the pairs within ``r``."""
        if r not in sets:
            indptr, indices, dist, pw, keep = _pair_set(nb, spec, r, d_all)
            pair = pair_owner(indptr)
            same = (nb.section[indices] == nb.section[owner[pair]]) & keep
            other = (indices != owner[pair]) & keep
            sets[r] = (indptr, indices, dist, pw, same, other)
        return sets[r]

    w = spec["weights"]
    pool = spec["z"] and spec["z_mode"] == "pool"
    out = [pcs[owner]]
    if w["means"] > 0:
        for r in spec["radii"]:
            indptr, indices, _, pw, same, other = within(r)
            out.append(mean_or_own(weights(indptr, indices, n, other if pool else same & other, pw), pcs, owner))
    if spec["gradient_um"] > 0 and w["gradient"] > 0:
        s = spec["gradient_um"]
        indptr, indices, dist, pw, same, _ = within(3 * s)
        out.append(azimuthal_gradient(pcs, nb.xyz[:, :2], owner, indptr, indices, dist, s, keep=same, pair_weights=pw))
    if spec["n_types"] and w["types"] > 0:
        cache = _tile_cache(nb)
        if "hot" not in cache:
            if spec["types"] == "auto":
                types = nearest_centroid(pcs, np.asarray(spec["centroids"]))
            else:
                types = np.asarray(nb.columns[f"cells/{spec['types']}"], np.int64)
            cache["hot"] = one_hot(types, spec["n_types"])
        hot = cache["hot"]
        own = hot[owner].toarray()
        for r in spec["radii"]:
            indptr, indices, _, pw, same, other = within(r)
            W = weights(indptr, indices, n, other if pool else same & other, pw)
            comp = np.asarray((W @ hot).todense())
            empty = np.diff(W.indptr) == 0
            comp[empty] = own[empty]
            out.append(comp)
    if spec["z"] and not pool:
        for r in spec["radii"]:
            indptr, indices, _, pw, same, other = within(r)
            out.append(mean_or_own(weights(indptr, indices, n, ~same & other, pw), pcs, owner))
    return np.concatenate(out, axis=1)


def gram(nb, spec: dict) -> tuple[float, np.ndarray, np.ndarray]:
    """(cells, sum ``[F]``, Gram ``[F, F]``) of the block's features: what the fit pass folds."""
    f = features(nb, spec)
    return float(len(f)), f.sum(0), f.T @ f


def add(a, b):
    return tuple(x + y for x, y in zip(a, b))


def project(nb, spec: dict) -> np.ndarray:
    """The block's embedding ``[m, dim]``: ``((f - mean) * scale) @ components``."""
    f = features(nb, spec)
    return ((f - spec["mean"]) * spec["scale"]) @ spec["components"]


def _kmeans_centroids(atlas: Atlas, P: int, k: int, seed: int) -> np.ndarray:
    """k-means centroids ``[k, P]`` of the first ``P`` PCs of a random subsample of cells (sorted reads)."""
    from sklearn.cluster import KMeans

    pcs = arrays.sample_rows(atlas.root["pca/pcs"], KMEANS_SAMPLE, seed)[:, :P]
    km = KMeans(n_clusters=min(k, len(pcs)), n_init=3, random_state=seed).fit(pcs)
    return km.cluster_centers_


def _spec(atlas: Atlas, opts: NicheOptions) -> dict:
    P = min(opts.n_pcs, int(atlas.root["pca/pcs"].shape[1]))
    spec = {
        "n_pcs": P,
        "radii": [float(r) for r in opts.radii_um],
        "gradient_um": float(opts.gradient_um),
        "weights": _weights(opts),
        "types": opts.cell_types,
        "n_types": 0,
        "z": uses_z(atlas, opts),
        "z_mode": opts.z_mode,
    }
    if opts.cell_types == "auto":
        spec["n_types"] = min(opts.n_types, atlas.n_cells)
    elif opts.cell_types is not None:
        spec["n_types"] = len(atlas.categories(opts.cell_types) or [])
    return spec


def _sampling(ctx: StageContext, spec: dict, opts: NicheOptions) -> dict:
    """Per radius, the fraction of each section's cells its disks are summarised from, and ``exact_um``: the
    largest radius whose disks are expected to hold at most ``max_neighbours`` cells (exact neighbour lists).

    Density: a section's cells over its bounding box (an underestimate for a ragged outline, so disks hold
    somewhat more than ``max_neighbours`` cells). Without it, a dense Xenium section (~4,000 cells per mm^2)
    would pair every cell with ~3,000 others at 480 um."""
    atlas = ctx.atlas
    sec = atlas.sections
    names = ("aligned/x", "aligned/y") if spec["z"] else ("cells/x", "cells/y")
    x, y = (atlas._lazy(nm) for nm in names)
    spans = list(zip(sec.cell_start.astype(int), sec.cell_stop.astype(int)))
    ext = ctx.compute(*[da.stack([x[a:b].min(), x[a:b].max(), y[a:b].min(), y[a:b].max()]) for a, b in spans])
    area = np.array([max((e[1] - e[0]) * (e[3] - e[2]), 1.0) for e in ext])
    density = sec.n_cells.to_numpy(np.float64) / area  # cells per um^2
    layers = 1 + 2 * opts.z_sections if spec["z"] else 1
    radii = sorted({*spec["radii"], *([3 * spec["gradient_um"]] if spec["gradient_um"] > 0 else [])})
    fraction = {}
    for r in radii:
        expected = density * np.pi * r**2 * layers
        fraction[repr(float(r))] = np.minimum(1.0, opts.max_neighbours / np.maximum(expected, 1e-12)).tolist()
    exact = [r for r in radii if min(fraction[repr(float(r))]) >= 1.0]
    fallback = float(np.sqrt(opts.max_neighbours / (np.pi * float(density.max()) * layers)))
    return {
        "fraction": fraction,
        "exact_um": max(exact) if exact else max(fallback, 1e-3),
        "seed": opts.seed,
        "z_scale": 0.0 if spec["z"] else 1.0,
    }


def _build(ctx: StageContext) -> dict:
    from ..maps import map_neighbourhoods
    from ..store.elements import EmbeddingsV1

    atlas, opts, group = ctx.atlas, ctx.options, ctx.group
    spec = _spec(atlas, opts)
    bad = ~da.isfinite(atlas._lazy("pca/pcs")[:, : spec["n_pcs"]]).all(axis=1)
    n_bad, first = ctx.compute(bad.sum(), da.argmax(bad))
    if n_bad:
        raise InputError(
            f"niche: /pca/pcs of {atlas.path} holds NaN or inf for {int(n_bad):,} cell(s), the first at row "
            f"{int(first)}; re-run lamina.pca(atlas, force=True)"
        )
    if spec["types"] == "auto":
        centroids = _kmeans_centroids(atlas, spec["n_pcs"], spec["n_types"], opts.seed)
        spec["n_types"] = len(centroids)
        spec["centroids"] = centroids
        arrays.write_small(group, "centroids", centroids.astype(np.float32), ("type", "pc"))
    layout = _layout(spec["n_pcs"], len(spec["radii"]), spec["n_types"], spec)
    F = sum(w for _, w in layout)
    spec.update(_sampling(ctx, spec, opts))
    where = {
        "radius": spec["exact_um"],
        "halo_um": max(max(spec["radii"]), 3 * spec["gradient_um"]),
        "columns": ["pca/pcs"] + ([f"cells/{opts.cell_types}"] if opts.cell_types not in (None, "auto") else []),
        "coords": "aligned" if spec["z"] else "raw",
        "z_sections": opts.z_sections if spec["z"] else 0,
        "z_scale": 0.0 if spec["z"] else 1.0,
    }
    n = atlas.n_cells
    fraction = min(1.0, opts.fit_cells / max(n, 1))
    fit = map_neighbourhoods(
        gram,
        atlas,
        reduce=add,
        sample=fraction if fraction < 1 else None,
        seed=opts.seed,
        kwargs={"spec": spec},
        client=ctx.client,
        label="niche: fit",
        **where,
    )
    count, total, G = fit
    from ..kernels.niche import block_pca

    blocks = np.asarray([b for b, w in layout for _ in range(w)])
    mean, scale, M, ratio = block_pca(count, total, G, layout, spec["weights"], opts.dim, opts.own_weight)
    dim, n_own = len(ratio), M.shape[1] - len(ratio)
    width_out = M.shape[1]
    arrays.write_small(group, "feature_mean", mean.astype(np.float32), ("feature",))
    arrays.write_small(group, "feature_scale", scale.astype(np.float32), ("feature",))
    arrays.write_small(group, "components", M.T.astype(np.float32), ("dim", "feature"))
    arrays.write_small(group, "explained_variance_ratio", ratio.astype(np.float32), ("niche_dim",))
    arrays.write_small(group, "feature_block", blocks, ("feature",))
    arrays.create(group, "values", (n, width_out), np.float32, (atlas.cell_chunk, width_out), ("cell", "dim"))
    spec.update({"mean": mean, "scale": scale, "components": M})
    map_neighbourhoods(
        project, atlas, f"{group.path}/values", kwargs={"spec": spec}, client=ctx.client, label="niche", **where
    )
    group.attrs.update(
        {
            "stage": "niche",
            "inputs": list(ctx.stage.inputs_for(atlas, opts)),
            "params": {**opts.to_dict(), "n_pcs": spec["n_pcs"], "n_types": spec["n_types"], "z": spec["z"]},
            "dim_names": [f"niche_{i}" for i in range(dim)] + [f"own_pc_{i}" for i in range(n_own)],
        }
    )
    parent = atlas.root.require_group("embeddings")
    EmbeddingsV1.stamp(parent)
    return {
        "dim": width_out,
        "n_features": F,
        "fit_cells": int(count),
        "explained_variance_ratio_sum": float(ratio.sum()),
        "three_d": bool(spec["z"]),
        "exact_um": float(spec["exact_um"]),
        "sampled_radii": [float(r) for r, f in spec["fraction"].items() if min(f) < 1.0],
    }


STAGE = Stage(
    name="niche",
    output="embeddings/niche",
    inputs=("pca",),
    options=NicheOptions,
    version=2,
    summary="Niche-aware cell embeddings: own PCs, multi-scale neighbour means, gradient, composition and "
    "adjacent sections, compressed by PCA into ``/embeddings/niche``.",
    build=_build,
    element="lamina.embedding",
    pipeline="embed",
    needs=_needs,
    check=_check,
)
niche = STAGE.function
