"""Apply registration transforms to points: affine then a displacement sampled from a grid (NumPy)."""

from __future__ import annotations

import numpy as np

from .geometry import apply_affine


def sample_grid(field: np.ndarray, xy: np.ndarray, origin, spacing: float) -> np.ndarray:
    """Bilinear sample of a ``[K, H, W]`` field at points ``xy`` ``[n, 2]`` (um) -> ``[n, K]``.

    Uses the grid convention of :mod:`lamina.kernels.raster`; points outside the grid take the value of the
    nearest edge pixel (the field is extended by clamping), so no point ever gets NaN.
    """
    K, H, W = field.shape
    fx = np.clip((xy[:, 0] - origin[0]) / spacing, 0, W - 1)
    fy = np.clip((xy[:, 1] - origin[1]) / spacing, 0, H - 1)
    j0 = np.minimum(np.floor(fx).astype(np.int64), max(W - 2, 0))
    i0 = np.minimum(np.floor(fy).astype(np.int64), max(H - 2, 0))
    wx, wy = (fx - j0)[:, None], (fy - i0)[:, None]
    j1, i1 = np.minimum(j0 + 1, W - 1), np.minimum(i0 + 1, H - 1)
    f = field.transpose(1, 2, 0)
    return (1 - wy) * ((1 - wx) * f[i0, j0] + wx * f[i0, j1]) + wy * ((1 - wx) * f[i1, j0] + wx * f[i1, j1])


def warp_points(
    xy: np.ndarray, affine: np.ndarray, displacement: np.ndarray | None = None, origin=(0.0, 0.0), spacing: float = 1.0
) -> np.ndarray:
    """``p' = A p + u(A p)``: affine ``A`` (3x3, um) then displacement ``u`` ``[2, H, W]`` (um) on a grid.

    xy ``[n, 2]`` um -> ``[n, 2]`` float64 um. ``displacement`` None means affine only.
    """
    q = apply_affine(affine, np.asarray(xy, np.float64))
    if displacement is None:
        return q
    return q + sample_grid(np.asarray(displacement, np.float64), q, origin, spacing)
