"""Resample an image at arbitrary points (NumPy): what moves a section's histology into the atlas frame, and
what samples the registration's displacement grids at cells (``kernels.warp.sample_grid``, clamped at the border).

Convention: continuous pixel coordinates ``(col, row)`` put pixel ``(i, j)``'s centre at ``(j, i)``; a point
is inside an ``[.., H, W]`` image when ``-0.5 <= col <= W - 0.5`` and ``-0.5 <= row <= H - 0.5`` (the pixels'
own extent), and the half pixel along the border takes the border pixel's value.
"""

from __future__ import annotations

import numpy as np


def bilinear(
    image: np.ndarray, cols: np.ndarray, rows: np.ndarray, fill: float | None = 0.0, dtype=np.float32
) -> np.ndarray:
    """Bilinear samples of ``image`` ``[C, H, W]`` at ``(cols, rows)`` (any equal shapes ``S``) -> ``[C, *S]``
    in ``dtype``; points outside the image get ``fill``, or with ``fill=None`` the value of the nearest border
    pixel (the image extended by clamping: a displacement field, where no point may get a hole).

    ``v = (1 - fy)((1 - fx) I[i0, j0] + fx I[i0, j1]) + fy((1 - fx) I[i1, j0] + fx I[i1, j1])`` with
    ``j0 = floor(col)``, ``fx = col - j0`` (likewise rows), indices clamped to the image.
    """
    if image.ndim != 3:
        raise ValueError(f"bilinear: image must be [C, H, W], got shape {image.shape}")
    if np.shape(cols) != np.shape(rows):
        raise ValueError(f"bilinear: cols {np.shape(cols)} and rows {np.shape(rows)} differ in shape")
    C, H, W = image.shape
    shape = np.shape(cols)
    out = np.full((C, *shape), np.nan if fill is None else fill, dtype)
    x, y = np.asarray(cols, np.float64).ravel(), np.asarray(rows, np.float64).ravel()
    if fill is None:
        inside = np.ones(x.shape, bool)
    else:
        inside = (x >= -0.5) & (x <= W - 0.5) & (y >= -0.5) & (y <= H - 0.5)
    if H == 0 or W == 0 or not inside.any():
        return out
    x, y = np.clip(x[inside], 0, W - 1), np.clip(y[inside], 0, H - 1)
    j0, i0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    j1, i1 = np.minimum(j0 + 1, W - 1), np.minimum(i0 + 1, H - 1)
    fx, fy = (x - j0).astype(dtype), (y - i0).astype(dtype)
    img = image.astype(dtype, copy=False)
    top = (1 - fx) * img[:, i0, j0] + fx * img[:, i0, j1]
    bottom = (1 - fx) * img[:, i1, j0] + fx * img[:, i1, j1]
    flat = out.reshape(C, -1)
    flat[:, inside] = (1 - fy) * top + fy * bottom
    return out
