"""Summaries of cell neighbourhoods given as CSR neighbour lists (NumPy).

Convention: a neighbourhood of ``m`` cells is ``indptr [m + 1]`` (int64), ``indices [nnz]`` (int64, rows of a
``values [n, F]`` table, each cell's neighbours in increasing row order and the cell itself among them) and
``distances [nnz]`` (um). Every result of cell ``i`` depends only on its own neighbours, taken in that order,
so a tiled computation equals the one over all cells bit for bit.
"""

from __future__ import annotations

import numpy as np


def _check(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
    if indptr.ndim != 1 or indices.ndim != 1 or indptr[-1] != len(indices):
        raise ValueError(f"CSR neighbours: indptr [m + 1] must end at len(indices) ({indptr[-1]} vs {len(indices)})")
    if values.ndim != 2:
        raise ValueError(f"values must be [n, F], got shape {values.shape}")


def neighbour_mean(values: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of ``values`` ``[n, F]`` over each cell's neighbours: ``[m, F]`` float64,
    ``out_i = (1 / |N_i|) sum_{j in N_i} values_j`` (NaN for a cell without neighbours)."""
    _check(indptr, indices, values)
    counts = np.diff(indptr)
    gathered = np.asarray(values, np.float64)[indices]
    sums = np.zeros((len(counts), values.shape[1]))
    nonempty = counts > 0
    if len(indices):
        sums[nonempty] = np.add.reduceat(gathered, indptr[:-1][nonempty], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(nonempty[:, None], sums / counts[:, None], np.nan)


def ring_means(values: np.ndarray, indptr: np.ndarray, indices: np.ndarray, distances: np.ndarray, radii) -> np.ndarray:
    """Means of ``values`` ``[n, F]`` over rings of each cell's neighbours: ``[m, F * R]`` float64.

    Ring ``r`` holds the neighbours at distance ``radii[r-1] < d <= radii[r]`` (ring 0: ``d <= radii[0]``, the
    cell itself included); columns are ring-major (ring 0's F values, then ring 1's, ...). An empty ring is
    NaN. The neighbour lists must reach ``required_radius(radii)``.
    """
    _check(indptr, indices, values)
    radii = np.asarray(radii, np.float64)
    if radii.ndim != 1 or not len(radii) or np.any(np.diff(radii) <= 0) or radii[0] < 0:
        raise ValueError(f"radii must be increasing non-negative distances, got {radii.tolist()}")
    ring = np.searchsorted(radii, np.asarray(distances, np.float64), side="left")  # d <= radii[ring]
    owner = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    out = []
    for r in range(len(radii)):
        keep = ring == r
        sub_indptr = np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=len(indptr) - 1))])
        out.append(neighbour_mean(values, sub_indptr, indices[keep]))
    return np.concatenate(out, axis=1)


def required_radius(radii) -> float:
    """The neighbourhood radius (um) :func:`ring_means` reads for ``radii``: the largest one."""
    return float(np.max(radii))
