"""Voxel grids: cell -> voxel indices and per-voxel sums (scatter-add), vectorised.

A grid is ``origin`` (um, the corner of voxel 0 along x, y, z), a voxel edge ``size`` (um) and a shape
``(Z, Y, X)``; voxel ``(k, j, i)`` spans ``origin + [i, i+1) * size`` in x (likewise y, z).
"""

from __future__ import annotations

import numpy as np


def voxel_index(coord: np.ndarray, origin: float, size: float) -> np.ndarray:
    """``floor((coord - origin) / size)`` as int64 (cells on a voxel's upper face go to the next voxel)."""
    return np.floor((np.asarray(coord, np.float64) - origin) / size).astype(np.int64)


def accumulate(
    iz: np.ndarray,
    iy: np.ndarray,
    ix: np.ndarray,
    values: np.ndarray,
    shape: tuple[int, int, int],
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel weighted sums and total weights of points with voxel indices ``iz, iy, ix`` [n] in ``shape``.

    ``values`` ``[n, P]``, ``weights`` ``[n]`` (default 1) -> ``sums [P, Z, Y, X]`` and ``counts [Z, Y, X]``
    (float64): ``sums[p, v] = sum_{i in v} w_i values[i, p]``, ``counts[v] = sum_{i in v} w_i``. Indices
    outside ``shape`` must be dropped by the caller. One ``bincount`` per column: no per-point or per-voxel
    Python.
    """
    Z, Y, X = shape
    flat = (iz * Y + iy) * X + ix
    nvox = Z * Y * X
    w = np.ones(len(flat)) if weights is None else np.asarray(weights, np.float64)
    counts = np.bincount(flat, weights=w, minlength=nvox).reshape(shape)
    values = np.asarray(values, np.float64)
    sums = (
        np.stack([np.bincount(flat, weights=w * values[:, p], minlength=nvox) for p in range(values.shape[1])])
        if values.shape[1]
        else np.zeros((0, nvox))
    )
    return sums.reshape((values.shape[1],) + tuple(shape)), counts


def mean_or_nan(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``sums [P, ...] / counts [...]`` as float32, NaN where a voxel holds no weight."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = sums / counts[None]
    out[:, counts <= 0] = np.nan
    return out.astype(np.float32)
