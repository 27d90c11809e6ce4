"""Niche features of cells from their neighbour lists (NumPy / SciPy sparse).

Convention: as :mod:`lamina.kernels.neighbours`, a block of ``m`` cells is ``indptr [m + 1]``, ``indices
[nnz]`` (rows of the gathered tables, the cell itself among its neighbours) and ``distances [nnz]`` (um);
``owner [m]`` is each block cell's own row. Every summary is a sparse operator ``W [m, n]`` applied to a
table ``[n, F]`` (no ``[nnz, F]`` gather), and each cell's result depends on its own neighbours only, so a
tiled computation equals the untiled one up to floating-point summation order.

The summaries (BANKSY's and CellCharter's ideas, at several scales and across sections):

- disk means ``mean_{j in N_r(i), j != i} v_j`` over the neighbours within radius ``r`` (the same section);
- the azimuthal gradient (BANKSY's m = 1 Gabor filter)
  ``|sum_j w_ij (v_j - vbar_i) exp(i phi_ij)| / sum_j w_ij`` with Gaussian weights
  ``w_ij = exp(-d_ij^2 / (2 sigma^2))`` and ``phi_ij`` the direction from cell ``i`` to ``j``;
- composition: the fraction of each cell type among the neighbours within ``r``;
- z means: the mean over the cells of the adjacent sections within ``r`` (in-plane distance).

A cell with no neighbour within a radius (an isolated cell, a one-cell section) is its own niche: its disk
mean is its own value and its composition its own type; without cells in the adjacent sections its z mean
is its own value too.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _check(indptr: np.ndarray, indices: np.ndarray, distances: np.ndarray) -> None:
    if indptr.ndim != 1 or indices.ndim != 1 or indptr[-1] != len(indices) or len(distances) != len(indices):
        raise ValueError(
            f"CSR neighbours: indptr [m + 1] must end at len(indices) = len(distances) "
            f"({indptr[-1]} vs {len(indices)}, {len(distances)})"
        )


def weights(indptr: np.ndarray, indices: np.ndarray, n: int, keep: np.ndarray, values=None) -> sp.csr_matrix:
    """Row-normalised sparse operator ``[m, n]``: ``W_ij = u_ij / sum_j u_ij`` over the pairs where ``keep``
    (``u`` = ``values`` or 1). Rows with nothing kept are all zero (see :func:`mean_or_own`)."""
    u = np.where(keep, 1.0 if values is None else values, 0.0)
    W = sp.csr_matrix((u, indices, indptr), shape=(len(indptr) - 1, n))
    W.eliminate_zeros()
    total = np.asarray(W.sum(axis=1)).ravel()
    return sp.diags(np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)) @ W


def mean_or_own(W: sp.csr_matrix, values: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """``W @ values`` ``[m, F]``, with each empty row of ``W`` replaced by the cell's own ``values[owner]``."""
    out = np.asarray(W @ values)
    empty = np.diff(W.indptr) == 0
    if empty.any():
        out[empty] = values[owner[empty]]
    return out


def pair_owner(indptr: np.ndarray) -> np.ndarray:
    """The block cell of each pair ``[nnz]``."""
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def azimuthal_gradient(
    values: np.ndarray,
    xy: np.ndarray,
    owner: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    distances: np.ndarray,
    sigma_um: float,
    keep: np.ndarray | None = None,
    pair_weights: np.ndarray | None = None,
) -> np.ndarray:
    """BANKSY's azimuthal Gabor filter (m = 1) of ``values`` ``[n, F]``: ``[m, F]``, zero for a cell without
    neighbours. ``xy`` ``[n, 2]`` um; ``owner`` ``[m]`` rows of the block cells; ``keep`` ``[nnz]`` limits the
    pairs (e.g. to the cell's own section); ``sigma_um`` the Gaussian's width; ``pair_weights`` ``[nnz]``
    multiply the Gaussian (e.g. inverse sampling fractions)."""
    _check(indptr, indices, distances)
    if values.ndim != 2 or xy.shape != (len(values), 2):
        raise ValueError(f"values must be [n, F] and xy [n, 2], got {values.shape} and {xy.shape}")
    pair = pair_owner(indptr)
    delta = xy[indices] - xy[owner[pair]]
    self_pair = indices == owner[pair]
    keep = ~self_pair if keep is None else keep & ~self_pair
    w = np.exp(-0.5 * (np.asarray(distances, np.float64) / float(sigma_um)) ** 2) * keep
    if pair_weights is not None:
        w = w * pair_weights
    phi = np.arctan2(delta[:, 1], delta[:, 0])
    n, m = len(values), len(indptr) - 1
    total = np.bincount(pair, weights=w, minlength=m)
    wn = np.divide(w, total[pair], out=np.zeros(len(w)), where=total[pair] > 0)
    mean = np.asarray(sp.csr_matrix((wn, indices, indptr), shape=(m, n)) @ values)
    re = sp.csr_matrix((wn * np.cos(phi), indices, indptr), shape=(m, n))
    im = sp.csr_matrix((wn * np.sin(phi), indices, indptr), shape=(m, n))
    # sum_j w_ij (v_j - vbar_i) e^{i phi} = (W e^{i phi}) v - (sum_j w_ij e^{i phi}) vbar_i
    real = np.asarray(re @ values) - np.asarray(re.sum(axis=1)) * mean
    imag = np.asarray(im @ values) - np.asarray(im.sum(axis=1)) * mean
    return np.sqrt(real**2 + imag**2)


def one_hot(types: np.ndarray, n_types: int) -> sp.csr_matrix:
    """``[n, n_types]`` indicator of ``types`` ``[n]`` (codes; -1 = unknown: an all-zero row)."""
    types = np.asarray(types, np.int64)
    known = (types >= 0) & (types < n_types)
    rows = np.flatnonzero(known)
    return sp.csr_matrix((np.ones(len(rows)), (rows, types[known])), shape=(len(types), int(n_types)))


def nearest_centroid(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index ``[n]`` of the nearest of ``centroids`` ``[K, F]`` for each row of ``values`` ``[n, F]``
    (squared Euclidean distance; the assignment step of k-means)."""
    values = np.asarray(values, np.float64)
    c = np.asarray(centroids, np.float64)
    d = (values**2).sum(1)[:, None] - 2 * values @ c.T + (c**2).sum(1)[None, :]
    return np.argmin(d, axis=1)


def block_pca(
    count: float,
    total: np.ndarray,
    gram: np.ndarray,
    layout: list,
    weights: dict,
    dim: int,
    own_weight: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The niche's projection from streamed statistics of its features ``f [cell, F]``.

    Inputs: ``count`` cells, ``total = sum f`` ``[F]``, ``gram = sum f^T f`` ``[F, F]``, ``layout``: the
    sub-blocks in column order as ``(block name, width)`` (one per radius; ``own`` = the cell's own PCs),
    ``weights`` (block -> total variance after scaling, split evenly over the block's sub-blocks). With the covariance
    ``C = gram / count - mu mu^T``, each neighbourhood sub-block ``b`` is scaled by
    ``s_b = sqrt(w_b / R_b / tr C_bb)``; the top ``dim`` eigenvectors ``V`` of the scaled neighbourhood
    covariance give the niche part, and the own features are whitened to ``own_weight^2 * sum(lambda_top) / P``
    variance each. Returns ``(mu [F], scale [F], M [F, dim + P'], ratio [dim])`` so that an embedding is
    ``((f - mu) * scale) @ M`` (``P' = P``, or 0 when ``own_weight`` is 0) and ``ratio`` is the share of the
    scaled neighbourhood variance each niche dimension holds. Signs: each column's largest loading positive.
    """
    names = [str(name) for name, _ in layout]
    widths = [int(w) for _, w in layout]
    ends = np.cumsum(widths)
    F = int(ends[-1]) if len(ends) else 0
    if gram.shape != (F, F) or total.shape != (F,) or count <= 0:
        raise ValueError(f"block_pca: gram {gram.shape}, total {total.shape} and a layout of {F} do not match")
    mean = total / count
    cov = gram / count - np.outer(mean, mean)
    var = np.clip(np.diag(cov), 0.0, None)
    own = np.zeros(F, bool)
    scale = np.zeros(F)
    for name, a, b in zip(names, ends - np.asarray(widths), ends):
        if name == "own":
            own[a:b] = True
            continue
        tr = float(var[a:b].sum())
        scale[a:b] = np.sqrt(float(weights[name]) / names.count(name) / tr) if tr > 0 else 0.0
    P = int(own.sum())
    hood = ~own
    C = cov[np.ix_(hood, hood)] * np.outer(scale[hood], scale[hood])
    lam, vec = np.linalg.eigh((C + C.T) / 2)
    dim = min(int(dim), int(hood.sum()))
    top = np.argsort(lam)[::-1][:dim]
    V = vec[:, top]
    flip = np.sign(V[np.abs(V).argmax(0), np.arange(dim)])
    V = V * np.where(flip == 0, 1.0, flip)[None, :]
    kept = np.clip(lam[top], 0, None)
    ratio = kept / max(float(np.clip(lam, 0, None).sum()), 1e-30)
    n_own = P if own_weight > 0 else 0
    own_std = np.sqrt(var[own])
    scale[own] = np.divide(own_weight * np.sqrt(kept.sum() / max(P, 1)), own_std, out=np.zeros(P), where=own_std > 0)
    M = np.zeros((F, dim + n_own))
    M[np.flatnonzero(hood)[:, None], np.arange(dim)[None, :]] = V
    M[np.flatnonzero(own)[:n_own], dim + np.arange(n_own)] = 1.0
    return mean, scale, M, ratio
