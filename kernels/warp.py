"""Apply registration transforms to points: affine then a displacement sampled from a grid (NumPy)."""

from __future__ import annotations

import numpy as np

from .geometry import apply_affine
from .resample import bilinear


def sample_grid(field: np.ndarray, xy: np.ndarray, origin, spacing: float) -> np.ndarray:
    """Bilinear sample of a ``[K, H, W]`` field at points ``xy`` ``[n, 2]`` (um) -> ``[n, K]``.

    Uses the grid convention of :mod:`lamina.kernels.raster`; points outside the grid take the value of the
    nearest edge pixel (the field is extended by clamping), so no point ever gets NaN.
    """
    cols, rows = (xy[:, 0] - origin[0]) / spacing, (xy[:, 1] - origin[1]) / spacing
    return bilinear(field, cols, rows, fill=None, dtype=np.float64).T


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
