"""Stage ``pca``: out-of-core PCA of ``/X`` -> ``/pca`` {components, mean, scale, explained_variance, pcs}.

Genes are centred (and, by default, scaled to unit variance, as ``scanpy.pp.scale`` before
``scanpy.tl.pca``). The components come from randomised block Krylov iteration on the gene-gene covariance
(Musco & Musco 2015): ``W_{j+1} = orth(Z^T Z W_j)`` with ``W_0`` ``[gene, k + 10]`` random, each product one
streaming pass over the cell chunks (``sum_c Z_c^T (Z_c W)``, tree-reduced); then Rayleigh-Ritz on the whole
space ``Q = orth([W_0 ... W_q])``: the small eigenproblem ``Q^T Z^T Z Q`` (one more pass, ``q + 1`` times as wide).
Plain subspace iteration keeps only ``W_q``; on expression, whose spectrum past the first PCs is flat, it converges
slowly (her2st patient A, 50 PCs: subspace overlap with the exact PCA 0.37 after 4 passes, 0.78 after 14), while
the Krylov space reaches 0.98 with ``q = 8`` (9 passes of width 60 and one of 540). Memory is
``O(genes x (k + 10))`` plus, per task, the ``[cell chunk, gene chunk]`` blocks of ``/X`` up to ``HOLD_BYTES``
(the others are read twice), whatever the number of cells and genes. (dask's ``svd_compressed`` reuses the
standardised matrix across its passes inside one graph, and the scheduler keeps all of it in memory to do so:
12 GB at 3M cells x 500 genes.) Per-cell PCs are then written one task per cell chunk, chunk-aligned with
``/cells``, summed over the gene chunks. The per-cell PCs live inside ``/pca`` (not a separate ``/pcs``) so the
stage commits one group atomically.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import zarr

from ..errors import InputError, MissingInputError, ensure
from ..kernels.pca import project, safe_scale
from ..store import arrays
from ..store.arrays import open_root
from ..store.atlas import Atlas
from .contract import PlanContext, Stage, StageContext
from .options import Options, option

DEFAULT_N_PCS = 50


@dataclass(frozen=True)
class PCAOptions(Options):
    n_pcs: int | None = option(None, "principal components; null: min(50, genes)", ge=1)
    scale: bool = option(True, "scale genes to unit variance before the PCA (as scanpy.pp.scale)")
    n_power_iter: int = option(
        8, "Krylov blocks of the randomised block Krylov iteration (each one streaming pass over /X)", ge=0
    )
    seed: int = option(0, "seed of the random start")


def _nonfinite_error(atlas: Atlas, row: int, count: int) -> None:
    sec = atlas.sections
    s = int(np.searchsorted(sec.cell_stop.to_numpy(), row, side="right"))
    raise InputError(
        f"/X of {atlas.path} holds NaN or inf expression in {count:,} cell(s), the first at row {row} "
        f"(section {sec.id.iloc[min(s, len(sec) - 1)]!r}); PCA needs finite values: fix or drop those "
        f"cells and re-ingest"
    )


#: raw (float32) gene blocks of one cell chunk a task keeps between the two halves of a product; the blocks past it
#: are read again for the second half
HOLD_BYTES = 512 * 2**20


def _gram_times(store: str, a: int, b: int, mean: np.ndarray, scale: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``Z_c^T (Z_c W)`` ``[gene, l]`` for the standardised rows ``[a, b)`` of ``/X``, gene chunk by gene chunk:
    ``V = sum_g Z_cg W_g``, then ``Z_cg^T V`` per gene chunk ``g``. A task holds the raw blocks that fit in
    ``HOLD_BYTES`` and one standardised block at a time, never the whole ``[cell chunk, gene]`` rows."""
    X = open_root(store, "r")["X"]

    def standardised(g0: int, g1: int, raw: np.ndarray) -> np.ndarray:
        return (raw - mean[g0:g1]) / scale[g0:g1]

    V = np.zeros((b - a, W.shape[1]))
    held, room = [], HOLD_BYTES
    for g0, g1, raw in arrays.column_blocks(X, a, b, np.float32):
        V += standardised(g0, g1, raw) @ W[g0:g1]
        if raw.nbytes <= room:
            held.append((g0, g1, raw))
            room -= raw.nbytes
    out = np.zeros(W.shape)
    done = [g0 for g0, _, _ in held]
    while held:
        g0, g1, raw = held.pop()
        out[g0:g1] = standardised(g0, g1, raw).T @ V
    for g0, g1, raw in arrays.column_blocks(X, a, b, np.float32, skip=done):  # nothing when all were held
        out[g0:g1] = standardised(g0, g1, raw).T @ V
    return out


def _covariance_times(ctx: StageContext, mean, scale, W) -> np.ndarray:
    """``Z^T Z W`` by one streaming pass: a task per cell chunk, partial products tree-summed by dask."""
    atlas = ctx.atlas
    n, chunk = atlas.n_cells, atlas.cell_chunk
    parts = [
        da.from_delayed(
            dask.delayed(_gram_times, pure=False)(atlas.path, a, min(n, a + chunk), mean, scale, W),
            shape=W.shape,
            dtype=np.float64,
        )
        for a in range(0, n, chunk)
    ]
    return np.asarray(ctx.compute(da.stack(parts).sum(axis=0, split_every=8))[0])


def _project_chunk(store: str, target: str, a: int, b: int) -> int:
    root = open_root(store, "r+")
    g = root[target]
    comp, mean, scale = (np.asarray(g[k][...]) for k in ("components", "mean", "scale"))
    pcs = np.zeros((b - a, comp.shape[0]), np.float32)
    for g0, g1, block in arrays.column_blocks(root["X"], a, b, np.float32):  # project is linear in the genes
        pcs += project(block, mean[g0:g1], scale[g0:g1], comp[:, g0:g1])
    g["pcs"][a:b] = pcs
    return b - a


def _resolve(atlas: Atlas, opts: PCAOptions, context: PlanContext) -> PCAOptions:
    return opts if opts.n_pcs is not None else opts.replace(n_pcs=min(DEFAULT_N_PCS, max(atlas.n_genes, 1)))


def _check(atlas: Atlas, opts: PCAOptions) -> None:
    if "X" not in atlas.root or not atlas.n_genes:
        raise MissingInputError(
            f"pca needs expression: {atlas.path} has no expression matrix /X (it was ingested "
            f"without genes); ingest with genes= (a list, or 'rest'), or leave out the stages "
            f"that need it (reconstruct, PC raster channels)"
        )
    n, G = atlas.n_cells, atlas.n_genes
    k = opts.n_pcs if opts.n_pcs is not None else min(DEFAULT_N_PCS, G)
    if not 1 <= k <= min(G, n):
        raise InputError(
            f"pca asked for {k} components but {atlas.path} has {G} genes and {n:,} cells; "
            f"n_pcs must be between 1 and {min(G, n)}"
        )


def _build(ctx: StageContext) -> dict:
    """PCA of the expression matrix into ``/pca``.

    Components ``[pc, gene]`` have unit norm with the largest loading of each positive (a fixed sign, so
    re-runs and other machines agree); ``explained_variance_ratio`` is over the total variance of the
    centred (scaled) genes.
    """
    atlas, opts, group = ctx.atlas, ctx.options, ctx.group
    n, G = atlas.n_cells, atlas.n_genes
    k = int(opts.n_pcs)
    X = atlas._lazy("X").astype(np.float64)
    bad = ~da.isfinite(X).all(axis=1)
    total, total_sq, n_bad, first_bad = ctx.compute(X.sum(0), (X**2).sum(0), bad.sum(), da.argmax(bad))
    if n_bad:
        _nonfinite_error(atlas, int(first_bad), int(n_bad))
    mean = total / n
    var = np.maximum(total_sq / n - mean**2, 0.0) * n / max(n - 1, 1)
    sc = safe_scale(np.sqrt(var)) if opts.scale else np.ones(G)
    width = min(G, k + 10)
    W = np.linalg.qr(np.random.default_rng(opts.seed).normal(size=(G, width)))[0]
    blocks = [W]
    for _ in range(opts.n_power_iter):
        if sum(b.shape[1] for b in blocks) >= G:  # the Krylov space holds every gene: nothing left to add
            break
        W = np.linalg.qr(_covariance_times(ctx, mean, sc, W))[0]
        blocks.append(W)
    Q = np.linalg.qr(np.concatenate(blocks, axis=1))[0][:, :G]
    M = Q.T @ _covariance_times(ctx, mean, sc, Q)  # Rayleigh-Ritz on the whole Krylov space
    lam, vec = np.linalg.eigh((M + M.T) / 2)
    top = np.argsort(lam)[::-1][:k]
    v = (Q @ vec[:, top]).T
    s = np.sqrt(np.maximum(lam[top], 0.0))
    flip = np.sign(v[np.arange(k), np.abs(v).argmax(1)])
    v *= np.where(flip == 0, 1.0, flip)[:, None]
    ev = np.asarray(s) ** 2 / max(n - 1, 1)
    total_var = float((var / sc**2).sum())
    arrays.write_small(group, "components", v.astype(np.float32), ("pc", "gene"))
    arrays.write_small(group, "mean", mean.astype(np.float32), ("gene",))
    arrays.write_small(group, "scale", sc.astype(np.float32), ("gene",))
    arrays.write_small(group, "explained_variance", ev.astype(np.float32), ("pc",))
    arrays.write_small(group, "explained_variance_ratio", (ev / max(total_var, 1e-30)).astype(np.float32), ("pc",))
    chunk = atlas.cell_chunk
    arrays.create(group, "pcs", (n, k), np.float32, (chunk, k), ("cell", "pc"))
    tasks = [
        dask.delayed(_project_chunk, pure=False)(atlas.path, group.path, a, min(a + chunk, n))
        for a in range(0, n, chunk)
    ]
    written = sum(ctx.compute(*tasks))
    ensure(written == n, f"pca wrote PCs of {written} cells, not {n}")
    return {"n_pcs": k, "explained_variance_ratio_sum": float((ev / max(total_var, 1e-30)).sum())}


STAGE = Stage(
    name="pca",
    output="pca",
    inputs=("ingest",),
    options=PCAOptions,
    version=2,
    summary="Out-of-core PCA of ``/X``: components, mean, scale and per-cell PCs as arrays in ``/pca``.",
    build=_build,
    element="lamina.pca",
    pipeline="reconstruct",
    check=_check,
    resolve=_resolve,
)
pca = STAGE.function


def read_pca(root: zarr.Group) -> dict[str, np.ndarray]:
    """The small PCA arrays (components, mean, scale) of a complete ``/pca`` group."""
    if "pca" not in root or not root["pca"].attrs.get("complete"):
        raise MissingInputError("the atlas has no complete /pca; run lamina.pca(atlas) first")
    g = root["pca"]
    return {k: np.asarray(g[k][...]) for k in ("components", "mean", "scale")}
